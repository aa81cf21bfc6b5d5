"""The one-command GPU acceptance run, from a source checkout:

    star-mamba bench --gpu [--output-dir D] [--dry-run] [--budget S] [--sections a,b]
    PYTHONPATH=src python benchmarks/gpu/acceptance.py [the same options]

Written for the first session with a GPU: one call, top to bottom, writes
``D/gpu_acceptance.json`` and ``D/gpu_acceptance.md`` (rewritten after every section, so a run
cut short still leaves what it measured). Seven sections, each independent: an exception in one
is recorded (section, error line, traceback tail) and the run goes on.

1. ``device``: name, torch / triton / CUDA versions, capability, memory; the dense bf16 peak
   from :data:`BF16_PEAK` and a measured bf16 GEMM rate.
2. ``tests``: ``pytest -m gpu tests/test_gpu.py -q`` in a subprocess: counts and output tail.
3. ``scan_accuracy``: every scan backend on the device against ``reference``, float32 and bf16:
   max errors of y, the last state and every gradient.
4. ``scan_speed``: scan forward and forward+backward time and peak memory per backend at the
   STAR-tiny and STAR-base widths for K = 1, 4, 8 images per sequence at a realistic batch.
5. ``pretrain_step``: a STAR-B pretraining step (bf16 autocast, forward, backward, clip, AdamW)
   at the largest batch that fits (doubling until out of memory): images/s, MFU, peak memory.
6. ``compile``: eager vs ``torch.compile(model)`` for that step at a fixed batch.
7. ``convergence``: 30 STAR-B optimizer steps on synthetic images; the loss must fall.

On the GPU each section runs in its own process (fresh CUDA context and allocator) under a
hard time limit (:data:`SECTION_TIMEOUT`, and 570 s for the whole run), so a crash, a sticky
CUDA error or a hang costs one section only; the compile comparison runs last. ``--dry-run``
runs the same sections in-process on CPU with a tiny model and tiny shapes (a smoke test of
this file, not a measurement). Timings are medians after warm-up.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (tests/ lives here)
SRC = ROOT / "src"  # its star_mamba
if __name__ == "__main__" and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # run as a script: this checkout's star_mamba, as PYTHONPATH=src

from star_mamba.errors import UserError  # noqa: E402
from star_mamba.ops.testing import (error_stats, fallbacks, scan_inputs,  # noqa: E402
                                    scan_with_grads)

SECTIONS = ("device", "tests", "scan_accuracy", "scan_speed", "pretrain_step", "compile",
            "convergence")
# Run order: the compile comparison (its compile time has no bound) goes last, so a slow
# compile cannot push the cheap convergence check past the time budget.
RUN_ORDER = ("device", "tests", "scan_accuracy", "scan_speed", "pretrain_step", "convergence",
             "compile")
TITLES = {"device": "1. Device", "tests": "2. CUDA tests (pytest -m gpu)",
          "scan_accuracy": "3. Scan backends vs reference", "scan_speed": "4. Scan speed and memory",
          "pretrain_step": "5. Pretraining step at the largest batch",
          "compile": "6. Eager vs torch.compile", "convergence": "7. Convergence check"}

# Dense (no sparsity) bf16 tensor-core peak FLOP/s from the vendors' data sheets, matched
# against torch.cuda.get_device_name() (upper-cased; every word of a key must appear), in order.
BF16_PEAK: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H100", "PCIE"), "H100 PCIe", 756e12),
    (("H100", "SXM"), "H100 SXM", 989e12),
    (("H100", "HBM3"), "H100 SXM", 989e12),  # "NVIDIA H100 80GB HBM3" is the SXM board
    (("H200",), "H200", 989e12),
    (("A100",), "A100", 312e12),
)

# Tolerance on the scan comparison: max |backend - reference| / max |reference| per quantity.
SCAN_TOL = {"float32": 1e-4, "bfloat16": 3e-2}

# The dry run's model: every code path of STAR-B at a size that runs in seconds on a CPU.
TINY_MODEL = dict(depth=2, embed_dim=32, img_size=32, patch_size=8, cluster_size=2,
                  images_per_sequence=2, decoder_dim=32, decoder_depth=2, decoder_heads=2)


@dataclass
class Plan:
    """Every size of the run; :func:`gpu_plan` and :func:`dry_plan` fill it."""

    dry_run: bool
    device: str
    model_name: str = "star_base"
    model_overrides: dict = field(default_factory=lambda: dict(img_size=192, images_per_sequence=4))
    gemm_n: int = 8192
    gemm_repeats: int = 10
    # b, dim, N, L: crosses the Triton kernel's 32-channel blocks and 64-step chunks unevenly
    accuracy_shape: tuple = (2, 40, 16, 130)
    scan_widths: tuple = (192, 768)  # STAR-tiny, STAR-base
    scan_images: tuple = (1, 4, 8)  # K
    scan_geometry: dict = field(default_factory=lambda: dict(img_size=192, patch_size=16,
                                                             cluster_size=4))
    scan_batch_images: int = 256  # images per GPU in the STAR-B recipe: batch = this / K sequences
    scan_dtypes: tuple = ("bfloat16", "float32")  # bf16 first: what training runs
    scan_repeats: int = 5
    reference_max_len: int = 640  # the Python-loop reference only at short lengths
    search_start: int = 1  # sequences in the first try of the batch search
    search_doublings: int = 12
    step_repeats: int = 5
    fixed_sequences: int = 16  # batch of the compile comparison and the convergence run
    compile_backend: str = "inductor"
    compile_repeats: int = 5
    train_steps: int = 30
    train_lr: float = 5e-4
    warmup_steps: int = 5
    clip_grad: float = 3.0
    pytest_timeout: int = 240
    soft_budget_s: float = 150.0  # scan speed, batch search: start nothing new past this
    isolate: bool = True  # each section in its own process with a time limit
    budget_s: Optional[float] = 570.0  # whole run; sections left when it runs out are skipped
    notes: list = field(default_factory=list)


def gpu_plan() -> Plan:
    return Plan(dry_run=False, device="cuda")


def dry_plan() -> Plan:
    return Plan(dry_run=True, device="cpu", model_name="star_tiny", model_overrides=dict(TINY_MODEL),
                gemm_n=256, gemm_repeats=3, scan_widths=(32,), scan_images=(1, 2),
                scan_geometry=dict(img_size=32, patch_size=8, cluster_size=2),
                scan_batch_images=4, scan_repeats=2, search_doublings=2, step_repeats=2,
                fixed_sequences=2, compile_backend="aot_eager", compile_repeats=2,
                train_steps=3, train_lr=1e-3, warmup_steps=0, pytest_timeout=120,
                isolate=False, budget_s=None,
                notes=["dry run: CPU, tiny model and shapes; a smoke test of the code path, "
                       "not a measurement",
                       "dry run: torch.compile uses backend='aot_eager' (inductor's C++ compile "
                       "alone takes minutes on a small CPU)",
                       "dry run: sections run in this process (the GPU run gives each its own "
                       "process and time limit)"])


# ----------------------------------------------------------------------------- helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1,
             inner: int = 1) -> float:
    """Median wall time of ``inner`` back-to-back calls of ``fn`` (ms per call), synchronised."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1000 / inner)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak CUDA memory above what was allocated before, while ``fn`` runs (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text
            or "alloc_failed" in text)


