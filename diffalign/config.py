"""Run configuration: nested dataclasses, loaded as defaults < YAML recipe < ``--set a.b=value`` overrides.

Every field carries a help string in its metadata; ``__post_init__`` validates values and names the bad one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .options import ConfigError, check_choice, check_positive, coerce, option
from .recipe_files import read_recipe, yaml_problem
from .sampling.settings import Sampling

# What the pair objectives' denoising error measures (train.error_space): the model's own output, or its noise.
ERROR_SPACES = ("prediction", "epsilon")

# the section dataclasses below use the short names
_f, _choice, _positive = option, check_choice, check_positive


@dataclass
class ModelConfig:
    pretrained: str = _f("", "Base model: a hub id or a local diffusers folder (SD1.5 or SDXL layout).")
    vae: str | None = _f(None, "Optional VAE override (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix.")
    prediction_type: str | None = _f(
        None, "epsilon or v_prediction; None reads it from the base model's scheduler config."
    )
    revision: str | None = _f(None, "Hub revision of the base model.")

    def __post_init__(self) -> None:
        if self.prediction_type is not None:
            _choice("model", "prediction_type", self.prediction_type, ("epsilon", "v_prediction"))


@dataclass
class DataConfig:
    dataset: str = _f("", "Preference pairs: hub id, local dataset dir, parquet file/dir/glob, or a pairs .jsonl/.csv; "
                          "for kto unpaired labels: a {prompt, image, label} .jsonl/.csv, a folder holding "
                          "unpaired.jsonl, or a dataset with caption, image and label columns.")
    split: str = _f("train", "Split to read from a hub or local HF dataset.")
    resolution: int | None = _f(None, "Training resolution in pixels; None uses 512 for SD1.5 and 1024 for SDXL.")
    caption_dropout: float = _f(0.0, "Probability per pair of training on the empty prompt (both images alike).")
    keep_ties: bool = _f(False, "Keep tied pairs (label_0 not in {0, 1}); they are dropped and counted by default.")
    max_pairs: int | None = _f(None, "Use at most this many pairs (after dropping ties; kto: images); None uses all.")
    exclude_prompts: str = _f("", "A prompts file (.txt one per line, or .jsonl with \"prompt\"): pairs (kto: images) "
                                  "whose caption is one of its prompts are not trained on, so a win rate on those "
                                  "prompts is judged on prompts the run never saw (`diffalign sweep "
                                  "--hold-out-prompts` sets it to the validation prompts).")
    random_flip: bool = _f(False, "Flip pairs horizontally with probability 0.5 (fixed per pair so the cache is exact). "
                                  "Off by default: a flip teaches the mirror image of any preference that is not "
                                  "mirror-symmetric (position, text, handedness); the Pick-a-Pic recipes turn it on "
                                  "as the official Diffusion-DPO script does.")
    center_crop: bool = _f(False, "Center crop instead of a random crop (the random crop is fixed per pair).")
    on_bad_image: str = _f("skip", "What to do with undecodable images: 'skip' (counted warning) or 'error'.")
    num_workers: int = _f(0, "DataLoader worker processes when training from raw images.")
    prompts: str = _f("", "D3PO online: prompts file (.txt one per line, or .jsonl with \"prompt\").")
    eval_prompts: str = _f("", "Online objectives: held-out prompts for the mean-reward (and guard) evaluation.")
    labels: str = _f("", "D3PO human feedback: label JSONL ({prompt_id, scores, annotator}) for `diffalign sample` "
                         "output.")
    rollouts: str = _f("", "D3PO human feedback: the `diffalign sample` folder; empty: the labels file's folder.")
    eval_pairs: str = _f("", "Held-out preference pairs (any pairs form above): their implicit and ranking accuracy, "
                             "margin and the policy's drift from the reference are logged as heldout_* every "
                             "train.heldout_every steps; the signal `diffalign sweep` picks by. Never trained on.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"data.caption_dropout={self.caption_dropout!r} must be in [0, 1]", ("data.caption_dropout",))
        _choice("data", "on_bad_image", self.on_bad_image, ("skip", "error"))
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError(f"data.resolution={self.resolution!r} must be a positive multiple of 8", ("data.resolution",))
        if self.max_pairs is not None:
            _positive("data", "max_pairs", self.max_pairs)
        if self.prompts and self.labels:
            raise ConfigError("data.prompts (online D3PO) and data.labels (human feedback) are both set; choose one",
                              ("data.prompts", "data.labels"))


@dataclass(init=False)
class ObjectiveConfig:
    """The ``objective:`` section: ``name`` and that objective's own options. Every objective class declares its
    options as a dataclass, ``Options`` (``beta`` is one of them), and the section's other keys are validated
    against it: an unknown key names the valid keys of *that* objective. ``cfg.objective.beta`` (or any option)
    reads the options."""

    name: str = _f("dpo", "Objective by registered name: dpo, mapo, inpo, smpo (preference pairs), kto (unpaired "
                          "likes/dislikes), d3po, ddpo, grpo, reward_backprop (online), an entry point of diffalign.objectives, or 'pkg.module:Class' "
                          "(found on sys.path or in the working folder).")
    options: Any = _f(None, "The objective's own options: its Options dataclass, built from the section's other keys.")

    def __init__(self, name: str = "dpo", options: Any = None, **values: Any):
        self.name = name
        self.options = options if options is not None else build_options(name, values)

    def __getattr__(self, key: str) -> Any:
        options = self.__dict__.get("options")
        if options is None or key.startswith("__") or not hasattr(options, key):
            raise AttributeError(f"objective {self.__dict__.get('name')!r} has no option {key!r}")
        return getattr(options, key)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: ``{"name": ..., **options}``."""
        return {"name": self.name, **dataclasses.asdict(self.options)}


