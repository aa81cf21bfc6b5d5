"""Input pipeline benchmark behind ``star-mamba bench --data`` and
``benchmarks/input_pipeline.py``: images/s per DataLoader worker for the pretraining transform
(RandomResizedCrop 192, flip, normalise) from

(a) an ImageFolder of full-size JPEGs (ImageNet-like, 500 x 375), decoded with Pillow per step,
(b) shards of the same images made by ``prepare-data`` (short side 256), streamed,

measured side by side in one run (alternating repeats, medians), with the ratio, a per-image
breakdown (decode, transform) and how many workers per GPU each needs to feed a model step rate
(``benchmarks/results/gpu/gpu_acceptance.json`` when present, else a stated assumption).

The images are crops of scikit-image's bundled photographs (``skimage.data``; no download),
one class per photograph.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data.folder import build_image_folder, decode_rgb, load_rgb
from ..data.prepare import PrepareOptions, prepare_data
from ..data.shards import build_shard_set
from ..data.transforms import build_pretrain_transform
from .bench import gemm_flops, machine

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
"""scikit-image photographs shipped with the package (RGB, 300-640 px)."""
GPU_RESULTS = Path(__file__).resolve().parents[3] / "benchmarks/results/gpu/gpu_acceptance.json"
"""``star-mamba bench --gpu``'s results in a source checkout."""
ASSUMED_STEP_RATE = 1278.0  # images/s: STAR-B K=4 192 px on one H200, eager bf16 (when no JSON)