def _fits(fn: Callable[[], Any]) -> bool:
    """Run ``fn``; False if it ran out of memory (any other error propagates)."""
    try:
        fn()
        return True
    except Exception as e:
        if not _is_oom(e):
            raise
    return False  # out of the except block: the traceback and its tensors are gone


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:500] if text else ''}".rstrip(": ")


def peak_bf16_flops(name: str) -> tuple[Optional[float], str]:
    """Dense bf16 peak FLOP/s of the device called ``name``, and where the number comes from."""
    upper = name.upper()
    for words, label, value in BF16_PEAK:
        if all(w in upper for w in words):
            return value, f"{label} dense bf16 peak (data sheet), matched from {name!r}"
    return None, (f"{name!r} is not in the bf16 peak table ({', '.join(l for _, l, _ in BF16_PEAK)}); "
                  "MFU is not computed")


def _build_model(plan: Plan, device: torch.device, seed: int = 0):
    from star_mamba.models.registry import create_pretrain_model
    torch.manual_seed(seed)
    return create_pretrain_model(plan.model_name, **plan.model_overrides).to(device)


def _optimizer(model, lr: float):
    """AdamW as the trainer builds it (timm, no weight decay on norms/biases/positions)."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05, betas=(0.9, 0.95))


def _images(model, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g, device=device)


def _train_step(model, optimizer, images: torch.Tensor, device: torch.device,
                clip: Optional[float]) -> torch.Tensor:
    """One bf16-autocast pretraining step: forward, backward, clip, AdamW; returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(images).loss
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _model_info(model, plan: Plan, device: torch.device) -> dict:
    from star_mamba.ops import default_backend
    cfg = model.cfg
    backend = cfg.scan_backend if cfg.scan_backend != "auto" else default_backend(device)
    return dict(name=plan.model_name, overrides=plan.model_overrides,
                params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                images_per_sequence=cfg.images_per_sequence, img_size=cfg.img_size,
                encoder_tokens_per_sequence=(cfg.num_segments - 1) * cfg.tokens_per_segment,
                scan_backend=backend)


# ----------------------------------------------------------------------------- 1. device

def gemm_rate(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16,
              repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _time_ms(lambda: torch.mm(a, b), device, repeats, warmup=3,
                  inner=10 if device.type == "cuda" else 1)
    return 2 * n ** 3 / (ms / 1000)


def section_device(plan: Plan, device: torch.device, ctx: dict, out: dict) -> Optional[bool]:
    from star_mamba.ops import available_backends, default_backend
    out.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:
        out["triton"] = None
        out["triton_error"] = _error_line(e)
    try:
        from importlib.metadata import version
        out["mamba_ssm"] = version("mamba-ssm")
    except Exception:
        out["mamba_ssm"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   total_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(),
                   device_count=torch.cuda.device_count())
        peak, note = peak_bf16_flops(props.name)
    else:
        out.update(name=platform.processor() or platform.machine(), capability=None,
                   total_memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                          / 2**30, 1), threads=torch.get_num_threads())
        peak, note = None, "CPU: no bf16 peak in the table; MFU is not computed"
    ctx["peak_flops"] = peak
    out["bf16_peak_tflops"] = None if peak is None else round(peak / 1e12, 1)
    out["peak_note"] = note
    out["scan_backends"] = available_backends(device)
    out["default_scan_backend"] = default_backend(device)
    rate = gemm_rate(device, plan.gemm_n, torch.bfloat16, plan.gemm_repeats)
    ctx["gemm_flops"] = rate
    out["gemm_n"] = plan.gemm_n
    out["gemm_bf16_tflops"] = round(rate / 1e12, 3)
    out["gemm_fraction_of_peak"] = None if peak is None else round(rate / peak, 3)
    out["summary"] = (f"{out['name']}, torch {out['torch']}, triton {out['triton']}, "
                      f"CUDA {out['cuda']}; bf16 GEMM {out['gemm_bf16_tflops']} TFLOP/s"
                      + (f" ({out['gemm_fraction_of_peak']:.0%} of {out['bf16_peak_tflops']})"
                         if peak else " (no peak in the table)"))
    return None


