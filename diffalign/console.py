"""What every command line of the package shares: the help formatter and quiet third-party logs."""

from __future__ import annotations

import argparse
import logging


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, False, an empty
    list) or the help already says it; descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        nothing = default is None or default is False or default is argparse.SUPPRESS or default == []
        if nothing or "%(default)" in text or "(default" in text:
            return text
        return super()._get_help_string(action)


def quiet_libraries() -> None:
    """diffusers' and transformers' logs down to errors, and their loading progress bars off ("Loading weights",
    "Loading pipeline components", "No LoRA keys associated to CLIPTextModel"). Hub download bars stay on, as do
    our own warnings and progress bars."""
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

        hub_bars = not are_progress_bars_disabled()
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        hub_bars, enable_progress_bars = False, None
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = __import__(module, fromlist=["set_verbosity_error"])
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    if hub_bars:  # transformers' disable_progress_bar switches the hub's download bars off too
        enable_progress_bars()
