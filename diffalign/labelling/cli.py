"""The ``diffalign label`` subcommand: :func:`add_label_command` registers it on the main parser's subparsers."""

from __future__ import annotations

import argparse

from ..console import HelpFormatter
from .server import MODES, serve


def add_label_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``label DIR [--mode ...] [--annotator NAME] [--port N] [--host H] [--labels FILE]`` to ``sub``; its
    ``func`` serves the labelling page until Ctrl-C. Returns the subparser."""
    p = sub.add_parser(
        "label", formatter_class=HelpFormatter,
        help="score images in a local web page (a `diffalign sample` or `diffalign make-pairs` folder)",
        description="Serve a labelling page over DIR on this machine: people rank, pick best/worst, thumb or\n"
                    "compare each prompt's images; every label is one line of DIR/labels.jsonl in D3PO's\n"
                    "format ({\"prompt_id\", \"annotator\", \"scores\"}, higher = better). Restart to resume.")
    p.add_argument("dir", metavar="DIR", help="a `diffalign sample` (manifest.json) or `diffalign make-pairs` "
                   "(scores.jsonl) output folder")
    p.add_argument("--mode", choices=MODES, default="rank",
                   help="how the page asks: order the images, best and worst, each up/down, or one of two")
    p.add_argument("--annotator", default=None, metavar="NAME",
                   help="name to put in the printed address (default: the page asks, and remembers it)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: a free one, printed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; another than 127.0.0.1 lets other machines label (and read the images)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="label file, JSONL (default: DIR/labels.jsonl)")
    p.set_defaults(func=_label)
    return p


def _label(args: argparse.Namespace) -> None:
    serve(args.dir, labels=args.labels, mode=args.mode, annotator=args.annotator, host=args.host, port=args.port)