# ----------------------------------------------------------------------------- 2. tests

def _pytest_counts(text: str) -> dict[str, int]:
    counts = dict(passed=0, failed=0, errors=0, skipped=0, deselected=0, xfailed=0, xpassed=0)
    tail = "\n".join(text.strip().splitlines()[-3:])
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                              tail):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


def section_tests(plan: Plan, device: torch.device, ctx: dict, out: dict) -> Optional[bool]:
    root = ROOT
    test_file = root / "tests" / "test_gpu.py"
    if not test_file.exists():
        raise FileNotFoundError(f"{test_file} is missing (run from a source checkout)")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
           "-p", "no:cacheprovider"]
    out["command"] = " ".join(cmd[1:])
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                              timeout=plan.pytest_timeout)
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out["tail"] = "\n".join(partial.splitlines()[-40:])
        raise RuntimeError(f"pytest did not finish within {plan.pytest_timeout} s") from None
    text = proc.stdout + ("\n" + proc.stderr if proc.stderr.strip() else "")
    out["returncode"] = proc.returncode
    out.update(_pytest_counts(proc.stdout))
    out["tail"] = "\n".join(text.strip().splitlines()[-40:])
    ran = out["passed"] + out["failed"] + out["errors"]
    out["summary"] = (f"{out['passed']} passed, {out['failed']} failed, {out['errors']} errors, "
                      f"{out['skipped']} skipped (exit {proc.returncode})")
    if device.type != "cuda":
        out["note"] = "no CUDA device: every test in tests/test_gpu.py skips"
        return None if proc.returncode == 0 else False
    return proc.returncode == 0 and ran > 0 and out["failed"] == 0 and out["errors"] == 0


# ----------------------------------------------------------------------------- 3. accuracy

def section_scan_accuracy(plan: Plan, device: torch.device, ctx: dict, out: dict) -> bool:
    from star_mamba.ops import available_backends
    b, d, n, L = plan.accuracy_shape
    backends = [x for x in available_backends(device) if x != "reference"]
    out.update(shape=dict(batch=b, dim=d, d_state=n, length=L), backends=backends,
               tolerance=SCAN_TOL,
               metric="max_rel = max |backend - reference| / max |reference| over all elements; "
                      "loss = sum(y * linspace(-1, 1)) + sum(last_state^2); gradients of every "
                      "input; u, delta, B, C, z in the dtype, A, D, delta_bias float32")
    rows = out["rows"] = []
    for dtype_name in ("float32", "bfloat16"):
        # u, delta, B, C, z in the dtype (as under autocast), A, D, delta_bias float32
        inputs = scan_inputs(b, d, L, n, dtype=getattr(torch, dtype_name), device=device)
        try:
            ref = scan_with_grads("reference", inputs).tensors()
        except Exception as e:
            rows.append(dict(backend="reference", dtype=dtype_name, passed=False,
                             error=_error_line(e)))
            continue
        for name in backends:
            row: dict[str, Any] = dict(backend=name, dtype=dtype_name)
            rows.append(row)
            try:
                got = scan_with_grads(name, inputs).tensors()
            except Exception as e:
                row.update(passed=False, error=_error_line(e))
                continue
            errs = {k: error_stats(got[k], ref[k]) for k in ref}
            row["y"], row["last_state"] = errs.pop("y"), errs.pop("last_state")
            row["grads"] = {k[len("grad_"):]: v for k, v in errs.items()}
            every = [row["y"], row["last_state"], *row["grads"].values()]
            row["max_rel"] = max(e["max_rel"] for e in every)
            row["worst"] = max([("y", row["y"]), ("last_state", row["last_state"]),
                                *row["grads"].items()], key=lambda kv: kv[1]["max_rel"])[0]
            fell = fallbacks().get(name)
            if fell:
                row["fell_back_to_torch"] = fell
            row["passed"] = (all(e["finite"] for e in every) and not fell
                             and row["max_rel"] <= SCAN_TOL[dtype_name])
    out["fallbacks"] = fallbacks()
    bad = [f"{r['backend']}/{r['dtype']}" for r in rows if not r["passed"]]
    out["summary"] = (f"{len(rows)} comparisons ({', '.join(backends)} x float32, bf16); "
                      + (f"failing: {', '.join(bad)}" if bad else "all within tolerance")
                      + "; worst float32 rel "
                      + _fmt(max((r.get("max_rel", math.inf) for r in rows
                                  if r["dtype"] == "float32"), default=None))
                      + ", worst bf16 rel "
                      + _fmt(max((r.get("max_rel", math.inf) for r in rows
                                  if r["dtype"] == "bfloat16"), default=None)))
    return not bad


# ----------------------------------------------------------------------------- 4. scan speed

