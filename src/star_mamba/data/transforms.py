"""Image transforms of the ARM/STAR recipes (torchvision), with timm's ImageNet statistics."""
from __future__ import annotations

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment
from torchvision import transforms as T


def build_pretrain_transform(img_size: int = 192, scale: tuple[float, float] = (0.2, 1.0),
                             mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> T.Compose:
    """ARM pretraining: RandomResizedCrop (bicubic), horizontal flip, ImageNet normalisation."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def build_full_image_transform(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> T.Compose:
    """The whole image at its own size, ImageNet normalisation: no crop, flip or resize (the
    source image of ``data.sequence=views``, which cuts its own crops)."""
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


class _ToChannels:
    """After timm's RGB pipeline: keep ``in_chans`` channels (1 for grey images)."""

    def __init__(self, in_chans: int):
        self.in_chans = in_chans

    def __call__(self, x):
        return x[: self.in_chans]


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def build_finetune_transform(data, img_size: int, in_chans: int, mean, std) -> T.Compose:
    """timm's fine-tuning pipeline (``create_transform``: RandomResizedCrop with ``data.scale``,
    flip, RandAugment ``data.auto_augment``, random erasing ``data.reprob``) on PIL images,
    converted to RGB first and cut back to ``in_chans`` channels after (grey images)."""
    from timm.data import create_transform
    t = create_transform(img_size, is_training=True, scale=tuple(data.scale),
                         auto_augment=data.auto_augment, interpolation="bicubic",
                         re_prob=data.reprob, re_mode="pixel", re_count=1,
                         mean=tuple(mean) * (3 // len(mean)), std=tuple(std) * (3 // len(std)))
    return T.Compose([T.Lambda(_to_rgb), t, _ToChannels(in_chans)])


def build_eval_transform(img_size: int = 224, crop_pct: float = 0.875,
                         mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> T.Compose:
    """Evaluation: resize the short side to img_size / crop_pct, centre crop, normalise."""
    return T.Compose([
        T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])



def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, keeping 0 bits as a black image, as Pillow < 13 did: Pillow 13 refuses
    0 bits, which RandAugment asks for at magnitude 10 with ``inc1`` (ARM's recipe) and near 0
    without it."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    if auto_augment.NAME_TO_OP.get(_name) is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize
