"""Run configuration: YAML files plus ``--set section.key=value`` overrides.

A run config has four sections. ``model`` holds a model ``name`` and any :class:`StarConfig`
field; ``data``, ``optim`` and ``run`` are the dataclasses below. Unknown keys are errors with a
"did you mean" hint; the resolved config is written next to every run's outputs.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import field_names as model_field_names
from ..models.registry import MODEL_SIZES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | imagefolder | synthetic
    root: Optional[str] = None  # dataset directory; None searches the usual places
    split: str = "train"
    num_workers: int = 2
    augment: bool = False  # light flips/shifts for the built-in data (ImageFolder always augments)
    download: bool = False  # fetch Fashion-MNIST with torchvision if it is nowhere on disk
    max_images: Optional[int] = None  # use only the first N images (quick runs)
    synthetic_images: int = 2048  # size of the synthetic dataset
    max_bad_fraction: float = 0.01  # ImageFolder: stop if more than this share is unreadable


@dataclass
class OptimConfig:
    batch_size: int = 64  # images per process per step (B*K), must be divisible by K
    accum_iter: int = 1
    blr: float = 1.5e-4  # base lr: lr = blr * effective batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 10
    warmup_epochs: float = 1.0
    clip_grad: Optional[float] = 3.0


@dataclass
class RunOptions:
    output_dir: str = "runs/pretrain"
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


@dataclass
class FinetuneData(DataConfig):
    eval_split: str = "test"  # test (Fashion-MNIST) or val (ImageFolder)
    max_eval_images: Optional[int] = None
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; null = off
    reprob: float = 0.25  # random erasing probability
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre crop


@dataclass
class FinetuneOptim(OptimConfig):
    blr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100
    warmup_epochs: float = 5.0
    clip_grad: Optional[float] = None
    layer_decay: Optional[float] = 0.65  # layer-wise lr decay; null = off
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5


@dataclass
class FinetuneRun(RunOptions):
    output_dir: str = "runs/finetune"
    pretrained: Optional[str] = None  # STAR pretraining checkpoint to start from; null = scratch
    linprobe: bool = False  # freeze the backbone, train only the linear head
    ema_decay: Optional[float] = 0.99992  # null = no EMA
    eval_every: int = 1  # epochs between evaluations


TASKS = {
    "pretrain": {"data": DataConfig, "optim": OptimConfig, "run": RunOptions},
    "finetune": {"data": FinetuneData, "optim": FinetuneOptim, "run": FinetuneRun},
}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "star_tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunOptions = field(default_factory=RunOptions)
    task: str = "pretrain"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for section in out.values():
            if isinstance(section, dict):
                for key, value in section.items():
                    if isinstance(value, tuple):
                        section[key] = list(value)
        return out

    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}




def _unknown(key: str, valid: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {where}{key!r}{hint} (valid: {', '.join(valid)})")


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check and convert one value against its field's type, so that '--set optim.blr=abc'
    fails here rather than mid-run."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    base = typing.get_origin(base) or base
    where = f"config {section}.{key}={value!r}"
    if value is None:
        if not optional:
            raise ValueError(f"{where}: a value is required")
        return None
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
    elif base in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number")
        if base is int:
            if value != int(value):
                raise ValueError(f"{where}: expected an integer")
            value = int(value)
        else:
            value = float(value)
    elif base is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list")
        value = tuple(float(v) for v in value)
    elif base is str and not isinstance(value, str):
        if isinstance(value, bool):  # YAML 1.1 reads off/on/yes/no as booleans
            value = "on" if value else "off"
        value = str(value)
    return value


def from_dict(values: dict[str, Any], task: Optional[str] = None) -> RunConfig:
    """Build a RunConfig from nested dicts, rejecting unknown sections and keys.

    ``task`` (``pretrain`` or ``finetune``) picks the section classes; a config file may name
    its own task, which must then agree.
    """
    values = dict(values or {})
    named = values.pop("task", None)
    if named is not None and task is not None and named != task:
        raise ValueError(f"this config is for task {named!r}, not {task!r}")
    task = task or named or "pretrain"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    sections = TASKS[task]
    cfg = RunConfig(data=sections["data"](), optim=sections["optim"](), run=sections["run"](),
                    task=task)
    for section in values:
        if section not in ("model", *sections):
            raise _unknown(section, ["model", *sections], "section ")
    model = dict(values.get("model") or {})
    valid_model = ["name", *model_field_names()]
    for key in model:
        if key not in valid_model:
            raise _unknown(key, valid_model, "model.")
    model.setdefault("name", "star_tiny")
    if model["name"] not in MODEL_SIZES:
        raise _unknown(model["name"], list(MODEL_SIZES), "model.name=")
    cfg.model = model
    for section, cls in sections.items():
        given = dict(values.get(section) or {})
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(cls)
        for key, value in given.items():
            if key not in hints:
                raise _unknown(key, list(hints), f"{section}.")
            setattr(obj, key, _coerce(section, key, value, hints[key]))
    return cfg


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
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. optim.blr=1e-4")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def load_config(path: Optional[str], overrides: list[str] = (),
                task: Optional[str] = None) -> RunConfig:
    """Read a YAML config (or a built-in name) and apply ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(resolve_config_path(path)) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config {path!r} must be a mapping of sections")
    for item in overrides:
        (section, key), value = parse_override(item)
        values.setdefault(section, {})
        if values[section] is None:
            values[section] = {}
        values[section][key] = value
    return from_dict(values, task)


def save_config(cfg: RunConfig, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
