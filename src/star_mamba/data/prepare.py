"""``star-mamba prepare-data SRC OUT``: every split of an ImageFolder tree as pre-resized shards.

Each split folder ``SRC/<split>/`` (``train/``, ``val/`` ...: a folder of class folders, read
as torchvision's ImageFolder reads it: the same files, the same class indices) becomes
``OUT/<split>/shard-NNNNNN.tar`` (WebDataset layout: ``<key>.jpg``, the image as 8-bit RGB
re-encoded as JPEG with its short side at ``short_side`` (never enlarged), and ``<key>.cls``,
its class index) and ``OUT/<split>/index.json`` (read by ``data/shards.py``).

* The files are shuffled (``seed``) before they are cut into shards, so that each shard holds
  a sample of every class and a reader's shuffle buffer mixes classes from the first batch.
* ``shard_size`` (bytes) is a target: a shard holds a fixed number of images, estimated from
  the first images re-encoded; the index records each shard's actual bytes.
* Odd images (grey, RGBA, palette, 16-bit, tiny) are converted as the ImageFolder reader
  converts them (``folder.load_rgb``); unreadable ones are skipped, named in the output and
  listed in the index (``skipped``).
* Shards are written in parallel by ``workers`` processes, each to a temporary file renamed
  when complete, with a record in ``OUT/<split>/.progress/``. Interrupted and run again with
  the same arguments, it keeps the finished shards and writes the rest; a split whose index
  exists is checked (every shard present with its recorded size) and left alone. Asked for
  other options or files over an unfinished or finished split, it refuses instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..errors import UserError
from .folder import load_rgb
from .shards import INDEX_FILE, INDEX_FORMAT, INDEX_VERSION, LABEL_KEY

PROGRESS_DIR = ".progress"
ESTIMATE_IMAGES = 32  # images re-encoded to estimate the bytes of one sample
TAR_OVERHEAD = 2 * 512 + 512  # per sample: two member headers, padding of the last blocks


@dataclass(frozen=True)
class PrepareOptions:
    """What ``prepare-data`` makes of each image and how it cuts shards (saved in the index)."""

    short_side: int = 256  # pixels; 0 keeps every image at its size
    shard_size: int = 128 * 2 ** 20  # target bytes per shard
    quality: int = 90  # JPEG quality of the re-encoded images
    seed: int = 0  # shuffle of the files before sharding

    def check(self) -> None:
        if self.short_side < 0:
            raise UserError(f"--short-side {self.short_side}: expected pixels > 0, or 0 to keep "
                            "the images' own size")
        if self.shard_size < 1024:
            raise UserError(f"--shard-size {self.shard_size}: expected at least 1024 bytes "
                            "(e.g. 128MiB)")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality}: expected 1..100")


def parse_size(text: str) -> int:
    """Bytes from ``134217728``, ``128MiB``, ``100MB``, ``1.5G`` (K/M/G: powers of 1000 with a
    B, of 1024 with iB or alone)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b?)\s*", str(text), re.I)
    if not m:
        raise UserError(f"--shard-size {text!r}: expected bytes, e.g. 134217728, 128MiB or 100MB")
    number, prefix, unit = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    base = 1000 if unit == "b" else 1024
    return int(number * base ** (" kmgt".index(prefix) if prefix else 0))


# ------------------------------------------------------------------------------ one image

def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """The image with its short side at ``short_side`` (bicubic, antialiased), aspect kept;
    images already that small, and ``short_side=0``, are returned as they are."""
    w, h = img.size
    if short_side <= 0 or min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    if w <= h:
        size = (short_side, max(1, round(h * scale)))
    else:
        size = (max(1, round(w * scale)), short_side)
    return img.resize(size, Image.Resampling.BICUBIC)


def encode_image(path: str, options: PrepareOptions) -> bytes:
    """The file as 8-bit RGB (ImageFolder's conversion), resized, as JPEG bytes; raises on a
    file that does not decode."""
    img = resize_short_side(load_rgb(path), options.short_side)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=options.quality)
    return out.getvalue()


