"""One :class:`Sampling` block: how images are drawn, wherever diffalign draws them.

The same fields, defaults and checks serve a run's ``sampling:`` section (online rollouts and validation images),
``diffalign generate | make-pairs | sample | eval`` (their flags are mapped onto it here, in
:func:`add_sampling_arguments` and :meth:`Sampling.from_args`), the demo and the benchmarks.

Seeds: with ``seed_policy: per_image`` image ``k`` of prompt ``i`` (``K`` images per prompt) uses
``seed + i·K + k``, so every image has its own seed (``generate``: one image per prompt, so prompt ``i`` uses
``seed + i``; ``make-pairs``); with ``shared`` it uses ``seed + k``, the same ``K`` seeds for every prompt
(``eval``'s default). ``diffalign sample`` draws each prompt's shared ``x_T`` and its step noise from one
generator per prompt, seeded ``seed · 1000003 + i``. Online rollouts draw from ``train.seed`` and the round, so
every round brings new noise and a resume draws the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..options import ConfigError, check_choice, option

SEED_POLICIES = ("per_image", "shared")
ROLLOUT_ETA = 1.0  # the D3PO and DDPO papers' η, where ``eta`` is left to the use

# field -> (command-line flag, its help): the one mapping every sampling command uses
FLAGS = {"steps": ("--steps", "denoising steps"),
         "guidance": ("--guidance", "classifier-free guidance scale (<= 1: the conditional branch alone)"),
         "eta": ("--eta", "DDIM eta (default: 0 with a stock pipeline, whose non-DDIM schedulers ignore it; 1 for "
                          "trajectories)"),
         "negative_prompt": ("--negative", "negative prompt"),
         "seed": ("--seed", "seed of the first image"),
         "seed_policy": ("--seed-policy", "per_image: image k of prompt i uses seed + i*K + k; shared: seed + k for "
                                          "every prompt"),
         "height": ("--height", "image height, a multiple of 8 (default: the model's own size, its UNet sample_size "
                                "x VAE scale factor)"),
         "width": ("--width", "image width, a multiple of 8 (default: as height)")}


@dataclass
class Sampling:
    """How images are drawn (see the module doc for the seed policies)."""

    steps: int = option(30, "Denoising steps per image; for online rollouts, per trajectory (each one a trained "
                            "step: the D3PO recipes use the paper's 20).")
    guidance: float = option(5.0, "Classifier-free guidance scale; <= 1 runs the conditional branch alone, as "
                                  "diffusers' pipelines do. Online objectives use it in the training forward too.")
    eta: float | None = option(None, "DDIM η; None: 0 (deterministic) where a stock pipeline draws (generate, "
                                     "make-pairs, eval, validation images; schedulers without η ignore it) and in "
                                     "reward backprop, and 1 for stored trajectories (D3PO, DDPO, GRPO rollouts, "
                                     "`diffalign sample`), whose step log-probability needs η > 0.")
    negative_prompt: str = option("", "Negative prompt: the unconditional branch of CFG (empty: the empty prompt).")
    seed: int = option(0, "Seed of the first image (in training: of the validation images; rollouts draw from "
                          "train.seed, new noise every round).")
    seed_policy: str = option("per_image", "per_image: image k of prompt i uses seed + i*K + k (every image its "
                                           "own seed); shared: image k of every prompt uses seed + k (eval's "
                                           "default: the same seeds for every prompt).")
    height: int | None = option(None, "Image height, a multiple of 8; None: the model's own size (in training: "
                                      "the training resolution).")
    width: int | None = option(None, "Image width, a multiple of 8; None: as height.")

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:  # "sampling.steps=0: ..." (on the command line "--steps 0: ...")
            return ConfigError(f"sampling.{name}={getattr(self, name)!r}: {expected}", (f"sampling.{name}",))

        if self.steps < 1:
            raise bad("steps", "must be at least 1")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise bad("guidance", "must be a finite number >= 0")
        if self.eta is not None and (not math.isfinite(self.eta) or self.eta < 0):
            raise bad("eta", "must be a finite number >= 0 (or null: each use's default)")
        check_choice("sampling", "seed_policy", self.seed_policy, SEED_POLICIES)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise bad(name, "must be a positive multiple of 8")

    # ----- what a draw uses -----
    def seed_of(self, prompt: int, k: int, per_prompt: int) -> int:
        """The seed of image ``k`` of prompt ``prompt`` when each prompt gets ``per_prompt`` images."""
        return self.seed + k + (prompt * per_prompt if self.seed_policy == "per_image" else 0)

    def generators(self, prompt: int, images: list[int] | range, per_prompt: int) -> list:
        """One seeded CPU generator per image index in ``images`` of prompt ``prompt`` (so each image is the one a
        call with that seed alone would draw)."""
        import torch

        return [torch.Generator().manual_seed(self.seed_of(prompt, k, per_prompt)) for k in images]

    def size(self, default: int) -> tuple[int, int]:
        """``(height, width)``, each falling back to ``default`` (the model's size or the training resolution)."""
        height = self.height or default
        return height, self.width or height

    def pipeline_kwargs(self, default_size: int | None = None, with_size: bool = True) -> dict[str, Any]:
        """Keyword arguments of a stock diffusers pipeline call; size and η only when set (a pipeline's own size
        is the model's), or the size from ``default_size``; no size with ``with_size=False`` (img2img keeps its
        image's)."""
        kw: dict[str, Any] = {"num_inference_steps": self.steps, "guidance_scale": self.guidance}
        if self.negative_prompt:
            kw["negative_prompt"] = self.negative_prompt
        if self.eta is not None:
            kw["eta"] = self.eta
        if with_size and (self.height or self.width or default_size):
            kw["height"], kw["width"] = self.size(default_size or self.height or self.width)
        return kw

    def trajectory_eta(self, key: str = "sampling.eta=") -> float:
        """η of stored trajectories: ``eta``, or 1 when unset; 0 is refused (no noise, no log-probability), in a
        message that starts with ``key`` (``"--eta "`` on the command line)."""
        eta = ROLLOUT_ETA if self.eta is None else self.eta
        if eta <= 0:
            raise ConfigError(f"{key}{eta!r}: trajectories with step log-probabilities need η > 0 (the papers use "
                              f"{ROLLOUT_ETA})", ("sampling.eta",))
        return eta

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----- the command line -----
    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed: Any) -> Sampling:
        """The block from a command's flags (those :func:`add_sampling_arguments` added) and ``fixed`` values;
        an invalid value is an error naming its flag."""
        values = {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
        try:
            return cls(**{**values, **fixed})
        except ConfigError as e:
            message = str(e)
            for name, (flag, _) in FLAGS.items():
                message = message.replace(f"sampling.{name}=", f"{flag} ")
            raise ConfigError(message, e.keys) from None


def add_sampling_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                           helps: dict[str, str] | None = None, **defaults: Any) -> None:
    """The sampling flags of a command (every field of :class:`Sampling` but those in ``skip``), with
    :class:`Sampling`'s defaults unless ``defaults`` gives the command's own (and ``helps`` its own wording)."""
    base = {f.name: f.default for f in dataclasses.fields(Sampling)}
    types = {"steps": int, "guidance": float, "eta": float, "negative_prompt": str, "seed": int, "height": int,
             "width": int}
    for name, (flag, text) in FLAGS.items():
        if name in skip:
            continue
        kw: dict[str, Any] = {"dest": name, "default": defaults.get(name, base[name]),
                              "help": (helps or {}).get(name, text)}
        if name == "seed_policy":
            kw["choices"] = SEED_POLICIES
        else:
            kw["type"] = types[name]
        parser.add_argument(flag, **kw)
