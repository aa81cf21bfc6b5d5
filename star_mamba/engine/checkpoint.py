"""Checkpoints: atomic writes, a rolling ``checkpoint-latest.pth`` and numbered epoch copies."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

LATEST = "checkpoint-latest.pth"
BEST = "checkpoint-best.pth"


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def find_resume(output_dir: Path, resume: str) -> Optional[Path]:
    """``auto``: the latest checkpoint in ``output_dir`` if any; ``never``; or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = Path(output_dir) / LATEST
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume={resume!r}: no such checkpoint file")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load tensors and plain containers only (``weights_only``): a checkpoint cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that would need arbitrary code
        raise ValueError(f"cannot load checkpoint {path}: {e}") from e


def check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made for another model configuration."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        items = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} was made for another model ({items}); use another "
                         "run.output_dir or set run.resume=never")
