"""Checkpoints: atomic writes, a rolling ``checkpoint-latest.pth`` and numbered epoch copies,
and the layout every checkpoint of ours shares (``{"model": weights, "model_config": dict,
...}``): :func:`model_state` and :func:`ema_state` read it; ``models/io.py`` builds the model."""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .errors import CheckpointError, MissingFileError, writing

LATEST = "checkpoint-latest.pth"
BEST = "checkpoint-best.pth"
NUMBERED = "checkpoint-[0-9][0-9][0-9][0-9].pth"

log = logging.getLogger("star_mamba")


def _new_tmp(path: Path) -> tuple[int, str]:
    """A new ``<name>.<random>.tmp`` beside ``path``, opened for writing, with the permissions
    of any new file (0666 less the umask: 0644 under umask 022; tempfile's would be 0600)."""
    while True:
        tmp = str(path.parent / f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _place_copy(src: str, path: Path) -> None:
    """Put the finished file ``src`` at ``path`` too, atomically: a hard link to it (the same
    bytes on disk once), or a copy where the file system refuses links."""
    fd, tmp = _new_tmp(path)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network or FUSE file systems)
            shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: Path, also: Sequence[str | Path] = ()) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    ``also``: more paths (in the same directory) to hold the same checkpoint: it is written
    once and hard-linked there (copied where links fail), each renamed into place as ``path``
    is. A later save replaces a name's directory entry, never the file's bytes, so the other
    names keep what they held. The files have the permissions of any new file (the umask's).

    A full disk, a read-only folder or a file in the way raises an
    :class:`~star_mamba.errors.OutputError` naming ``path``; the temporary file is removed and
    what was at ``path`` is untouched (a process killed mid-write leaves ``*.tmp`` behind: the
    next run removes it, ``engine/outdir.py``)."""
    path = Path(path)
    with writing(path, "checkpoint", f"{path.name} there, if any, is untouched"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_tmp(path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            for other in also:
                _place_copy(tmp, Path(other))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed over ``path``): result files
    of probes, grids and experiments, never half-written."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def prune_numbered(output_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest ``checkpoint-NNNN.pth`` (latest and best are never removed)."""
    numbered = sorted(Path(output_dir).glob(NUMBERED))
    for old in numbered[:-keep_last] if keep_last > 0 else []:
        old.unlink()


def resume_candidates(output_dir: Path) -> list[Path]:
    """The checkpoints auto-resume tries, newest first: ``checkpoint-latest.pth``, then the
    numbered ``checkpoint-NNNN.pth`` by decreasing epoch (those that exist)."""
    output_dir = Path(output_dir)
    latest = output_dir / LATEST
    return ([latest] if latest.is_file() else []) + sorted(output_dir.glob(NUMBERED), reverse=True)


def load_resume(output_dir: Path, resume: str) -> Optional[tuple[Path, dict[str, Any]]]:
    """The checkpoint to resume from and its contents, or None to start from scratch.

    ``never``: None. ``auto``: the newest loadable training checkpoint in ``output_dir``
    (:func:`resume_candidates`); an unreadable one (half written by a crash, say) is skipped
    with a warning naming it and why, and left where it is (the run's next save replaces
    ``latest`` atomically). Checkpoints of which none loads are an error: starting over would
    silently discard the run. Anything else is an explicit path (a file or a run
    directory, :func:`resolve_checkpoint`), which must load.
    """
    if resume == "never":
        return None
    if resume != "auto":
        try:
            path = resolve_checkpoint(resume)
        except MissingFileError as e:
            raise MissingFileError(f"run.resume={resume!r}: {e}") from None
        try:
            return path, load_training_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"run.resume={resume!r}: {e}") from e
    unreadable = []
    for path in resume_candidates(output_dir):
        try:
            saved = load_training_checkpoint(path)
        except CheckpointError as e:
            unreadable.append(str(e))
            log.warning(f"{e}; left in place, trying an older checkpoint")
            continue
        if unreadable:
            log.warning(f"resuming from {path}, the newest checkpoint that loads")
        return path, saved
    if unreadable:
        raise CheckpointError(f"no checkpoint in {output_dir} can be resumed ({'; '.join(unreadable)}); "
                         "set run.resume=PATH to another checkpoint, or run.resume=never to start "
                         "over (the run's saves then replace these files)")
    return None


def find_resume(output_dir: Path, resume: str) -> Optional[Path]:
    """The path :func:`load_resume` picks (``auto``: the newest checkpoint that loads)."""
    found = load_resume(output_dir, resume)
    return found[0] if found is not None else None