def options_class(name: str) -> type:
    """The ``Options`` dataclass the objective ``name`` declares."""
    from .registry import objective_class

    cls = objective_class(name)
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        raise ConfigError(f"objective.name={name!r}: {cls.__name__} declares no options; give it a class attribute "
                          "`Options`, a dataclass with (at least) `beta: float`", ("objective.name",))
    return options


def build_options(name: str, values: dict[str, Any]):
    """``Options(**values)`` of the objective ``name``, each value checked against the field's type; an unknown
    key names this objective's valid keys (and the built-in objective it belongs to, if any)."""
    options = options_class(name)
    hints = typing.get_type_hints(options)
    valid = [f.name for f in dataclasses.fields(options)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints or key not in valid:
            if f"objective.{key}" in MOVED:
                raise _moved(f"objective.{key}")
            raise ConfigError(f"objective.{key}: not an option of objective {name!r}{_elsewhere(key, name)}; its "
                              f"options are {', '.join(valid)}", (f"objective.{key}",))
        if key == "beta" and value is None:  # `beta: null` (older recipes): the objective's own default
            continue
        kwargs[key] = coerce(f"objective.{key}", value, hints[key])
    return options(**kwargs)


def _elsewhere(key: str, name: str) -> str:
    """A hint for a key of the wrong objective: ``" (gamma is an option of smpo)"``, or a near spelling."""
    from .registry import BUILTIN_OBJECTIVES

    owners = [n for n in BUILTIN_OBJECTIVES if n != name and key in _builtin_option_names(n)]
    if owners:
        return f" ({key} is an option of {', '.join(owners)})"
    near = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(options_class(name))], n=1)
    return f" (did you mean objective.{near[0]}?)" if near else ""


def _builtin_option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(options_class(name))]


@dataclass
class LoraConfig:
    rank: int = _f(8, "LoRA rank r.")
    alpha: float | None = _f(None, "LoRA alpha; None means alpha = rank (scale 1).")
    targets: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet module names that get adapters.")
    dropout: float = _f(0.0, "LoRA dropout.")

    def __post_init__(self) -> None:
        _positive("lora", "rank", self.rank)
        if not self.targets:
            raise ConfigError("lora.targets is empty; name at least one module, e.g. to_q", ("lora.targets",))


