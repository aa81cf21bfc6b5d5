"""Run configuration: YAML files plus ``--set section.key=value`` overrides.

A run config has five sections: ``model`` (a size ``name`` plus any :class:`StarConfig` field),
``data``, ``optim``, ``run`` and ``probe`` (the dataclasses below; each lists every field any
task reads, with a comment on which task reads it). Every section is checked by the same helper,
:func:`star_mamba.config.typed_values`: unknown keys fail with a "did you mean" hint and values
are converted to the field's type ('1e-1' -> 0.1 for a float, a list for a tuple, null for an
Optional) before anything runs. The resolved config is written next to every run's outputs.

Where defaults live:

* ``model``: StarConfig's field defaults (``star_mamba/config.py``), then the size's embed_dim and
  depth (``models.registry.MODEL_SIZES``), then the YAML file and ``--set``. ``num_classes`` left
  unset follows the dataset when fine-tuning.
* ``data`` / ``optim`` / ``run``: the dataclass defaults below (STAR pretraining's values for the
  fields every task reads, ARM fine-tuning's for the fields only fine-tuning reads), then the YAML
  file and ``--set``. ``probe`` (read by ``linprobe`` only): the protocol's defaults below.
  Each task's recipe is its YAML file under ``configs/`` (``pretrain/``, ``finetune/``,
  ``linprobe/``): a new config should start from a copy of one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..config import StarConfig, did_you_mean, field_types, typed_values
from ..data.sequences import SEQUENCE_KINDS, SEQUENCE_OPTIONS
from ..errors import ConfigError
from ..models.registry import model_config
from .probe import POOLS, PRECISIONS, WEIGHT_DECAYS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

TASKS = ("pretrain", "finetune", "linprobe")
"""``finetune`` covers fine-tuning (and head-only fine-tuning, ``run.linprobe``) and evaluation;
``linprobe`` is the converged probe of a frozen backbone (``engine/linprobe.py``)."""


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


# data.<field> -> the option of data.sequences.build_sequence_dataset it sets.
SEQUENCE_FIELDS = {"num_sequences": "num_sequences", "view_scale": "scale", "view_ratio": "ratio",
                   "view_flip": "flip_prob", "clip_canvas": "canvas_size", "clip_items": "num_items",
                   "clip_speed": "speed", "clip_per_epoch": "per_epoch"}
CLIP_DATASETS = ("fashion_mnist", "synthetic")  # the data.name values data.sequence=clip takes


@dataclass
class DataConfig:
    """``data``. All tasks read the first group; the marked fields only one kind of task."""

    # fashion_mnist | imagefolder | shards (star-mamba prepare-data's OUT, streamed) | hf (a
    # saved Hugging Face dataset) | synthetic (pretraining only)
    name: str = "fashion_mnist"
    root: Optional[str] = None  # dataset directory (shards: or URL); None searches the usual places
    split: str = "train"  # the training split
    num_workers: int = 2
    download: bool = False  # fetch Fashion-MNIST with torchvision if it is nowhere on disk
    max_images: Optional[int] = None  # use only the first N training images (quick runs)
    max_bad_fraction: float = 0.01  # imagefolder, shards, hf: stop past this share unreadable
    shuffle_buffer: int = 1000  # shards: samples in each worker's shuffle buffer (0: none)
    image_column: str = "image"  # hf: the column holding the images
    label_column: str = "label"  # hf: the column holding the class indices
    # -- pretraining only
    augment: bool = False  # light flips/shifts for the built-in data (ImageFolder always augments)
    synthetic_images: int = 2048  # size of the synthetic dataset
    # What one sequence of K images packs (data/sequences.py): random (the paper's: K images of
    # the shuffled dataset) | same_class | views (K crops of one image) | clip (K frames of a
    # moving Fashion-MNIST clip; data.name fashion_mnist or synthetic). views and clip draw
    # their own geometry: data.augment and ImageFolder's crops do not apply to them.
    sequence: str = "random"
    # The kinds' options; null is the kind's default. Each is read by the kinds named.
    num_sequences: Optional[int] = None  # same_class, views, clip: per epoch (null: images // K)
    view_scale: Optional[tuple[float, float]] = None  # views: crop area range (0.2, 1.0)
    view_ratio: Optional[tuple[float, float]] = None  # views: crop aspect range (3/4, 4/3)
    view_flip: Optional[float] = None  # views: horizontal flip probability (0.5)
    clip_canvas: Optional[int] = None  # clip: canvas side in pixels (64), resized to img_size
    clip_items: Optional[tuple[int, int]] = None  # clip: min, max items per clip (1, 2)
    clip_speed: Optional[tuple[float, float]] = None  # clip: canvas pixels per frame (2, 5)
    clip_per_epoch: Optional[bool] = None  # clip: new clips every epoch (false: fixed clips)
    # -- fine-tuning, linear probe and eval only
    eval_split: Optional[str] = None  # null: 'val' (imagefolder, shards), 'test' (fashion_mnist, hf)
    max_eval_images: Optional[int] = None
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; null = off
    reprob: float = 0.25  # random erasing probability
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre crop

    def __post_init__(self) -> None:
        if self.sequence not in SEQUENCE_KINDS:
            raise ConfigError(f"invalid config: data.sequence={self.sequence!r}"
                              f"{did_you_mean(self.sequence, SEQUENCE_KINDS)} "
                              f"(allowed: {', '.join(SEQUENCE_KINDS)})")
        for name, option in SEQUENCE_FIELDS.items():
            if getattr(self, name) is not None and option not in SEQUENCE_OPTIONS[self.sequence]:
                readers = [k for k in SEQUENCE_KINDS if option in SEQUENCE_OPTIONS[k]]
                raise ConfigError(f"invalid config: data.{name} is read only by data.sequence="
                                  f"{', '.join(readers)}, not {self.sequence!r}; set it to null")
        if self.name == "shards" and self.sequence != "random":
            raise ConfigError(f"invalid config: data.sequence={self.sequence!r} draws images by "
                              "index, which a stream of shards cannot serve; data.name=shards "
                              "takes data.sequence=random (K consecutive images of the shuffled "
                              "stream), or use data.name=imagefolder or hf")
        if self.sequence == "clip" and self.name not in CLIP_DATASETS:
            raise ConfigError(f"invalid config: data.sequence='clip' moves Fashion-MNIST items (or "
                              f"synthetic images) on a canvas; data.name={self.name!r} is neither "
                              f"(allowed: {', '.join(CLIP_DATASETS)})")

    def sequence_options(self) -> dict[str, Any]:
        """The options of ``build_sequence_dataset`` that this config sets (not null)."""
        return {option: getattr(self, name) for name, option in SEQUENCE_FIELDS.items()
                if getattr(self, name) is not None}

    @property
    def resolved_eval_split(self) -> str:
        """``eval_split``, or the split the dataset keeps for evaluation when it is unset."""
        if self.eval_split is not None:
            return self.eval_split
        return "val" if self.name in ("imagefolder", "shards") else "test"


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
    # -- fine-tuning only
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5


@dataclass
class RunOptions:
    """``run``: where, how and how long. Runtime fields (device, amp, threads, compile, ...) may
    change between a run and its resume."""

    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | off | bf16 | fp16
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
    compile: bool = False  # torch.compile the model for training and evaluation
    compile_mode: Optional[str] = None  # torch.compile mode (e.g. max-autotune); null = default
    # -- pretraining only: cross-image diagnostics (engine/diagnostics.py) on a fixed batch of
    # held-out images of data's eval split, logged as a "diag" row of metrics.jsonl
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


@dataclass
class ProbeConfig:
    """``probe``: the converged linear probe and k-NN of ``star-mamba linprobe`` (and of
    ``ablate``'s default probe); ``engine/probe.py`` describes the protocol. The device, autocast,
    threads and seed (of the held-out split and of a random backbone) are ``run``'s; the
    images are ``data``'s (no augmentation: the evaluation transform for both splits)."""

    pool: str = "avg"  # avg (mean of the patch tokens) | cls (the class token, if there is one)
    layers: Optional[tuple[int, ...]] = None  # 1-based blocks, pooled and concatenated; null = last
    batch_size: int = 256  # images per forward pass while extracting features
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS  # the L2 sweep (on standardised features)
    heldout_fraction: float = 0.1  # stratified share of the training set that picks the decay
    max_iter: int = 1000  # L-BFGS iterations per fit
    tolerance: float = 1e-4  # a fit is converged when max |gradient| is below this
    precision: str = "float64"  # float64 | float32: the logistic regression's arithmetic
    knn_k: int = 20  # neighbours of the k-NN vote (cosine similarity)
    knn_temperature: Optional[float] = 0.07  # vote weight exp(sim / T); null = plain majority
    cache_features: bool = True  # keep the features in run.output_dir for a re-run

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ConfigError:
            value = getattr(self, name)
            shown = list(value) if isinstance(value, tuple) else value  # as it was written
            return ConfigError(f"invalid config: probe.{name}={shown!r}; {what}")
        if self.pool not in POOLS:
            raise bad("pool", f"allowed: {', '.join(POOLS)}{did_you_mean(self.pool, POOLS)}")
        if self.layers is not None and (not self.layers or min(self.layers) < 1):
            raise bad("layers", "expected 1-based block indices, e.g. [6, 12], or null for the "
                                "last block")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise bad("weight_decays", "expected a non-empty list of values >= 0")
        if not 0 < self.heldout_fraction < 1:
            raise bad("heldout_fraction", "expected a fraction in (0, 1)")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"allowed: {', '.join(PRECISIONS)}")
        for name in ("batch_size", "max_iter", "knn_k"):
            if getattr(self, name) < 1:
                raise bad(name, "expected a positive integer")
        if not self.tolerance > 0:
            raise bad("tolerance", "expected a number > 0")
        if self.knn_temperature is not None and not self.knn_temperature > 0:
            raise bad("knn_temperature", "expected a number > 0, or null for a plain majority")


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "run": RunOptions, "probe": ProbeConfig}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunOptions = field(default_factory=RunOptions)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
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
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a built-in config "
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
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {resolved} is not valid YAML: "
                              f"{' '.join(str(e).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {resolved} must be a mapping of sections "
                              "(model, data, optim, run)")
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
