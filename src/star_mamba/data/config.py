"""``data``: the run config section every task reads, checked when it is built.

Its fields are typed (``star_mamba.config.typed_values`` converts and checks ``--set`` values
against the annotations, ``Literal`` choices included) and :meth:`DataConfig.__post_init__`
checks what one field says about another, against the dataset's :class:`~.specs.DatasetSpec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from ..config import did_you_mean
from ..errors import ConfigError
from .scenes import SceneOptions
from .sequences import SEQUENCE_KINDS, SEQUENCE_OPTIONS
from .specs import SPECS

# data.<field> -> the option of data.sequences.build_sequence_dataset it sets.
SEQUENCE_FIELDS = {"num_sequences": "num_sequences", "view_scale": "scale", "view_ratio": "ratio",
                   "view_flip": "flip_prob", "clip_canvas": "canvas_size", "clip_items": "num_items",
                   "clip_speed": "speed", "clip_per_epoch": "per_epoch"}

DatasetName = Literal["fashion_mnist", "imagefolder", "shards", "hf", "synthetic", "scenes",
                      "ade20k", "seg_folder", "coco"]
SceneSource = Literal["auto", "fashion_mnist", "shapes"]
LABEL_VALUES = 256  # segmentation masks are 8-bit: data.ignore_index is one of these values
SequenceKind = Literal["random", "same_class", "views", "clip"]


@dataclass
class DataConfig:
    """``data``. All tasks read the first group; the marked fields only one kind of task."""

    # fashion_mnist | imagefolder | shards (star-mamba prepare-data's OUT, streamed) | hf (a
    # saved Hugging Face dataset) | synthetic (pretraining only) | scenes, ade20k, seg_folder
    # (segmentation only: `star-mamba segment`); what each is: data/specs.py
    name: DatasetName = "fashion_mnist"
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
    sequence: SequenceKind = "random"
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
    eval_split: Optional[str] = None  # null: the dataset's (data/specs.py: val or test)
    max_eval_images: Optional[int] = None
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; null = off
    reprob: float = 0.25  # random erasing probability
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre crop
    # -- segmentation only (data.name scenes | ade20k | seg_folder; data/seg_transforms.py)
    # resize target (long, short side) scaled by a ratio drawn from seg_ratio in training, as
    # is at evaluation (image only); null: the image's own size (the ADE20K recipe: [2048, 512])
    seg_base_scale: Optional[tuple[int, int]] = None
    seg_ratio: tuple[float, float] = (0.5, 2.0)  # training resize ratio range
    cat_max_ratio: float = 0.75  # training crop: most frequent class below this share (1: off)
    hflip: float = 0.5  # training horizontal flip probability
    photometric: bool = True  # training brightness/contrast (RGB: saturation/hue) distortion
    ignore_index: int = 255  # mask label of ignored pixels (not a class)
    reduce_zero_label: Optional[bool] = None  # 0 -> ignore, v -> v - 1; null: the dataset's
    scene_images: int = 8000  # scenes: images per split (data.max_*images cut them)
    scene_canvas: int = 64  # scenes: canvas side in pixels
    scene_items: tuple[int, int] = (2, 4)  # scenes: min, max items per scene
    scene_scale: tuple[float, float] = (0.7, 1.6)  # scenes: item side / the 28 px source item
    # scenes: item source; auto = Fashion-MNIST when found (data.root or the usual places),
    # else generated shapes with a warning
    scene_source: SceneSource = "auto"

    def __post_init__(self) -> None:
        if self.name not in SPECS:  # constructed directly, not through typed_values
            raise ConfigError(f"invalid config: data.name={self.name!r}"
                              f"{did_you_mean(self.name, SPECS)} (allowed: {', '.join(SPECS)})")
        if self.sequence not in SEQUENCE_KINDS:
            raise ConfigError(f"invalid config: data.sequence={self.sequence!r}"
                              f"{did_you_mean(self.sequence, SEQUENCE_KINDS)} "
                              f"(allowed: {', '.join(SEQUENCE_KINDS)})")
        for name, option in SEQUENCE_FIELDS.items():
            if getattr(self, name) is not None and option not in SEQUENCE_OPTIONS[self.sequence]:
                readers = [k for k in SEQUENCE_KINDS if option in SEQUENCE_OPTIONS[k]]
                raise ConfigError(f"invalid config: data.{name} is read only by data.sequence="
                                  f"{', '.join(readers)}, not {self.sequence!r}; set it to null")
        spec = SPECS[self.name]
        if spec.task_kind == "segmentation" and self.sequence != "random":
            raise ConfigError(f"invalid config: data.sequence={self.sequence!r} packs pretraining "
                              f"sequences, but data.name={self.name} is a segmentation dataset "
                              "(read by `star-mamba segment`); leave data.sequence=random")
        if self.sequence not in spec.sequences:
            if not spec.random_access:
                raise ConfigError(
                    f"invalid config: data.sequence={self.sequence!r} draws images by index, "
                    f"which a stream of {self.name} cannot serve; data.name={self.name} takes "
                    f"data.sequence={', '.join(spec.sequences)} (K consecutive images of the "
                    "shuffled stream), or use data.name=imagefolder or hf")
            servers = [n for n, s in SPECS.items() if self.sequence in s.sequences]
            raise ConfigError(f"invalid config: data.sequence={self.sequence!r} moves Fashion-MNIST "
                              f"items (or synthetic images) on a canvas; data.name={self.name!r} is "
                              f"neither (allowed: {', '.join(servers)})")
        for name in ("max_images", "max_eval_images", "num_sequences"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"invalid config: data.{name}={getattr(self, name)}; expected "
                                  "a positive number, or null for all")
        if self.num_workers < 0 or self.synthetic_images <= 0:
            raise ConfigError("invalid config: data.num_workers must be >= 0 and "
                              "data.synthetic_images > 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"invalid config: data.max_bad_fraction={self.max_bad_fraction}; "
                              "expected a fraction in [0, 1]")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"invalid config: data.crop_pct={self.crop_pct}; expected (0, 1]")
        self._check_segmentation()

    def _check_segmentation(self) -> None:
        """The segmentation fields' ranges (they are checked whatever data.name is)."""
        if self.seg_base_scale is not None and (len(self.seg_base_scale) != 2
                                                or min(self.seg_base_scale) <= 0):
            raise ConfigError(f"invalid config: data.seg_base_scale={self.seg_base_scale}; "
                              "expected [long, short] positive sides (e.g. [2048, 512]) or null")
        lo, hi = self.seg_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"invalid config: data.seg_ratio={list(self.seg_ratio)}; expected "
                              "[min, max] with 0 < min <= max (e.g. [0.5, 2.0])")
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError(f"invalid config: data.cat_max_ratio={self.cat_max_ratio}; "
                              "expected (0, 1] (1: no check)")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"invalid config: data.hflip={self.hflip}; expected [0, 1]")
        if not 0 <= self.ignore_index < LABEL_VALUES:
            raise ConfigError(f"invalid config: data.ignore_index={self.ignore_index}; masks are "
                              f"8-bit, expected 0..{LABEL_VALUES - 1}")
        if self.scene_images <= 0:
            raise ConfigError(f"invalid config: data.scene_images={self.scene_images}; expected "
                              "a positive number")
        try:
            self.scene_options()
        except ValueError as e:  # SceneOptions names its field: items=..., canvas=...
            raise ConfigError(f"invalid config: data.scene_{e}") from None

    def scene_options(self) -> SceneOptions:
        """The :class:`~.scenes.SceneOptions` that the ``data.scene_*`` fields set."""
        return SceneOptions(canvas=self.scene_canvas, items=tuple(self.scene_items),
                            scale=tuple(self.scene_scale), source=self.scene_source)

    def sequence_options(self) -> dict[str, Any]:
        """The options of ``build_sequence_dataset`` that this config sets (not null)."""
        return {option: getattr(self, name) for name, option in SEQUENCE_FIELDS.items()
                if getattr(self, name) is not None}

    @property
    def spec(self):
        """The dataset's :class:`~.specs.DatasetSpec`."""
        return SPECS[self.name]

    @property
    def resolved_eval_split(self) -> str:
        """``eval_split``, or the split the dataset keeps for evaluation when it is unset."""
        if self.eval_split is not None:
            return self.eval_split
        return self.spec.eval_split or "test"