# ------------------------------------------------------------------------------ listing

def find_splits(src: Path) -> list[str]:
    """The split folders of ``src``: its sub-folders that hold class folders."""
    if not src.is_dir():
        raise UserError(f"SRC {src} is not a directory (expected SRC/<split>/<class>/<images>)")
    splits = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")
                    and any(c.is_dir() for c in d.iterdir()))
    if not splits:
        raise UserError(f"SRC {src} holds no split folders (expected SRC/train/<class>/<images>, "
                        "SRC/val/..., one folder of class folders per split)")
    return splits


def list_split(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, class index)]) as ImageFolder lists them (sorted, its extensions)."""
    classes, class_to_idx = find_classes(str(directory))
    return classes, make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS,
                                 allow_empty=True)


def listing_digest(directory: Path, samples: list[tuple[str, int]]) -> str:
    """A fingerprint of the listing (relative paths and labels): a resumed run must see the
    same files."""
    h = hashlib.sha1()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, directory)}\t{label}\n".encode())
    return h.hexdigest()


def estimate_per_shard(files: list[tuple[str, int]], options: PrepareOptions) -> int:
    """Images per shard for ``options.shard_size``, from the first readable images re-encoded."""
    sizes = []
    for path, _ in files:
        try:
            sizes.append(len(encode_image(path, options)) + TAR_OVERHEAD)
        except Exception:  # skipped later, with its reason
            continue
        if len(sizes) == ESTIMATE_IMAGES:
            break
    return max(1, int(options.shard_size // (np.mean(sizes) if sizes else TAR_OVERHEAD)))


# ------------------------------------------------------------------------------ one shard

def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class ShardTask:
    out: str  # OUT/<split>
    number: int
    files: list[tuple[int, str, int]]  # (key number, path, class index)
    options: PrepareOptions


def write_shard(task: ShardTask) -> dict:
    """Write one shard (temporary file, then renamed) and its progress record; returns the
    record: name, samples, bytes, skipped files with their reasons."""
    out, name = Path(task.out), shard_name(task.number)
    tmp = out / (name + ".tmp")
    skipped, samples = [], 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, path, label in task.files:
                try:
                    data = encode_image(path, task.options)
                except Exception as e:  # truncated, not an image, empty, unreadable, ...
                    skipped.append({"path": path, "reason": f"{type(e).__name__}: {e}"})
                    continue
                _add_member(tar, f"{key:09d}.jpg", data)
                _add_member(tar, f"{key:09d}.{LABEL_KEY}", str(label).encode())
                samples += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    record = {"name": name, "samples": samples, "bytes": (out / name).stat().st_size,
              "skipped": skipped}
    _atomic_write_text(out / PROGRESS_DIR / f"{name}.json", json.dumps(record))
    return record


# ------------------------------------------------------------------------------ one split

def _finished(out: Path, record: Optional[dict]) -> bool:
    path = out / record["name"] if record else None
    return path is not None and path.is_file() and path.stat().st_size == record["bytes"]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_split(src: Path, out: Path, options: PrepareOptions, workers: int = 1,
                  echo: Callable[[str], None] = print) -> Optional[dict]:
    """Shard one split folder ``src`` into ``out``; returns its index (None: no images)."""
    split = src.name
    classes, listed = list_split(src)
    if not listed:
        echo(f"{split}: no images in {src}, skipped")
        return None
    digest = listing_digest(src, listed)
    plan = {"source": str(src.resolve()), "files": len(listed), "digest": digest,
            "options": asdict(options)}
    records = _resume_records(out, plan)
    if records is None:  # a finished split, intact
        index = json.loads((out / INDEX_FILE).read_text())
        echo(f"{split}: already prepared ({index['num_samples']} images in "
             f"{len(index['shards'])} shards), kept")
        return index
    order = np.random.default_rng(options.seed).permutation(len(listed))
    files = [(int(key), *listed[i]) for key, i in enumerate(order)]
    per_shard = plan.get("per_shard") or estimate_per_shard([f[1:] for f in files], options)
    plan["per_shard"] = per_shard
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / PROGRESS_DIR / "plan.json", json.dumps(plan))
    for name, record in records.items():  # resumed from an index: its records become progress
        _atomic_write_text(out / PROGRESS_DIR / f"{name}.json", json.dumps(record))
    (out / INDEX_FILE).unlink(missing_ok=True)  # written again once every shard is
    count = -(-len(files) // per_shard)
    todo = [ShardTask(str(out), k, files[k * per_shard:(k + 1) * per_shard], options)
            for k in range(count) if not _finished(out, records.get(shard_name(k)))]
    kept = count - len(todo)
    echo(f"{split}: {len(files)} files, {len(classes)} classes -> {count} "
         f"shard{'s' if count != 1 else ''} of up to {per_shard} images"
         + (f" ({kept} already written, kept)" if kept else ""))
    for record in _run(todo, workers):
        records[record["name"]] = record
        for bad in record["skipped"]:
            echo(f"{split}: skipped unreadable {bad['path']} ({bad['reason']})")
        echo(f"{split}: wrote {record['name']} ({record['samples']} images, "
             f"{record['bytes'] / 2 ** 20:.1f} MiB)")
    shards = [records[shard_name(k)] for k in range(count)]
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "split": split,
             "classes": classes, "num_samples": sum(s["samples"] for s in shards),
             "shards": shards, **plan, "skipped": [bad for s in shards for bad in s["skipped"]]}
    _atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    echo(f"{split}: {index['num_samples']} images in {count} shards, "
         f"{len(index['skipped'])} unreadable skipped -> {out / INDEX_FILE}")
    return index


def _resume_records(out: Path, plan: dict) -> Optional[dict[str, dict]]:
    """The records of the shards already written for ``plan`` ({} for a fresh start), or None
    when the split is finished and intact. Another plan's work in ``out`` is refused."""
    index = _read_json(out / INDEX_FILE)
    progress = _read_json(out / PROGRESS_DIR / "plan.json")
    earlier = index if index is not None else progress
    if earlier is None:
        if out.is_dir() and any(out.glob("shard-*.tar")):
            raise UserError(f"{out} holds shards but no {INDEX_FILE} or progress record: not a "
                            "star-mamba prepare-data output; choose another OUT or delete it")
        return {}
    different = [k for k in ("source", "files", "digest", "options") if earlier.get(k) != plan[k]]
    if different:
        raise UserError(f"{out} was prepared (or started) from other files or with other options "
                        f"({', '.join(different)} differ: {_describe(earlier, plan, different)}); "
                        f"use another OUT, or delete {out} to start over")
    plan["per_shard"] = earlier.get("per_shard")
    if index is not None:
        records = {s["name"]: s for s in index["shards"]}
        return None if all(_finished(out, r) for r in records.values()) else records
    return {r["name"]: r for p in (out / PROGRESS_DIR).glob("shard-*.tar.json")
            if (r := _read_json(p)) is not None}


def _describe(earlier: dict, plan: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        a, b = earlier.get(k), plan[k]
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{o} {a.get(o)} -> {b[o]}" for o in b if a.get(o) != b[o]]
        elif k != "digest":
            parts.append(f"{k} {a} -> {b}")
    return ", ".join(parts) or "the list of files"


def _run(tasks: list[ShardTask], workers: int):
    """Each task's record as it finishes: in this process, or in a pool of ``workers``."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(write_shard, tasks)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(write_shard, tasks)


def prepare_data(src: str | Path, out: str | Path, options: PrepareOptions = PrepareOptions(),
                 workers: int = 1, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Every split folder of ``src`` as shards under ``out/<split>/``; {split: index}."""
    options.check()
    if workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    src, out = Path(src), Path(out)
    done = {}
    for split in find_splits(src):
        (out / split).mkdir(parents=True, exist_ok=True)
        index = prepare_split(src / split, out / split, options, workers, echo)
        if index is not None:
            done[split] = index
    return done


__all__ = ["PrepareOptions", "encode_image", "find_splits", "parse_size", "prepare_data",
           "prepare_split", "resize_short_side", "write_shard"]
