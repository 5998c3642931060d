"""``diffalign label``: a local labelling page over a ``diffalign sample`` or ``diffalign make-pairs`` folder.

People score each prompt's images in the browser; every label is one line of a JSONL file in D3PO's label
format (``{"prompt_id", "annotator", "scores"}``, higher = better), which D3PO training and the converters read.

- :mod:`.items`: what a folder holds (prompts and their images);
- :mod:`.store`: the label file (validated, appended with fsync, undo, one server per file);
- :mod:`.server`: the Flask app (page + JSON API) and the threaded local server;
- :mod:`.cli`: the ``label`` subcommand.
"""

from .items import Item, LabelFolder, read_items
from .store import LabelError, LabelStore

__all__ = ["Item", "LabelError", "LabelFolder", "LabelStore", "read_items"]
