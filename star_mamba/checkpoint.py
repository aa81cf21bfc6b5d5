"""Checkpoints: atomic writes, a rolling ``checkpoint-latest.pth`` and numbered epoch copies."""
from __future__ import annotations

import json
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


def prune_numbered(output_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest ``checkpoint-NNNN.pth`` (latest and best are never removed)."""
    numbered = sorted(Path(output_dir).glob("checkpoint-[0-9][0-9][0-9][0-9].pth"))
    for old in numbered[:-keep_last] if keep_last > 0 else []:
        old.unlink()


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
    """Load tensors and plain containers only (``weights_only``): a checkpoint cannot run code.

    ``.safetensors`` files (see :func:`export_safetensors`) load too.
    """
    if Path(path).suffix == ".safetensors":
        return load_safetensors(path)
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


def export_safetensors(checkpoint: Path, out: Path, use_ema: bool = False) -> Path:
    """Write a checkpoint's weights (or its EMA weights) and model config to a .safetensors file."""
    from safetensors.torch import save_file
    saved = load_checkpoint(Path(checkpoint))
    weights = saved["model"]
    if use_ema:
        if "ema" not in saved.get("extras", {}):
            raise ValueError(f"{checkpoint} holds no EMA weights")
        weights = {k[len("module."):]: v for k, v in saved["extras"]["ema"].items()}
    metadata = {"format": "star-mamba", "model_config": json.dumps(saved.get("model_config"))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata=metadata)
    return out


def load_safetensors(path: Path) -> dict[str, Any]:
    """``{"model": weights, "model_config": dict or None}`` from :func:`export_safetensors`."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("model_config", "null"))
        weights = {k: f.get_tensor(k) for k in f.keys()}
    return {"model": weights, "model_config": config}
