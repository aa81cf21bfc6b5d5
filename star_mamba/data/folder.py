"""ImageFolder datasets (ImageNet's train/ and val/ layout), decoded with Pillow as RGB."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torchvision.datasets import ImageFolder


def build_image_folder(root: str | Path, split: str = "train",
                       transform: Optional[Callable] = None) -> ImageFolder:
    """``root/split/<class>/<image>``; a missing directory raises FileNotFoundError naming it."""
    directory = Path(root) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist (expected "
                                f"{Path(root)}/{split}/<class>/<images>)")
    return ImageFolder(str(directory), transform=transform)
