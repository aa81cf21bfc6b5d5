"""Run configuration: YAML files plus ``--set section.key=value`` overrides.

A run config has seven sections: ``model`` (a size ``name`` plus any :class:`StarConfig` field),
``data`` (``data/config.py``), ``optim``, ``run``, ``segment`` and ``detect`` (below), and ``probe``
(``evaluation/config.py``); each dataclass lists every field any task reads, with a comment on
which task reads it. Every section is checked by the same helper,
:func:`star_mamba.config.typed_values`: unknown keys fail with a "did you mean" hint and values
are converted to the field's type ('1e-1' -> 0.1 for a float, a list for a tuple, null for an
Optional, a ``Literal`` choice checked) before anything runs; then each section checks its own
fields in ``__post_init__``. The resolved config is written next to every run's outputs.

Where defaults live:

* ``model``: StarConfig's field defaults (``star_mamba/config.py``), then the size's embed_dim and
  depth (``models.registry.MODEL_SIZES``), then the YAML file and ``--set``. ``num_classes`` left
  unset follows the dataset when fine-tuning.
* ``data`` / ``optim`` / ``run``: the dataclass defaults (STAR pretraining's values for the
  fields every task reads, ARM fine-tuning's for the fields only fine-tuning reads), then the YAML
  file and ``--set``. ``probe`` (read by ``linprobe`` only): the protocol's defaults;
  ``segment`` / ``detect`` (read by that task only): the dense model's and its scoring's.
  Each task's recipe is its YAML file under ``configs/`` (``pretrain/``, ``finetune/``,
  ``linprobe/``, ``segment/``, ``detect/``): a new config should start from a copy of one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from ..config import StarConfig, did_you_mean, field_types, typed_values
from ..data.config import DataConfig
from ..errors import ConfigError, MissingFileError
from ..evaluation.config import ProbeConfig
from ..models.registry import model_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

TASKS = ("pretrain", "finetune", "linprobe", "segment", "detect")
"""``finetune`` covers fine-tuning (and head-only fine-tuning, ``run.linprobe``) and evaluation;
``linprobe`` is the converged probe of a frozen backbone (``tasks/linprobe.py``); ``segment``
semantic segmentation (``tasks/segment.py``); ``detect`` detection and instance segmentation
(``tasks/detect.py``)."""


@dataclass
class ModelSection:
    """``model``: a size ``name`` and the :class:`StarConfig` fields the config sets (typed).

    A field left out comes from the size (embed_dim, depth), then from what the task knows
    (fine-tuning: num_classes from the dataset), then from StarConfig's default.
    """

    name: str = "star_tiny"
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "ModelSection":
        typed = typed_values(values, {"name": str, **field_types(StarConfig)}, "model")
        section = cls(typed.pop("name", "star_tiny"), typed)
        section.star_config()  # an impossible model fails here, before anything runs
        return section

    def star_config(self, **fallback: Any) -> StarConfig:
        """The model config: size, then ``fallback`` (what the task knows), then the fields set."""
        return model_config(self.name, **{**fallback, **self.fields})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in self.fields.items()}}


def _bad(section: str, name: str, value: Any, what: str) -> ConfigError:
    shown = list(value) if isinstance(value, tuple) else value
    return ConfigError(f"invalid config: {section}.{name}={shown!r}; {what}")


@dataclass
class OptimConfig:
    """``optim``. Defaults: STAR pretraining's; the fine-tuning YAML files set their own."""

    batch_size: int = 64  # images per process per step (pretraining: B*K, divisible by K)
    accum_iter: int = 1
    blr: float = 1.5e-4  # base lr: lr = blr * effective batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 10
    warmup_epochs: float = 1.0
    clip_grad: Optional[float] = 3.0
    layer_decay: Optional[float] = None  # layer-wise lr decay (ARM fine-tuning: 0.65); null = off
    schedule: Literal["cosine", "poly"] = "cosine"  # after warm-up: cosine | poly (segmentation)
    poly_power: float = 1.0  # poly: lr falls as (1 - progress) ** poly_power
    # -- fine-tuning only
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("batch_size", "accum_iter", "epochs"):
            if getattr(self, name) <= 0:
                raise _bad("optim", name, getattr(self, name), "expected a positive integer")
        rate = "lr" if self.lr is not None else "blr"
        if not getattr(self, rate) > 0:
            raise _bad("optim", rate, getattr(self, rate), "expected a positive learning rate")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "smoothing", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise _bad("optim", name, getattr(self, name), "expected a value >= 0")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise _bad("optim", "clip_grad", self.clip_grad, "expected > 0, or null for none")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise _bad("optim", "layer_decay", self.layer_decay,
                       "expected a factor in (0, 1], or null for none")
        if not self.poly_power > 0:
            raise _bad("optim", "poly_power", self.poly_power, "expected a power > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise _bad("optim", "betas", self.betas, "expected two values in [0, 1)")

    def base_lr(self, global_batch: int) -> float:
        """``lr``, or ``blr`` scaled by the global batch (images per optimizer step) / 256."""
        return self.lr if self.lr is not None else self.blr * global_batch / 256


@dataclass
class RunOptions:
    """``run``: where, how and how long. Runtime fields (device, amp, threads, compile, ...) may
    change between a run and its resume."""

    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, off on CPU
    save_every: int = 1  # epochs between numbered checkpoints (a rolling latest is always kept)
    keep_last: int = 3  # numbered checkpoints kept (0 = all); latest and best always stay
    save_every_steps: int = 200  # steps between refreshes of the rolling latest checkpoint
    log_every: int = 10  # steps between metric lines
    resume: str = "auto"  # auto (latest in output_dir) | never | <path to checkpoint>
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total
    threads: Optional[int] = None  # torch CPU threads; None keeps torch's default
    tensorboard: bool = True
    progress: bool = True
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    # torch.compile the model for training and evaluation: true | false | auto (on for CUDA,
    # where it pays, off on CPU and for the dense tasks' models; engine/run.py compiles())
    compile: Union[bool, Literal["auto"]] = "auto"
    compile_mode: Optional[str] = None  # torch.compile mode (e.g. max-autotune); null = default
    # recompute each block in the backward instead of saving its activations (less memory,
    # about a third more compute; gradients unchanged)
    grad_checkpointing: bool = False
    # ddp: a full model per process (the default, fastest while it fits); fsdp: FSDP2, each
    # block's parameters, gradients and optimizer state sharded over the processes
    # (engine/fsdp.py; pretrain and finetune)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # -- pretraining only: cross-image diagnostics (evaluation/diagnostics.py) on a fixed batch
    # of held-out images of data's eval split, logged as a "diag" row of metrics.jsonl
    diag_every: Optional[int] = 100  # optimizer steps between them; 0 or null = off
    diag_images: int = 64  # held-out images (the largest multiple of K not above it is used)
    # -- fine-tuning and linear probe only
    # fine-tuning: the STAR pretraining checkpoint to start from; linprobe: the checkpoint whose
    # frozen backbone is probed (pretraining or fine-tuned classifier); null = random init
    pretrained: Optional[str] = None
    # -- fine-tuning only
    # a head the pretrained checkpoint lacks is re-drawn trunc-normal with this std (ARM: 2e-5,
    # so fine-tuning starts from near-uniform predictions); null keeps the model's init (0.02)
    head_init_std: Optional[float] = 2e-5
    # head-only fine-tuning: freeze the backbone, train the linear head by SGD through it, with
    # the fine-tuning data pipeline (star-mamba linprobe is the converged probe instead)
    linprobe: bool = False
    ema_decay: Optional[float] = 0.99992  # null = no EMA
    eval_every: int = 1  # epochs between evaluations

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise _bad("run", "amp", self.amp, "allowed: 'auto', 'off', 'bf16', 'fp16'"
                       + did_you_mean(self.amp, ("auto", "off", "bf16", "fp16")))
        if self.parallel not in ("ddp", "fsdp"):
            raise _bad("run", "parallel", self.parallel, "allowed: 'ddp', 'fsdp'"
                       + did_you_mean(self.parallel, ("ddp", "fsdp")))
        if self.seed < 0:
            raise _bad("run", "seed", self.seed, "expected an integer >= 0")
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise _bad("run", "head_init_std", self.head_init_std, "expected a positive std or "
                       "null (keep the model's head init)")
        for name in ("save_every", "save_every_steps", "log_every", "eval_every", "diag_images",
                     "max_nonfinite"):
            if getattr(self, name) <= 0:
                raise _bad("run", name, getattr(self, name), "expected a positive integer")
        if self.keep_last < 0:
            raise _bad("run", "keep_last", self.keep_last, "expected >= 0 (0 keeps all)")
        if self.diag_every is not None and self.diag_every < 0:
            raise _bad("run", "diag_every", self.diag_every, "expected steps >= 1, or 0 / null "
                       "for no diagnostics")
        if self.max_steps is not None and self.max_steps <= 0:
            raise _bad("run", "max_steps", self.max_steps, "expected a positive integer or null")
        if self.threads is not None and self.threads <= 0:
            raise _bad("run", "threads", self.threads, "expected a positive integer or null")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise _bad("run", "ema_decay", self.ema_decay, "expected a decay in (0, 1), or null "
                       "for no EMA")


@dataclass(frozen=True)
class Part:
    """One dataclass whose fields a composed config section holds (:func:`composed_section`)."""

    cls: type
    builder: str  # the section's method that builds ``cls`` from its fields
    prefix: str = ""  # the fields' names in the section: prefix + the dataclass's name
    left_out: tuple[str, ...] = ()  # fields the section does not hold (set elsewhere)


def composed_section(name: str, doc: str, parts: Sequence[Part],
                     extra: Sequence[tuple[str, Any, Any]] = (),
                     check: Optional[Any] = None) -> type:
    """A config section (a dataclass) holding the fields of ``parts``' dataclasses, with their
    types and defaults, so each option is written once, where it is used; ``extra`` are the
    section's own ``(name, type, default)`` fields and ``check(section)`` their checks. Each
    part gets a method ``builder(**given)`` building its dataclass from the section's values
    (and ``given``: the fields left out); building them all at construction checks every value,
    the parts' errors reported as one :class:`ConfigError` line."""
    def fields_of(part: Part):
        return [f for f in dataclasses.fields(part.cls) if f.name not in part.left_out]

    def builder(part: Part):
        def build(self, **given: Any):
            return part.cls(**{f.name: getattr(self, part.prefix + f.name)
                               for f in fields_of(part)}, **given)
        build.__doc__ = f"The :class:`{part.cls.__name__}` this section sets."
        return build

    def post_init(self) -> None:
        if check is not None:
            check(self)
        try:
            for part in parts:
                getattr(self, part.builder)()
        except ValueError as e:  # ConfigError included
            message = str(e)
            raise ConfigError(message if message.startswith("invalid config") else
                              f"invalid config: {name}: {message}") from None

    spec = []
    for part in parts:
        hints = field_types(part.cls)
        for f in fields_of(part):
            default = (field(default=f.default) if f.default is not dataclasses.MISSING
                       else field(default_factory=f.default_factory))
            spec.append((part.prefix + f.name, hints[f.name], default))
    spec += [(n, t, field(default=d)) for n, t, d in extra]
    namespace = {part.builder: builder(part) for part in parts}
    return dataclasses.make_dataclass(f"{name.capitalize()}Options", spec, namespace=dict(
        __post_init__=post_init, __doc__=doc, **namespace))


def _check_segment(self) -> None:
    if self.eval_batch_size is not None and self.eval_batch_size <= 0:
        raise _bad("segment", "eval_batch_size", self.eval_batch_size,
                   "expected a positive integer, or null")
    if self.viz_images < 0:
        raise _bad("segment", "viz_images", self.viz_images, "expected >= 0")


def _check_detect(self) -> None:
    if self.eval_batch_size <= 0 or self.viz_images < 0:
        raise ConfigError("invalid config: detect.eval_batch_size must be > 0 and "
                          "detect.viz_images >= 0")


def _dense_sections() -> tuple[type, type]:
    from ..data.detection import DetectionDataOptions
    from ..evaluation.segmentation import InferenceConfig
    from ..models.detection import DetectorConfig
    from ..models.segmentation import SegmenterConfig
    segment = composed_section(
        "segment", """``segment``: the dense model on the backbone
        (:class:`~star_mamba.models.segmentation.SegmenterConfig`'s fields) and how it is scored
        (:class:`~star_mamba.evaluation.segmentation.InferenceConfig`'s, as ``infer_*``: whole
        or sliding-window inference at the original resolution, multi-scale, flip); read by
        ``star-mamba segment`` only.""",
        [Part(SegmenterConfig, "segmenter_config"),
         Part(InferenceConfig, "inference_config", prefix="infer_")],
        # images per evaluation batch (null: optim.batch_size for scenes, 1 for files);
        # images drawn in predictions.png after each evaluation (0: none)
        [("eval_batch_size", Optional[int], None), ("viz_images", int, 6)], _check_segment)
    detect = composed_section(
        "detect", """``detect``: the detector
        (:class:`~star_mamba.models.detection.DetectorConfig`'s fields, but its own resize, which
        the data transforms do) and how its images are sized and augmented
        (:class:`~star_mamba.data.detection.DetectionDataOptions`' fields, but
        ``max_bad_fraction``, which is ``data``'s); read by ``star-mamba detect`` only.""",
        [Part(DetectorConfig, "detector_config", left_out=("min_size", "max_size")),
         Part(DetectionDataOptions, "data_options", left_out=("max_bad_fraction",))],
        # images per evaluation batch; images drawn in predictions.png (0: none)
        [("eval_batch_size", int, 4), ("viz_images", int, 4)], _check_detect)
    return segment, detect


SegmentOptions, DetectOptions = _dense_sections()

SECTIONS = {"data": DataConfig, "optim": OptimConfig, "run": RunOptions, "probe": ProbeConfig,
            "segment": SegmentOptions, "detect": DetectOptions}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunOptions = field(default_factory=RunOptions)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    segment: Any = field(default_factory=SegmentOptions)  # SegmentOptions
    detect: Any = field(default_factory=DetectOptions)  # DetectOptions
    task: str = "pretrain"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.to_dict()}
        for name in SECTIONS:
            out[name] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, name)).items()}
        out["task"] = self.task
        return out


def from_dict(values: Mapping[str, Any], task: Optional[str] = None) -> RunConfig:
    """Build a RunConfig from nested dicts, rejecting unknown sections and keys.

    ``task`` (one of :data:`TASKS`) is what the caller runs; a config file may name its
    own task, which must then agree.
    """
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"invalid config: expected a mapping of sections, got {values!r}")
    values = dict(values or {})
    named = values.pop("task", None)
    if named is not None and task is not None and named != task:
        raise ConfigError(f"this config is for task {named!r}, not {task!r}: use "
                          f"`star-mamba {named}` or a {task} config (configs/{task}/)")
    task = task or named or "pretrain"
    if task not in TASKS:
        raise ConfigError(f"invalid config: task={task!r}; allowed: {', '.join(TASKS)}")
    for section in values:
        if section not in ("model", *SECTIONS):
            raise ConfigError(f"unknown config section {section!r}"
                              f"{did_you_mean(section, ['model', *SECTIONS])} "
                              f"(sections: model, {', '.join(SECTIONS)}, task)")
    sections = {name: cls(**typed_values(values.get(name) or {}, field_types(cls), name))
                for name, cls in SECTIONS.items()}
    return RunConfig(model=ModelSection.from_values(values.get("model") or {}), task=task,
                     **sections)


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or a built-in name such as ``pretrain/fashion_mnist``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if builtin.is_file():
        return builtin
    available = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))
    raise MissingFileError(f"config {name_or_path!r} is neither a file nor a built-in config "
                            f"(built-in: {', '.join(available)})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"section.key=value"`` -> ``([section, key], value)``, the value read as YAML."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. "
                          "optim.blr=1e-4 or model.global_pool=cls")
    try:
        return parts, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot read the value as YAML "
                          f"({' '.join(str(e).split())})") from None


def load_config(path: Optional[str], overrides: Sequence[str] = (), task: Optional[str] = None,
                base: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Read a YAML config (or a built-in name), or start from ``base`` (a saved run config, as
    in a checkpoint's ``run_config``), and apply ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            with open(resolved) as f:
                values = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config {resolved} is not valid YAML: "
                              f"{' '.join(str(e).split())}") from None
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"config {resolved} must be a mapping of sections "
                              "(model, data, optim, run)")
        if not any(section in (values or {}) for section in ("model", *SECTIONS)):
            raise ConfigError(f"config {resolved} is empty: it holds no sections (model, "
                              f"{', '.join(SECTIONS)}); an empty file would train the library "
                              "defaults. Start from a built-in config (configs/), or leave out "
                              "-c for the command's default")
    elif base is not None:
        values = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for item in overrides:
        (section, key), value = parse_override(item)
        if values.get(section) is None:
            values[section] = {}
        if not isinstance(values[section], dict):
            raise ConfigError(f"override {item!r}: {section!r} is not a section of the config")
        values[section][key] = value
    return from_dict(values, task)


def save_config(cfg: RunConfig, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