def scan_length(k: int, **geometry) -> tuple[int, int]:
    """(tokens the encoder scans, StarConfig.seq_len) for K images: the encoder reads every
    segment but the last, (T-1) c^2 = K (G+1) c^2 - c^2 with separators."""
    from star_mamba.config import StarConfig
    cfg = StarConfig(images_per_sequence=k, **geometry)
    return (cfg.num_segments - 1) * cfg.tokens_per_segment, cfg.seq_len


def section_scan_speed(plan: Plan, device: torch.device, ctx: dict, out: dict) -> Optional[bool]:
    from star_mamba.ops import available_backends
    backends = available_backends(device)
    out.update(backends=backends, geometry=plan.scan_geometry, d_state=16,
               batch_rule=f"{plan.scan_batch_images} images per device: {plan.scan_batch_images}/K "
                          "sequences", reference_max_len=plan.reference_max_len)
    rows = out["rows"] = []
    start = time.perf_counter()
    for dtype_name, dim, k in itertools.product(plan.scan_dtypes, plan.scan_widths,
                                                plan.scan_images):
        if time.perf_counter() - start > plan.soft_budget_s:
            out["stopped_early"] = (f"section past its {plan.soft_budget_s} s soft budget; "
                                    f"shapes from {dtype_name} D={dim} K={k} on were not run")
            break
        length, seq_len = scan_length(k, **plan.scan_geometry)
        batch = max(1, plan.scan_batch_images // k)
        inputs = scan_inputs(batch, dim, length, 16, dtype=getattr(torch, dtype_name),
                             device=device)
        for name in backends:
            if name == "reference" and length > plan.reference_max_len:
                continue
            row: dict[str, Any] = dict(backend=name, dtype=dtype_name, dim=dim, images=k,
                                       length=length, seq_len=seq_len, batch=batch)
            rows.append(row)
            try:
                row.update(_time_scan(name, inputs, device,
                                      1 if name == "reference" else plan.scan_repeats))
            except Exception as e:
                row["error"] = "out of memory" if _is_oom(e) else _error_line(e)
            _free(device)
        del inputs
        _free(device)
    for row in rows:  # speed-up against the torch kernel at the same shape
        base = next((r for r in rows if r["backend"] == "torch" and all(
            r[key] == row[key] for key in ("dtype", "dim", "images"))), None)
        if base and "fwd_bwd_ms" in base and "fwd_bwd_ms" in row:
            row["speedup_vs_torch"] = round(base["fwd_bwd_ms"] / row["fwd_bwd_ms"], 2)
    out["fallbacks"] = fallbacks()
    best = {}
    for r in rows:
        if "fwd_bwd_ms" in r and r["dtype"] == plan.scan_dtypes[0] and r["backend"] != "reference":
            key = (r["dim"], r["images"])
            if key not in best or r["fwd_bwd_ms"] < best[key]["fwd_bwd_ms"]:
                best[key] = r
    errors = sum("error" in r for r in rows)
    out["summary"] = (f"{len(rows)} timings, {errors} errors; fastest fwd+bwd ({plan.scan_dtypes[0]}): "
                      + ", ".join(f"D{d} K{k} {r['backend']} {r['fwd_bwd_ms']} ms"
                                  for (d, k), r in sorted(best.items())))
    return None if not errors else False


def _time_scan(name: str, inputs: dict, device: torch.device, repeats: int) -> dict:
    from star_mamba.ops import selective_scan
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            selective_scan(**inputs, delta_softplus=True, backend=name)

    def forward_backward():
        selective_scan(**leaves, delta_softplus=True, backend=name).float().sum().backward()
        for t in leaves.values():
            t.grad = None

    fwd = _time_ms(forward, device, repeats)
    fwd_bwd = _time_ms(forward_backward, device, repeats)
    return dict(forward_ms=round(fwd, 3), fwd_bwd_ms=round(fwd_bwd, 3),
                peak_mib=_peak_mib(forward_backward, device),
                fell_back_to_torch=fallbacks().get(name))


# ----------------------------------------------------------------------------- 5. step

def section_pretrain_step(plan: Plan, device: torch.device, ctx: dict, out: dict) -> Optional[bool]:
    from star_mamba.tools.bench import _step_flops
    model = _build_model(plan, device)
    optimizer = _optimizer(model, 1.5e-4)
    k = model.cfg.images_per_sequence
    out["model"] = _model_info(model, plan, device)
    out["recipe"] = "bf16 autocast, forward + backward + clip_grad_norm(3.0) + AdamW (timm)"

    def step(sequences: int):
        _train_step(model, optimizer, _images(model, sequences * k, device), device, plan.clip_grad)
        _sync(device)

    def fits(sequences: int) -> bool:
        if _fits(lambda: step(sequences)):
            return True
        optimizer.zero_grad(set_to_none=True)
        _free(device)
        return False

    trials = out["search"] = []
    sequences, best = plan.search_start, None
    start = time.perf_counter()
    for _ in range(plan.search_doublings + 1):
        if time.perf_counter() - start > plan.soft_budget_s:
            out["stopped_early"] = f"batch search past its {plan.soft_budget_s} s soft budget"
            break
        t = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ok = fits(sequences)
        trials.append(dict(sequences=sequences, images=sequences * k, fits=ok,
                           seconds=round(time.perf_counter() - t, 2),
                           peak_gib=(round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                     if device.type == "cuda" else None)))
        if not ok:
            break
        best, sequences = sequences, sequences * 2
    if best is None:
        raise RuntimeError(f"even {plan.search_start} sequence(s) of {k} images do not fit")
    out["search_capped"] = trials[-1]["fits"]  # stopped by the cap (or budget), not by memory
    # measure at the largest batch that fit; halve if fragmentation makes it fail now
    timing: list[float] = []
    while not _fits(lambda: timing.append(_time_ms(lambda: step(best), device,
                                                     plan.step_repeats, warmup=1))):
        optimizer.zero_grad(set_to_none=True)
        _free(device)
        if best == 1:
            raise RuntimeError("the step ran out of memory at 1 sequence while measuring")
        best //= 2
    ms = timing[0]
    peak = _peak_mib(lambda: step(best), device)
    ctx["step_sequences"] = best
    images = best * k
    out.update(sequences=best, images=images, step_ms=round(ms, 2),
               images_per_s=round(images / (ms / 1000), 1),
               peak_gib=None if peak is None else round(peak / 1024, 2))
    # FLOPs are linear in the batch: count one sequence (torch's counter + the scan by hand)
    flops = _step_flops(model, _images(model, k, device)) * best
    achieved = flops / (ms / 1000)
    peak_flops, gemm = ctx.get("peak_flops"), ctx.get("gemm_flops")
    out.update(flops_per_step=flops, achieved_tflops=float(f"{achieved / 1e12:.4g}"),
               mfu=None if not peak_flops else round(achieved / peak_flops, 4),
               fraction_of_measured_gemm=None if not gemm else round(achieved / gemm, 4),
               flops_note="star_mamba.tools.flops on forward+backward: torch.utils.flop_counter "
                          "(matmul, conv, attention) with the depthwise conv backward counted "
                          "per group (torch counts it dense: 8.5% too many at STAR-B) and "
                          "attention counted dense (masked scores included), + 18 FLOPs per "
                          "scan state update; counted on one sequence and scaled by the batch; "
                          "the AdamW step is not counted")
    if not peak_flops:
        out["mfu_note"] = "no bf16 peak for this device (section 1): MFU is not computed"
    out["fallbacks"] = fallbacks()
    out["summary"] = (f"{best} sequences x K={k} = {images} images: {out['images_per_s']} images/s, "
                      f"MFU {_fmt(out['mfu'], pct=True)}, peak {_fmt(out['peak_gib'])} GiB"
                      + (" (search capped)" if out["search_capped"] else ""))
    return None


# ----------------------------------------------------------------------------- 6. compile

def _graph_breaks() -> Optional[dict]:
    try:
        from torch._dynamo.utils import counters
        breaks = counters.get("graph_break", {})
        top = sorted(breaks.items(), key=lambda kv: -kv[1])[:5]
        return dict(count=int(sum(breaks.values())),
                    top=[dict(reason=str(r)[:300], count=c) for r, c in top],
                    unique_graphs=int(counters.get("stats", {}).get("unique_graphs", 0)))
    except Exception:
        return None


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters
        counters.clear()
    except Exception:
        pass


def section_compile(plan: Plan, device: torch.device, ctx: dict, out: dict) -> Optional[bool]:
    eager = _build_model(plan, device)
    k = eager.cfg.images_per_sequence
    images = _images(eager, plan.fixed_sequences * k, device)
    out.update(model=_model_info(eager, plan, device), sequences=plan.fixed_sequences,
               images=images.shape[0], backend=plan.compile_backend,
               call=f"torch.compile(model, backend={plan.compile_backend!r})")
    compiled_src = copy.deepcopy(eager)
    result = compare_compile(eager, compiled_src, images, device, plan.compile_backend,
                             plan.compile_repeats, plan.clip_grad, out)
    out["summary"] = (f"eager {out['eager_images_per_s']} images/s, compiled "
                      f"{out['compiled_images_per_s']} images/s: x{out['speedup']} "
                      f"(compile {out['compile_s']} s, {plan.compile_backend}; "
                      f"first-step loss diff {_fmt(out['first_loss_rel_diff'])} rel)")
    return result


def compare_compile(eager, compiled_src, images: torch.Tensor, device: torch.device,
                    backend: Optional[str], repeats: int, clip: Optional[float],
                    out: dict) -> Optional[bool]:
    """Eager vs ``torch.compile(model)`` on one training step (two identical copies, same input):
    fills ``out`` with images/s of each, their ratio, compile time and the first-step losses.
    The eager numbers are in ``out`` before compiling starts, so a compile failure keeps them."""
    n = images.shape[0]
    opt_e = _optimizer(eager, 1.5e-4)
    opt_c = _optimizer(compiled_src, 1.5e-4)
    first_eager = _train_step(eager, opt_e, images, device, clip).float().item()
    eager_ms = _time_ms(lambda: _train_step(eager, opt_e, images, device, clip), device,
                        repeats, warmup=0)
    out.update(eager_step_ms=round(eager_ms, 2), eager_images_per_s=round(n / (eager_ms / 1000), 2),
               first_loss_eager=first_eager)
    _reset_dynamo()
    kwargs = {} if backend is None else dict(backend=backend)
    model = torch.compile(compiled_src, **kwargs)
    t = time.perf_counter()
    try:
        first = _train_step(model, opt_c, images, device, clip).float().item()
        _sync(device)
    finally:
        out["graph_breaks"] = _graph_breaks()
    first_s = time.perf_counter() - t
    out["first_loss_compiled"] = first
    out["first_loss_rel_diff"] = abs(first - first_eager) / max(abs(first_eager), 1e-12)
    ms = _time_ms(lambda: _train_step(model, opt_c, images, device, clip), device, repeats,
                  warmup=1)
    out.update(compiled_step_ms=round(ms, 2), compiled_images_per_s=round(n / (ms / 1000), 2),
               first_compiled_step_s=round(first_s, 2),
               compile_s=round(max(first_s - ms / 1000, 0.0), 2),
               speedup=round(eager_ms / ms, 3))
    out["graph_breaks"] = _graph_breaks()
    _reset_dynamo()
    return out["first_loss_rel_diff"] < 2e-2


# ----------------------------------------------------------------------------- 7. convergence

def section_convergence(plan: Plan, device: torch.device, ctx: dict, out: dict) -> bool:
    from star_mamba.data.synthetic import SyntheticImages
    model = _build_model(plan, device, seed=0)
    optimizer = _optimizer(model, plan.train_lr)
    cfg = model.cfg
    n = plan.fixed_sequences * cfg.images_per_sequence
    data = SyntheticImages(num_images=plan.train_steps * n, img_size=cfg.img_size,
                           in_chans=cfg.in_chans, seed=0)
    out.update(model=_model_info(model, plan, device), steps=plan.train_steps, images_per_step=n,
               lr=plan.train_lr, warmup_steps=plan.warmup_steps, data="SyntheticImages(seed=0), "
               "a new batch every step", recipe="bf16 autocast, AdamW (0.9, 0.95), wd 0.05, "
               f"clip {plan.clip_grad}, linear warm-up")
    losses = out["losses"] = []
    torch.manual_seed(0)
    for step in range(plan.train_steps):
        lr = plan.train_lr * min(1.0, (step + 1) / (plan.warmup_steps + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.stack([data[i][0] for i in range(step * n, (step + 1) * n)]).to(device)
        losses.append(_train_step(model, optimizer, batch, device, plan.clip_grad).float().item())
    w = min(5, max(1, len(losses) // 2))
    first, last = statistics.fmean(losses[:w]), statistics.fmean(losses[-w:])
    finite = all(math.isfinite(x) for x in losses)
    out.update(window=w, first_mean=first, last_mean=last, finite=finite,
               criterion=f"mean of the last {w} losses < mean of the first {w}")
    out["summary"] = (f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; mean of "
                      f"first {w} {first:.4f}, last {w} {last:.4f}")
    return finite and last < first


# ----------------------------------------------------------------------------- the run

SECTION_FUNCS: dict[str, Callable[[Plan, torch.device, dict, dict], Optional[bool]]] = {
    "device": section_device, "tests": section_tests, "scan_accuracy": section_scan_accuracy,
    "scan_speed": section_scan_speed, "pretrain_step": section_pretrain_step,
    "compile": section_compile, "convergence": section_convergence}


# Hard time limit of each section when it runs in its own process (seconds).
SECTION_TIMEOUT = {"device": 120, "tests": 270, "scan_accuracy": 180, "scan_speed": 240,
                   "pretrain_step": 240, "compile": 330, "convergence": 180}


def run_section(name: str, plan: Plan, device: torch.device, ctx: dict) -> dict:
    """One section in this process; an exception becomes the entry's ``error``."""
    out: dict[str, Any] = {}
    entry: dict[str, Any] = dict(status="running", passed=None, seconds=None, result=out)
    t = time.perf_counter()
    try:
        passed = SECTION_FUNCS[name](plan, device, ctx, out)
        entry.update(status="ok", passed=passed)
    except Exception as e:  # recorded; the next section runs regardless
        entry.update(status="error", passed=False, error=_error_line(e),
                     traceback=traceback.format_exc(limit=-8)[-4000:])
    entry["seconds"] = round(time.perf_counter() - t, 2)
    return entry


def run_child(argv: list[str], result_path: Path, timeout: float) -> dict:
    """Run a section process; its entry from ``result_path``, or an error entry when it was
    killed at ``timeout``, crashed, or exited without writing one."""
    t = time.perf_counter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(SRC), env.get("PYTHONPATH")) if x)
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return dict(status="error", passed=False, seconds=round(time.perf_counter() - t, 2),
                    result={}, error=f"timed out: the section process was killed after "
                                     f"{timeout:.0f} s", output_tail=tail[-3000:])
    if result_path.exists():
        try:
            return json.loads(result_path.read_text())
        except ValueError as e:
            error = f"unreadable section result ({_error_line(e)})"
    else:
        error = f"the section process exited with code {proc.returncode} without a result"
    return dict(status="error", passed=False, seconds=round(time.perf_counter() - t, 2),
                result={}, error=error, output_tail=(proc.stdout + proc.stderr)[-3000:])


def _run_isolated(name: str, plan: Plan, ctx: dict, timeout: float) -> dict:
    """One section in a fresh process (own CUDA context and allocator, hard time limit): a
    crash, a sticky CUDA error or a hang costs that section only."""
    import tempfile
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="star_mamba_gpu_") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(_clean(dict(name=name, plan=dataclasses.asdict(plan), ctx=ctx))))
        entry = run_child([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, str(spec),
                           str(result)], result, timeout)
    ctx.update(entry.pop("ctx", None) or {})
    entry["process_seconds"] = round(time.perf_counter() - t, 2)  # with start-up and imports
    return entry


def _child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    plan = Plan(**spec["plan"])
    ctx = spec["ctx"]
    entry = run_section(spec["name"], plan, torch.device(plan.device), ctx)
    entry["ctx"] = ctx
    Path(result_path).write_text(json.dumps(_clean(entry), default=_json_default,
                                            allow_nan=False))
    return 0


def run_acceptance(output_dir: str | Path = "benchmarks/results/gpu", dry_run: bool = False,
                   compile_backend: Optional[str] = None, sections: Optional[list[str]] = None,
                   isolate: Optional[bool] = None, budget_s: Optional[float] = None,
                   log: Callable[[str], None] = print) -> dict:
    """Run every section (or ``sections``) and write ``gpu_acceptance.json`` / ``.md``.

    ``isolate`` (default: on for the GPU run, off for the dry run) runs each section in its own
    process under :data:`SECTION_TIMEOUT` and the plan's overall ``budget_s``.
    """
    plan = dry_plan() if dry_run else gpu_plan()
    if compile_backend:
        plan.compile_backend = compile_backend
        plan.notes = [x for x in plan.notes if "aot_eager" not in x]
        plan.notes.append(f"torch.compile backend set on the command line: {compile_backend}")
    if isolate is not None:
        plan.isolate = isolate
    if budget_s is not None:
        plan.budget_s = budget_s
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("star-mamba bench --gpu needs a CUDA device (torch.cuda.is_available() "
                           "is False); --dry-run runs the same code on CPU at tiny sizes")
    device = torch.device(plan.device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in sections or () if s not in SECTION_FUNCS]
    if unknown:
        raise UserError(f"unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    names = [s for s in RUN_ORDER if sections is None or s in sections]
    start = time.perf_counter()
    results: dict[str, Any] = dict(
        meta=dict(kind="star-mamba GPU acceptance run", dry_run=dry_run, device=str(device),
                  started=time.strftime("%Y-%m-%d %H:%M:%S %z"), command=" ".join(
                      ["star-mamba bench --gpu"] + (["--dry-run"] if dry_run else [])
                      + ([f"--budget {budget_s:g}"] if budget_s is not None else [])
                      + ([f"--sections {','.join(sections)}"] if sections else [])), isolated=plan.isolate,
                  budget_s=plan.budget_s, notes=plan.notes, wall_s=None, complete=False),
        plan=dataclasses.asdict(plan), sections={})
    ctx: dict[str, Any] = {}
    for i, name in enumerate(names, 1):
        log(f"[{i}/{len(names)}] {TITLES[name]} ...")
        left = None if plan.budget_s is None else plan.budget_s - (time.perf_counter() - start)
        if left is not None and left < 15:
            entry = dict(status="skipped", passed=None, seconds=0.0, result={},
                         reason=f"out of the run's time budget ({plan.budget_s} s)")
        elif plan.isolate:
            timeout = SECTION_TIMEOUT[name] if left is None else min(SECTION_TIMEOUT[name],
                                                                     left - 10)
            entry = _run_isolated(name, plan, ctx, timeout)
        else:
            entry = run_section(name, plan, device, ctx)
            try:
                _free(device)
            except Exception:
                pass
        results["sections"][name] = entry
        results["sections"] = {n: results["sections"][n] for n in SECTIONS
                               if n in results["sections"]}  # reported in section order
        summary = entry.get("result", {}).get("summary")
        log(f"    {entry['status']}"
            + (f" ({entry.get('error') or entry.get('reason')})"
               if entry.get("error") or entry.get("reason") else "")
            + (f": {summary}" if summary else "") + f"  [{entry['seconds']} s]")
        results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
        write_results(results, output_dir)
    results["meta"]["complete"] = True
    results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    write_results(results, output_dir)
    return results


def _json_default(x: Any):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return repr(x)


def _clean(x: Any) -> Any:
    """Non-finite floats as strings (JSON has no NaN), tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_results(results: dict, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    (output_dir / "gpu_acceptance.json").write_text(
        json.dumps(_clean(results), indent=1, default=_json_default, allow_nan=False))
    (output_dir / "gpu_acceptance.md").write_text(to_markdown(results))


# ----------------------------------------------------------------------------- markdown

def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if pct:
            return f"{x:.1%}"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.4g}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
            for r in rows]
    return out


def to_markdown(results: dict) -> str:
    meta, sections = results["meta"], results["sections"]
    out = [f"# STAR-Mamba GPU acceptance run{' (dry run, CPU)' if meta['dry_run'] else ''}", "",
           f"`{meta['command']}` on {meta['device']}, started {meta['started']}, "
           f"{meta['wall_s']} s{'' if meta['complete'] else ' (incomplete: still running or cut short)'}.",
           ""]
    out += [f"- {note}" for note in meta.get("notes", [])]
    out += ["", "## Summary", ""]
    rows = []
    for name in SECTIONS:
        e = sections.get(name)
        if e is None:
            rows.append([TITLES[name], "not run", "-", "-", ""])
            continue
        detail = e.get("error") or e.get("reason") or e["result"].get("summary", "")
        passed = {True: "yes", False: "NO", None: "-"}[e.get("passed")]
        rows.append([TITLES[name], e["status"], passed, e.get("seconds"), detail])
    out += _table(["section", "status", "passed", "seconds", "result / error"], rows)
    for name in SECTIONS:
        e = sections.get(name)
        if e is None:
            continue
        out += ["", f"## {TITLES[name]}", ""]
        if e.get("error"):
            out += [f"**Error:** `{e['error']}`", ""]
        try:
            out += _DETAILS[name](e["result"])
        except Exception as err:  # partial results of a failed section: never break the report
            out += [f"(details unavailable: {_error_line(err)})"]
    return "\n".join(out) + "\n"


def _md_device(r: dict) -> list[str]:
    keys = ("name", "capability", "total_memory_gib", "torch", "triton", "cuda", "mamba_ssm",
            "scan_backends", "default_scan_backend", "bf16_peak_tflops", "gemm_bf16_tflops",
            "gemm_fraction_of_peak", "peak_note")
    return _table(["fact", "value"], [[k, r[k]] for k in keys if k in r])


def _md_tests(r: dict) -> list[str]:
    out = _table(["passed", "failed", "errors", "skipped", "exit code"],
                 [[r.get("passed"), r.get("failed"), r.get("errors"), r.get("skipped"),
                   r.get("returncode")]])
    if r.get("tail"):
        out += ["", "```", *r["tail"].splitlines()[-20:], "```"]
    return out


def _md_accuracy(r: dict) -> list[str]:
    rows = []
    for x in r.get("rows", []):
        if "error" in x:
            rows.append([x["backend"], x["dtype"], "-", "-", "-", "-", "NO", x["error"]])
            continue
        g = max(x["grads"].values(), key=lambda e: e["max_rel"])
        rows.append([x["backend"], x["dtype"], x["y"]["max_abs"], x["y"]["max_rel"],
                     x["last_state"]["max_rel"], g["max_rel"], "yes" if x["passed"] else "NO",
                     f"worst: {x['worst']}" + (" (fell back to torch)" if x.get("fell_back_to_torch")
                                               else "")])
    shape = r.get("shape", {})
    return [f"Shape {shape}; {r.get('metric', '')}.", ""] + _table(
        ["backend", "dtype", "y max abs", "y max rel", "last state max rel", "worst grad max rel",
         "passed", "note"], rows)


def _md_scan_speed(r: dict) -> list[str]:
    rows = [[x["backend"], x["dtype"], x["dim"], x["images"], x["length"], x["batch"],
             x.get("forward_ms"), x.get("fwd_bwd_ms"), x.get("peak_mib"),
             x.get("speedup_vs_torch"), x.get("error") or (
                 "fell back to torch" if x.get("fell_back_to_torch") else "")]
            for x in r.get("rows", [])]
    return [f"Batch: {r.get('batch_rule', '')}; the reference only up to L = "
            f"{r.get('reference_max_len')}.", ""] + _table(
        ["backend", "dtype", "D", "K", "L", "batch", "forward ms", "fwd+bwd ms", "peak MiB",
         "vs torch", "note"], rows)


def _md_step(r: dict) -> list[str]:
    out = []
    if r.get("model"):
        out += [f"Model: {r['model']}; {r.get('recipe', '')}.", ""]
    out += _table(["sequences", "images", "fits", "seconds", "peak GiB"],
                  [[t["sequences"], t["images"], t["fits"], t["seconds"], t["peak_gib"]]
                   for t in r.get("search", [])])
    if "images_per_s" in r:
        out += [""] + _table(["batch (images)", "step ms", "images/s", "TFLOP/s", "MFU",
                              "of measured GEMM", "peak GiB"],
                             [[r["images"], r["step_ms"], r["images_per_s"], r["achieved_tflops"],
                               _fmt(r["mfu"], pct=True), r["fraction_of_measured_gemm"],
                               r["peak_gib"]]])
        out += ["", r.get("flops_note", "")]
    return out


def _md_compile(r: dict) -> list[str]:
    out = [f"{r.get('call', '')} at {r.get('images')} images per step.", ""]
    out += _table(["mode", "step ms", "images/s", "first step s", "compile s", "first loss"],
                  [["eager", r.get("eager_step_ms"), r.get("eager_images_per_s"), "-", "-",
                    r.get("first_loss_eager")],
                   ["compiled", r.get("compiled_step_ms"), r.get("compiled_images_per_s"),
                    r.get("first_compiled_step_s"), r.get("compile_s"),
                    r.get("first_loss_compiled")]])
    out += ["", f"Speed-up (eager ms / compiled ms): {_fmt(r.get('speedup'))}; graph breaks: "
            f"{(r.get('graph_breaks') or {}).get('count', '-')}."]
    for b in (r.get("graph_breaks") or {}).get("top", []):
        out.append(f"- {b['count']} x {b['reason']}")
    return out


def _md_convergence(r: dict) -> list[str]:
    losses = r.get("losses", [])
    out = [f"{r.get('steps')} steps of {r.get('images_per_step')} images, lr {r.get('lr')}; "
           f"{r.get('criterion', '')}.", ""]
    out += _table(["step", "loss"], [[i + 1, x] for i, x in enumerate(losses)])
    return out


_DETAILS: dict[str, Callable[[dict], list[str]]] = {
    "device": _md_device, "tests": _md_tests, "scan_accuracy": _md_accuracy,
    "scan_speed": _md_scan_speed, "pretrain_step": _md_step, "compile": _md_compile,
    "convergence": _md_convergence}


CHILD_FLAG = "--section-process"  # argv of an isolated run's section: FLAG SPEC.json RESULT.json


def main(argv: Optional[list[str]] = None) -> int:
    """``python benchmarks/gpu/acceptance.py [options]`` is ``star-mamba bench --gpu [options]``;
    with :data:`CHILD_FLAG` SPEC RESULT it runs one section of an isolated run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return _child_main(argv[1], argv[2])
    from star_mamba.cli import main as cli_main
    return cli_main(["bench", "--gpu", *argv])


if __name__ == "__main__":
    sys.exit(main())