@dataclass
class OptimConfig:
    name: str = _f("adamw", "Optimizer: adamw, adamw8bit (needs bitsandbytes) or adafactor.")
    lr: float = _f(1e-5, "Peak learning rate.")
    weight_decay: float = _f(1e-2, "Decoupled weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    betas: list[float] = _f([0.9, 0.999], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    scheduler: str = _f("constant_with_warmup", "LR schedule name from diffusers.optimization (constant, cosine, ...).")
    warmup_steps: int = _f(0, "Linear warmup steps.")

    def __post_init__(self) -> None:
        _choice("optim", "name", self.name, ("adamw", "adamw8bit", "adafactor"))
        _positive("optim", "lr", self.lr)
        _positive("optim", "max_grad_norm", self.max_grad_norm, allow_zero=True)
        _positive("optim", "warmup_steps", self.warmup_steps, allow_zero=True)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas!r} must hold two numbers", ("optim.betas",))


@dataclass
class TrainConfig:
    batch_size: int = _f(4, "Pairs per device per micro-step (the UNet sees 2x this many images).")
    grad_accum: int = _f(1, "Micro-steps accumulated per optimizer step.")
    max_steps: int = _f(2000, "Optimizer steps.")
    seed: int = _f(0, "Seed for data order, noise, timesteps, augmentation and caption dropout.")
    mixed_precision: str = _f("no", "no, fp16 or bf16; frozen weights use it, LoRA parameters stay fp32.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the UNet.")
    attention: str = _f("sdpa", "UNet attention: sdpa (torch scaled_dot_product_attention) or xformers (installed).")
    max_bad_steps: int = _f(10, "Stop (with a checkpoint) after this many consecutive steps whose loss or gradients "
                                "were non-finite; each such update is skipped.")
    output_dir: str = _f("runs/diffalign", "Where adapters, checkpoints, logs and the model card go.")
    checkpoint_every: int = _f(500, "Write a resumable checkpoint every N optimizer steps (0: never).")
    checkpoints_keep: int = _f(2, "Keep at most this many checkpoints (the newest are kept).")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to resume from.")
    overwrite: bool = _f(False, "Train into an output_dir that already holds a run (its adapter or checkpoints), "
                                "deleting that run's adapter and checkpoints first; without it such a folder is "
                                "refused unless resuming.")
    validate_every: int = _f(0, "Write a validation image grid every N optimizer steps (0: only at the end).")
    validation_prompts: list[str] = _f([], "Prompts for validation grids (empty: no validation images); drawn as "
                                           "the sampling section says, image i with seed sampling.seed + i.")
    log_every: int = _f(1, "Log metrics every N optimizer steps.")
    error_space: str = _f("prediction", "The denoising error the pair and unpaired objectives (dpo, mapo, inpo, "
                                        "smpo, kto) compare. prediction: of the model's own output, ε or v, as the "
                                        "official codes do. epsilon: of its noise prediction, as the papers write the "
                                        "losses; on a v-prediction model that is ā_t times the v error, which moves "
                                        "the weight from the noisiest, layout-setting steps to the detail-setting "
                                        "ones and shrinks the errors, so β must grow (a deviation from the official "
                                        "codes there; the same thing on an ε-prediction model). The held-out pair "
                                        "metrics (data.eval_pairs) are measured in the same space.")
    heldout_every: int = _f(50, "Measure data.eval_pairs every N optimizer steps (and at the last step); 0: only at "
                                "the last step.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoints_keep", "max_bad_steps"):
            _positive("train", name, getattr(self, name))
        for name in ("checkpoint_every", "validate_every", "heldout_every"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        _choice("train", "mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _choice("train", "attention", self.attention, ("sdpa", "xformers"))
        _choice("train", "error_space", self.error_space, ERROR_SPACES)


@dataclass
class LogConfig:
    to: str = _f("tensorboard", "Metric sink: tensorboard, wandb or none.")
    project: str = _f("diffalign", "Project name for the tracker.")

    def __post_init__(self) -> None:
        _choice("log", "to", self.to, ("tensorboard", "wandb", "none"))


@dataclass
class CacheConfig:
    enabled: bool = _f(True, "Encode latents and text embeddings once and train from the cache.")
    dir: str | None = _f(None, "Cache folder; None uses $DIFFALIGN_CACHE or ~/.cache/diffalign.")
    dtype: str = _f("float32", "Storage dtype of cached tensors: float32 (exact) or float16/bfloat16 (half the disk).")

    def __post_init__(self) -> None:
        _choice("cache", "dtype", self.dtype, ("float32", "float16", "bfloat16"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampling: Sampling = field(default_factory=Sampling)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if getattr(self.objective.options, "inversion_cache", False):
            # the cached inversions must not depend on θ or on a per-step random prompt
            needs = {"objective.inversion_model": (self.objective.inversion_model, "reference"),
                     "data.caption_dropout": (self.data.caption_dropout, 0.0), "cache.enabled": (self.cache.enabled, True)}
            for key, (value, required) in needs.items():
                if value != required:
                    raise ConfigError(f"objective.inversion_cache=true needs {key}={required!r} (got {value!r})",
                                      ("objective.inversion_cache", key))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "objective": self.objective.to_dict()}

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"section.key": value}`` with non-scalar values as strings (what experiment trackers accept)."""
        return {f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
                for section, values in self.to_dict().items() for k, v in values.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def valid_keys() -> list[str]:
    """Every dotted key a recipe or ``--set`` may name."""
    from .registry import BUILTIN_OBJECTIVES

    keys = [f"{s}.{f.name}" for s, cls in _section_types().items() if s != "objective" for f in dataclasses.fields(cls)]
    objective = ["objective.name"] + [f"objective.{k}" for n in BUILTIN_OBJECTIVES for k in _builtin_option_names(n)]
    return keys + list(dict.fromkeys(objective))


# Keys that moved into the sampling section: an old recipe gets an error naming the new place.
MOVED = {"objective.sample_steps": "sampling.steps", "objective.guidance": "sampling.guidance",
         "objective.eta": "sampling.eta", "train.validation_steps": "sampling.steps",
         "train.validation_guidance": "sampling.guidance"}


def _moved(key: str) -> ConfigError:
    return ConfigError(f"{key} has moved to {MOVED[key]} (one sampling section serves rollouts, validation images "
                       "and the sampling commands); rename the key", (key,))


def _unknown(key: str) -> ConfigError:
    if key in MOVED:
        return _moved(key)
    near = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(near)}?" if near else f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key {key!r}{hint}", (key,))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a validated :class:`Config` from a nested dict, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for section, cls in _section_types().items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {given!r}")
        if cls is ObjectiveConfig:  # name + that objective's options, validated by its Options dataclass
            name = coerce("objective.name", given.get("name", "dpo"), str)
            sections[section] = ObjectiveConfig(name, **{k: v for k, v in given.items() if k != "name"})
            continue
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in given.items():
            if key not in hints:
                raise _unknown(f"{section}.{key}")
            kwargs[key] = coerce(f"{section}.{key}", value, hints[key])
        sections[section] = cls(**kwargs)
    for section in raw:
        if section not in sections:
            raise _unknown(str(section))
    return Config(**sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str], origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML) onto a nested dict; ``origins`` (if given) records
    ``"--set a.b=value"`` as the source of each key set. Errors name the ``--set``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {item}: {_unknown(key)}", (key,))
        section, name = parts
        if origins is not None:
            origins.setdefault(section, f"--set {item}")
            origins[key] = f"--set {item}"
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {item}: section {section!r} is not a mapping")
        try:
            raw[section][name] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {yaml_problem(e)}") from None
    return raw


def _blame(e: ConfigError, origins: dict[str, str], fallback: str | None) -> ConfigError:
    """``e`` prefixed with where its keys' values came from: the recipe file, ``--set key=value``, or both."""
    sources = list(dict.fromkeys(origins[k] for k in e.keys if k in origins))
    if not sources and not e.keys and fallback:
        sources = [fallback]
    return ConfigError(f"{' and '.join(sources)}: {e}" if sources else str(e), e.keys)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML recipe at ``path`` (a file, or a shipped recipe's name) < ``overrides``
    (``["train.max_steps=10", ...]``). An error names the source of the bad value: the recipe file or the
    ``--set``."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = None
    if path is not None:
        from .resources import builtin_recipes, recipe_path

        path = recipe_path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist (a file, or a shipped recipe: "
                              f"{', '.join(builtin_recipes())})")
        source = str(path)
        raw = read_recipe(path)
        for section, given in raw.items():
            origins[str(section)] = source
            origins.update({f"{section}.{key}": source for key in (given or {})})
    raw = apply_overrides(raw, list(overrides or []), origins)
    try:
        return config_from_dict(raw, source or "config")
    except ConfigError as e:
        raise _blame(e, origins, source) from None
