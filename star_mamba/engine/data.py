"""The pretraining dataset a run config asks for, checked against the model config."""
from __future__ import annotations

from torch.utils.data import Dataset, Subset

from ..config import StarConfig
from ..data import DATASETS, build_dataset
from ..data.transforms import build_pretrain_transform
from .config import DataConfig


def build_pretrain_dataset(data: DataConfig, model: StarConfig) -> Dataset:
    """Fashion-MNIST (built in), an ImageFolder tree with ARM's transform, or synthetic images."""
    if data.name not in DATASETS:
        raise ValueError(f"invalid config: data.name={data.name!r}; allowed: {', '.join(DATASETS)}")
    if data.name == "imagefolder":
        if model.in_chans != 3:
            raise ValueError(f"invalid config: model.in_chans={model.in_chans} but ImageFolder "
                             "images are RGB (3 channels)")
        if data.root is None:
            raise ValueError("invalid config: data.root is required for data.name='imagefolder' "
                             "(a directory holding train/ and val/ class folders)")
        dataset = build_dataset("imagefolder", root=data.root, split=data.split,
                                transform=build_pretrain_transform(model.img_size),
                                max_bad_fraction=data.max_bad_fraction)
    elif data.name == "fashion_mnist":
        dataset = build_dataset("fashion_mnist", root=data.root, split=data.split,
                                img_size=model.img_size, in_chans=model.in_chans,
                                augment=data.augment, download=data.download)
    else:
        dataset = build_dataset("synthetic", num_images=data.synthetic_images,
                                img_size=model.img_size, in_chans=model.in_chans)
    if data.max_images is not None:
        if data.max_images <= 0:
            raise ValueError(f"invalid config: data.max_images={data.max_images}; expected > 0")
        dataset = Subset(dataset, range(min(data.max_images, len(dataset))))
    return dataset