def saved_step(path: Path) -> Optional[int]:
    """The optimizer step a training checkpoint was saved at (its ``state``), read without
    loading its tensors (memory-mapped); None when that cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                   ["state"]["step"])
    except Exception:  # unreadable, or not a training checkpoint
        return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``checkpoint-latest.pth``; else a
    :class:`MissingFileError` naming what is missing."""
    path = Path(path)
    if path.is_dir():
        if (path / LATEST).is_file():
            return path / LATEST
        numbered = [p.name for p in sorted(path.glob(NUMBERED))]
        raise MissingFileError(f"{path} is a directory, not a checkpoint, and holds no {LATEST} "
                               "(as a run directory does): give "
                               + (f"one of its checkpoints ({', '.join(numbered)})" if numbered
                                  else "a checkpoint file"))
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} not found")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load tensors and plain containers only (``weights_only``): a checkpoint cannot run code.

    ``path`` is a file or a run directory (its ``checkpoint-latest.pth``, :func:`resolve_checkpoint`);
    ``.safetensors`` files (see :func:`export_safetensors`) load too. An unreadable file raises
    a :class:`CheckpointError` naming it, with the reason in one line (a missing file:
    :class:`MissingFileError`)."""
    path = resolve_checkpoint(path)
    if Path(path).suffix == ".safetensors":
        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that would need arbitrary code
        raise (unsafe_pickle_error(path, e)
               or CheckpointError(f"cannot load checkpoint {path}: {why_unloadable(path, e)}")) from e


def model_state(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], Optional[dict]]:
    """A checkpoint path (``.pth`` or ``.safetensors``), a loaded checkpoint dict or a bare state
    dict -> (the model's state dict, its ``model_config`` dict or None)."""
    if not isinstance(source, Mapping):
        source = load_checkpoint(Path(source))
    if "model" in source and isinstance(source["model"], Mapping):
        return dict(source["model"]), source.get("model_config")
    return dict(source), None


def ema_state(saved: Mapping[str, Any], path: Any = "the checkpoint") -> dict[str, Tensor]:
    """The EMA weights a training checkpoint keeps (``extras.ema``, timm's ``ModelEmaV3`` layout:
    the model under ``module.``), as the model's own state dict."""
    extras = saved.get("extras") or {}
    if "ema" not in extras:
        raise CheckpointError(f"{path} holds no EMA weights (runs with run.ema_decay=null or "
                              "run.linprobe keep none); use the weights without --ema")
    return {k[len("module."):] if k.startswith("module.") else k: v
            for k, v in extras["ema"].items()}


TRAINING_KEYS = ("model", "optimizer", "state", "model_config")


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, checked to be a training checkpoint (not exported weights)."""
    saved = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: not a training checkpoint (no "
                         f"{', '.join(missing)})")
    return saved


def unsafe_pickle_error(path: Path, error: Exception) -> Optional[CheckpointError]:
    """The error to raise when ``torch.load(weights_only=True)`` refused ``path`` because its
    pickle would call something other than tensors and plain containers (code, when loaded),
    saying why and what to do; None when ``error`` is another failure."""
    refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(error), re.S)
    if refused is None:
        return None
    reason = " ".join(refused.group(1).split()).split(". ")[0]  # torch's advice left out
    return CheckpointError(
        f"cannot load checkpoint {path}: it is not a safe checkpoint (torch.load with "
        f"weights_only refused it: {reason}), since loading it would call that code. Load it "
        "only if you trust where it came from, and then re-save just its weights (a state dict "
        "of tensors, or .safetensors) from that trusted copy")


def why_unloadable(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed, in one line (its own messages run to paragraphs)."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return "the file is empty"
    text = str(error).strip()
    text = text.splitlines()[0].split(". ")[0] if text else "the file ends early"
    return f"{type(error).__name__}: {text}"


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                      fields: Optional[Sequence[str]] = None) -> str:
    """``"model.k: checkpoint a vs config b, ..."`` for each of ``fields`` (default: every
    field of ``current`` but the runtime ones) where a checkpoint's model config differs from
    the run's, or ``""``; a field the checkpoint predates counts as its default."""
    from .config import RUNTIME_FIELDS, StarConfig
    defaults = StarConfig().to_dict()
    names = [k for k in current if k not in RUNTIME_FIELDS] if fields is None else fields
    diff = {k: (saved.get(k, defaults.get(k)), current[k]) for k in names
            if saved.get(k, defaults.get(k)) != current[k]}
    return ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())


def check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made for another model configuration.

    Runtime fields (``StarConfig`` fields marked ``runtime``, e.g. ``scan_backend``) may differ;
    a field the checkpoint predates counts as its default."""
    items = model_differences(saved, current)
    if items:
        raise CheckpointError(f"checkpoint {path} was made for another model ({items}); use "
                              "another run.output_dir or set run.resume=never")


def export_safetensors(checkpoint: Path, out: Path, use_ema: bool = False) -> Path:
    """Write a checkpoint's weights (or its EMA weights), model config and run config (when it
    has one: ``eval`` then scores it on its run's data) to a .safetensors file. ``checkpoint``:
    a file or a run directory (its ``checkpoint-latest.pth``)."""
    from safetensors.torch import save_file
    checkpoint = resolve_checkpoint(checkpoint)
    saved = load_checkpoint(checkpoint)
    if not isinstance(saved, dict) or "model" not in saved:
        raise CheckpointError(f"{checkpoint} is not a star-mamba checkpoint (no 'model' weights)")
    weights = ema_state(saved, checkpoint) if use_ema else saved["model"]
    metadata = {"format": "star-mamba", "model_config": json.dumps(saved.get("model_config"))}
    if saved.get("run_config") is not None:
        metadata["run_config"] = json.dumps(saved["run_config"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata=metadata)
    return out


def load_safetensors(path: Path) -> dict[str, Any]:
    """``{"model": weights, "model_config": dict or None}`` from :func:`export_safetensors`,
    with ``"run_config"`` when the file holds one."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    out = {"model": weights, "model_config": json.loads(metadata.get("model_config", "null"))}
    if metadata.get("run_config") is not None:
        out["run_config"] = json.loads(metadata["run_config"])
    return out