def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8: one of :data:`PHOTOS`."""
    import skimage.data  # the bench and test extras install scikit-image
    return getattr(skimage.data, name)()[..., :3]


def make_photo_folder(root: str | Path, per_class: dict[str, int], size: tuple[int, int] = (500, 375),
                      classes: int = len(PHOTOS), quality: int = 90, seed: int = 0) -> list[Path]:
    """An ImageFolder ``root/<split>/<photo>/<i>.jpg``: ``per_class[split]`` random crops (60-100%
    of the side, the aspect of ``size``) of each of the first ``classes`` photographs, resized
    to ``size`` (w, h) and saved as JPEG. Returns the files written, in order."""
    rng = np.random.default_rng(seed)
    files = []
    for split, n in per_class.items():
        for name in PHOTOS[:classes]:
            pixels = photo(name)
            (Path(root) / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                files.append(Path(root) / split / name / f"{i}.jpg")
                _random_crop(pixels, size, rng).save(files[-1], "JPEG", quality=quality)
    return files


def _random_crop(pixels: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    h, w = pixels.shape[:2]
    aspect = size[0] / size[1]
    scale = rng.uniform(0.6, 1.0)
    cw = int(min(w, h * aspect) * scale)
    ch = int(cw / aspect)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    return Image.fromarray(pixels[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------ measurements

def _loader_rate(make_loader, passes: int) -> float:
    """Steady-state images/s of ``passes`` passes over a fresh loader: timed from each pass's
    first batch (worker start-up and the first batch left out)."""
    images, seconds = 0, 0.0
    for _ in range(passes):
        batches = iter(make_loader())
        next(batches)
        start = time.perf_counter()
        for (x, _), _reports in batches:
            images += x.shape[0]
        seconds += time.perf_counter() - start
    return images / seconds


def folder_loader(root: Path, img_size: int, batch: int, workers: int) -> DataLoader:
    from ..engine.sampler import EpochIndexSampler, SeededDataset, collate_reported
    ds = build_image_folder(root, "train", build_pretrain_transform(img_size))
    sampler = EpochIndexSampler(len(ds), batch, seed=0)
    return DataLoader(SeededDataset(ds, 0), batch_size=batch, sampler=sampler,
                      num_workers=workers, collate_fn=collate_reported, drop_last=True)


def shard_loader(root: Path, img_size: int, batch: int, workers: int):
    return build_shard_set(root, "train", build_pretrain_transform(img_size)).train_loader(
        batch, workers=workers)


def per_image_ms(files: list[Path], encoded: list[bytes], img_size: int) -> dict:
    """In-process ms per image: decode a file / the shard bytes, then the transform."""
    transform = build_pretrain_transform(img_size)
    torch.manual_seed(0)

    def timed(fn, items) -> float:
        start = time.perf_counter()
        for item in items:
            fn(item)
        return 1000 * (time.perf_counter() - start) / len(items)

    full, small = [load_rgb(str(f)) for f in files], [decode_rgb(b) for b in encoded]
    return {"folder_decode_ms": round(timed(lambda f: load_rgb(str(f)), files), 3),
            "shard_decode_ms": round(timed(decode_rgb, encoded), 3),
            "folder_transform_ms": round(timed(transform, full), 3),
            "shard_transform_ms": round(timed(transform, small), 3)}


def step_rate(path: Path = GPU_RESULTS) -> tuple[float, str]:
    """(images/s, where it comes from) of the model step the input must feed."""
    try:
        step = json.loads(Path(path).read_text())["sections"]["pretrain_step"]["result"]
        return float(step["images_per_s"]), (f"{step['model']['name']} K={step['model']['images_per_sequence']} "
                                             f"{step['model']['img_size']} px pretraining step, {step['summary']}, "
                                             f"measured by star-mamba bench --gpu")
    except (OSError, KeyError, ValueError, TypeError):
        where = (f"{path} absent" if Path(path).parent.parent.is_dir()
                 else "no GPU acceptance results beside an installed package")
        return ASSUMED_STEP_RATE, ("assumed: STAR-B K=4 192 px on one H200, eager bf16 "
                                   f"({ASSUMED_STEP_RATE:.0f} images/s; {where})")


def run_input_bench(output_dir: str | Path = "runs/bench", images_per_class: int = 48,
                    size: tuple[int, int] = (500, 375), short_side: int = 256,
                    img_size: int = 192, batch: int = 32, repeats: int = 3, passes: int = 1,
                    workers: int = 1, quick: bool = False, gpu_results: Path = GPU_RESULTS,
                    command: str = "") -> dict:
    """Measure (a) and (b) side by side; write ``input_pipeline.json`` / ``.md``."""
    if quick:
        images_per_class, repeats, batch = 4, 1, 8
    gemm = gemm_flops()  # this machine, all threads (as star-mamba bench reports it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process breakdown runs on one thread, as a worker does
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "folder", Path(tmp) / "shards"
        files = make_photo_folder(src, {"train": images_per_class}, size)
        start = time.perf_counter()
        prepare_data(src, out, PrepareOptions(short_side=short_side), workers=1, echo=lambda _: None)
        prepare_s = time.perf_counter() - start
        index = json.loads((out / "train" / "index.json").read_text())
        shard_bytes = sum(s["bytes"] for s in index["shards"])
        encoded = [_encode(f, short_side) for f in files[:64]]
        rates = {"folder": [], "shards": []}
        for _ in range(repeats):  # alternating, so both see the same machine load
            rates["folder"].append(_loader_rate(lambda: folder_loader(src, img_size, batch, workers), passes))
            rates["shards"].append(_loader_rate(lambda: shard_loader(out, img_size, batch, workers), passes))
        breakdown = per_image_ms(files[:64], encoded, img_size)
        folder_kib = sum(f.stat().st_size for f in files) / len(files) / 1024
    torch.set_num_threads(threads)
    folder_rate, shard_rate = (statistics.median(rates[k]) for k in ("folder", "shards"))
    rate, rate_source = step_rate(gpu_results)
    result = {
        "command": command, "machine": {**machine(), "cpu": cpu_model()}, "gemm_gflops": round(gemm / 1e9, 1),
        "setup": {"images": len(files), "classes": len(PHOTOS), "source_size": list(size),
                  "source_jpeg_quality": 90, "short_side": short_side, "img_size": img_size,
                  "batch": batch, "workers": workers, "repeats": repeats,
                  "folder_mean_kib": round(folder_kib, 1),
                  "shard_mean_kib": round(shard_bytes / index["num_samples"] / 1024, 1),
                  "prepare_images_per_s": round(len(files) / prepare_s, 1)},
        "folder_images_per_s_per_worker": round(folder_rate / workers, 1),
        "shards_images_per_s_per_worker": round(shard_rate / workers, 1),
        "ratio": round(shard_rate / folder_rate, 2),
        "repeats_images_per_s": {k: [round(v, 1) for v in r] for k, r in rates.items()},
        "per_image": breakdown,
        "step": {"images_per_s": rate, "source": rate_source,
                 "workers_per_gpu_folder": math.ceil(rate / (folder_rate / workers)),
                 "workers_per_gpu_shards": math.ceil(rate / (shard_rate / workers))},
    }
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "input_pipeline.json").write_text(json.dumps(result, indent=1))
    (out_dir / "input_pipeline.md").write_text(to_markdown(result))
    return result


def _encode(path: Path, short_side: int) -> bytes:
    from ..data.prepare import encode_image
    return encode_image(str(path), PrepareOptions(short_side=short_side))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def to_markdown(r: dict) -> str:
    s, b, st = r["setup"], r["per_image"], r["step"]
    m = r["machine"]
    return "\n".join([
        f"Machine: {cpu_model()}, {m['threads']} threads, torch "
        f"{m.get('torch', '?')}; GEMM {r['gemm_gflops']} GFLOP/s. Command: `{r['command']}`",
        "",
        f"Pretraining transform at {s['img_size']} px, {s['images']} images "
        f"({s['source_size'][0]} x {s['source_size'][1]} JPEG q{s['source_jpeg_quality']}, mean "
        f"{s['folder_mean_kib']} KiB; shards at short side {s['short_side']}, mean "
        f"{s['shard_mean_kib']} KiB), batch {s['batch']}, {s['workers']} DataLoader worker, "
        f"median of {s['repeats']}:",
        "",
        "| source | images/s per worker | decode ms | transform ms | workers per GPU |",
        "| --- | --- | --- | --- | --- |",
        f"| (a) ImageFolder, full-size JPEG | {r['folder_images_per_s_per_worker']} | "
        f"{b['folder_decode_ms']} | {b['folder_transform_ms']} | {st['workers_per_gpu_folder']} |",
        f"| (b) shards, short side {s['short_side']} | {r['shards_images_per_s_per_worker']} | "
        f"{b['shard_decode_ms']} | {b['shard_transform_ms']} | {st['workers_per_gpu_shards']} |",
        "",
        f"Ratio (b) / (a): **{r['ratio']}x**. Workers per GPU to feed {st['images_per_s']:.0f} "
        f"images/s ({st['source']}), at this machine's per-worker rate. prepare-data: "
        f"{s['prepare_images_per_s']} images/s with 1 process.",
        ""])


__all__ = ["PHOTOS", "make_photo_folder", "run_input_bench", "step_rate", "to_markdown"]
