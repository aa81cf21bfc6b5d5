"""The pretraining dataset a run config asks for, checked against the model config."""
from __future__ import annotations

from torch.utils.data import Dataset, Subset

from ..config import StarConfig
from ..data import DATASETS, build_dataset
from ..data.sequences import build_sequence_dataset
from ..data.transforms import build_full_image_transform, build_pretrain_transform
from ..errors import ConfigError
from .config import DataConfig


def build_pretrain_dataset(data: DataConfig, model: StarConfig, seed: int) -> Dataset:
    """The training set of a pretraining run.

    ``data.sequence='random'`` (the paper's setting) gives the images themselves
    (:func:`build_pretrain_images`): the trainer shuffles images and packs K consecutive ones
    into a sequence. Any other kind gives a :class:`~star_mamba.data.sequences.SequenceDataset`
    whose items are whole sequences of ``model.images_per_sequence`` images drawn from those
    images, with the options ``data`` sets and ``seed`` (``run.seed``) for its draws.
    """
    images = build_pretrain_images(data, model)
    if data.sequence == "random":
        return images
    try:
        return build_sequence_dataset(data.sequence, images, model.images_per_sequence,
                                      model.img_size, model.in_chans, seed,
                                      **data.sequence_options())
    except ValueError as e:  # an option out of range, too few images of a class, ...
        raise ConfigError(f"invalid config: data.sequence={data.sequence!r}: {e}") from None


def build_pretrain_images(data: DataConfig, model: StarConfig) -> Dataset:
    """The images of a pretraining run, as ``(image, label)`` items: Fashion-MNIST (built in),
    an ImageFolder tree, a saved Hugging Face dataset or shards (a :class:`ShardSet`, read as
    a stream) with ARM's transform, or synthetic images.

    The sequence kinds that draw their own geometry get plain images: ``views`` (K crops of
    one image) the whole image, without ARM's crop or Fashion-MNIST's ``augment``; ``clip``
    Fashion-MNIST's raw 28x28 items (read as such whatever ``model.img_size``)."""
    if data.name not in DATASETS:
        raise ValueError(f"invalid config: data.name={data.name!r}; allowed: {', '.join(DATASETS)}")
    own_geometry = data.sequence in ("views", "clip")
    if data.name in RGB_DATASETS:
        check_rgb_data(data, model)
        transform = (build_full_image_transform() if own_geometry
                     else build_pretrain_transform(model.img_size))
        dataset = build_dataset(data.name, root=data.root, split=data.split, transform=transform,
                                **rgb_options(data))
        if data.name == "shards":  # a stream: it takes no Subset
            return dataset.limited(check_max_images(data))
    elif data.name == "fashion_mnist":
        clip = data.sequence == "clip"  # clips read the raw items: any img_size and in_chans
        dataset = build_dataset("fashion_mnist", root=data.root, split=data.split,
                                img_size=28 if clip else model.img_size,
                                in_chans=1 if clip else model.in_chans,
                                augment=data.augment and not own_geometry, download=data.download)
    else:
        dataset = build_dataset("synthetic", num_images=data.synthetic_images,
                                img_size=model.img_size, in_chans=model.in_chans)
    if check_max_images(data) is not None:
        dataset = Subset(dataset, range(min(data.max_images, len(dataset))))
    return dataset


RGB_DATASETS = {"imagefolder": "a directory holding train/ and val/ class folders",
                "shards": "the OUT directory (or URL) of `star-mamba prepare-data SRC OUT`",
                "hf": "a directory written by datasets' save_to_disk"}
"""The datasets of RGB files, and what their ``data.root`` is."""


def check_rgb_data(data: DataConfig, model: StarConfig) -> None:
    """The checks every task makes before reading ImageFolder, shard or HF images (one error
    naming every field at fault)."""
    problems = []
    if data.root is None:
        problems.append(f"data.root is required for data.name={data.name!r} "
                        f"({RGB_DATASETS[data.name]})")
    if model.in_chans != 3:
        problems.append(f"model.in_chans={model.in_chans} but data.name={data.name} images are "
                        "RGB (3 channels)")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def rgb_options(data: DataConfig) -> dict:
    """The dataset options of ``data.name`` beyond root, split and transform."""
    if data.name == "shards":  # unreadable images are judged by the training loop
        return {"shuffle_buffer": data.shuffle_buffer}
    options: dict = {"max_bad_fraction": data.max_bad_fraction}
    if data.name == "hf":
        options.update(image_column=data.image_column, label_column=data.label_column)
    return options


def check_max_images(data: DataConfig):
    """``data.max_images`` (None or > 0)."""
    if data.max_images is not None and data.max_images <= 0:
        raise ConfigError(f"invalid config: data.max_images={data.max_images}; expected > 0")
    return data.max_images
