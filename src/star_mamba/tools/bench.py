"""Benchmarks behind ``star-mamba bench``: all measured side by side in one process.

(a) selective-scan backends against the reference loop and mambapy's parallel scan (pscan),
    forward and forward+backward, at STAR-tiny and STAR-base widths for K = 1, 4, 8 at 192 px;
(b) a full STAR pretraining step for K = 1, 2, 4, 8: images/s, cost per image relative to K = 1,
    peak memory;
(c) the achieved FLOP/s of that step against this machine's own GEMM FLOP/s;
(d) the default Fashion-MNIST pretraining step per CPU scan backend, eager and under
    ``torch.compile(model)`` side by side (compile time reported apart).
Results go to a JSON file and a markdown table. Timings are medians of repeated runs after a
warm-up; they are benchmarks, never tests.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops import available_backends, selective_scan


def _median_ms(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _mambapy_scan():
    """mambapy's selective scan built on its parallel scan, or None if mambapy is missing."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        # mambapy works time-major with channels last: (b, L, d, N)
        dt = delta.transpose(1, 2)  # (b, L, d)
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, N)
        BX = (dt * u.transpose(1, 2)).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)  # (b, L, d, N)
        hs = pscan(dA, BX)  # (b, L, d, N)
        y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # (b, d, L)
        if D is not None:
            y = y + D[:, None] * u
        if z is not None:
            y = y * F.silu(z)
        return y
    return scan


def scan_inputs(batch: int, dim: int, length: int, d_state: int = 16, seed: int = 0,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """Mamba-initialised inputs (A = -(1..N), dt bias in [1e-3, 0.1] before softplus)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (torch.log(torch.tensor(0.1))
                                                   - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    x = dict(u=torch.randn(batch, dim, length, generator=g),
             delta=torch.randn(batch, dim, length, generator=g) * 0.1,
             A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1),
             B=torch.randn(batch, d_state, length, generator=g),
             C=torch.randn(batch, d_state, length, generator=g),
             D=torch.ones(dim), z=torch.randn(batch, dim, length, generator=g),
             delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device) for k, v in x.items()}


def bench_scan(widths=(192, 768), images=(1, 4, 8), batch: int = 2, repeats: int = 5,
               reference_max_len: int = 640, device: str = "cpu") -> list[dict]:
    """Scan backends side by side; L = tokens the encoder reads for K images at 192 px."""
    impls: dict[str, Callable] = {name: (lambda name=name: lambda **kw: selective_scan(
        **kw, delta_softplus=True, backend=name))() for name in available_backends(device)}
    pscan = _mambapy_scan()
    if pscan is not None:
        impls["mambapy_pscan"] = lambda **kw: pscan(**kw, delta_softplus=True)
    rows = []
    for dim in widths:
        for k in images:
            length = k * (144 + 16) - 16  # 9 clusters of 16 + one separator per image, minus the last
            inputs = scan_inputs(batch, dim, length, device=device)
            for name, fn in impls.items():
                if name == "reference" and length > reference_max_len:
                    continue
                leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
                reps = 1 if name == "reference" else repeats

                def forward():
                    with torch.no_grad():
                        fn(**inputs)

                def forward_backward():
                    fn(**leaves).sum().backward()
                    for t in leaves.values():
                        t.grad = None

                rows.append(dict(backend=name, dim=dim, images=k, length=length, batch=batch,
                                 forward_ms=round(_median_ms(forward, reps), 2),
                                 fwd_bwd_ms=round(_median_ms(forward_backward, reps), 2)))
    for row in rows:  # ratios against pscan and the reference at the same shape
        for base in ("mambapy_pscan", "reference"):
            ref = next((r for r in rows if r["backend"] == base and r["dim"] == row["dim"]
                        and r["images"] == row["images"]), None)
            if ref is not None:
                row[f"speedup_vs_{base}"] = round(ref["fwd_bwd_ms"] / row["fwd_bwd_ms"], 2)
    return rows


def gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 GEMM rate (FLOP/s) on an n x n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = _median_ms(lambda: torch.mm(a, b), repeats, warmup=2)
    return 2 * n ** 3 / (ms / 1000)


def _step_flops(model, images: torch.Tensor) -> float:
    """FLOPs of one forward+backward (``tools/flops.py``: depthwise conv and CPU attention
    counted correctly, the scan added analytically)."""
    from .flops import step_flops
    return float(step_flops(model, images).total)


def bench_step(model_name: str = "star_tiny", images=(1, 2, 4, 8), sequences: int = 4,
               img_size: int = 192, repeats: int = 3, gemm: Optional[float] = None,
               **overrides) -> list[dict]:
    """One pretraining step (forward+backward) per K, same number of sequences each time."""
    import resource

    from ..models.registry import create_pretrain_model
    rows = []
    for k in images:
        torch.manual_seed(0)
        model = create_pretrain_model(model_name, img_size=img_size, images_per_sequence=k,
                                      **overrides)
        batch = torch.randn(sequences * k, model.cfg.in_chans, img_size, img_size)

        def step():
            model(batch).loss.backward()
            model.zero_grad(set_to_none=True)

        ms = _median_ms(step, repeats)
        flops = _step_flops(model, batch)
        q = (model.cfg.num_segments - 1) * model.cfg.tokens_per_segment
        rows.append(dict(model=model_name, images=k, tokens=model.cfg.seq_len,
                         batch_images=sequences * k, step_ms=round(ms, 1),
                         decoder_mask_mb=round(q * q / 2**20, 2),  # bool (queries, keys)
                         images_per_s=round(sequences * k / (ms / 1000), 2),
                         ms_per_image=round(ms / (sequences * k), 2),
                         achieved_gflops=round(flops / (ms / 1000) / 1e9, 1),
                         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
    base = rows[0]["ms_per_image"]
    for row in rows:
        row["cost_per_image_vs_k1"] = round(row["ms_per_image"] / base, 3)
        if gemm:
            row["fraction_of_gemm"] = round(row["achieved_gflops"] * 1e9 / gemm, 3)
    return rows


def bench_default_run(repeats: int = 5, compile: bool = True,
                      compile_backend: Optional[str] = None) -> list[dict]:
    """The default Fashion-MNIST pretraining step (forward+backward) with each CPU scan backend
    (same inputs), eager and compiled with ``torch.compile(model)`` side by side.

    The compiled model is a copy with the same weights; ``compile_s`` is the first compiled
    step's time less a compiled step's median. A compile failure is recorded in the row
    (``compile_error``) and the eager numbers are kept.
    """
    import copy

    from ..engine.config import load_config
    from ..models.pretrain import StarPretrain
    cfg = load_config("pretrain/fashion_mnist")
    rows = []
    for backend in [b for b in ("torch", "numba") if b in available_backends("cpu")]:
        torch.manual_seed(0)
        mcfg = cfg.model.star_config().replace(scan_backend=backend)
        model = StarPretrain(mcfg)
        images = torch.randn(cfg.optim.batch_size, mcfg.in_chans, mcfg.img_size, mcfg.img_size)

        def step(m=model):
            m(images).loss.backward()
            m.zero_grad(set_to_none=True)

        ms = _median_ms(step, repeats)
        row = dict(backend=backend, step_ms=round(ms, 1),
                   images_per_s=round(cfg.optim.batch_size / (ms / 1000), 2))
        rows.append(row)
        if compile:
            row.update(_compiled_step(copy.deepcopy(model), step, repeats, compile_backend))
            if "compiled_step_ms" in row:
                row["compiled_images_per_s"] = round(
                    cfg.optim.batch_size / (row["compiled_step_ms"] / 1000), 2)
                row["compile_speedup"] = round(ms / row["compiled_step_ms"], 2)
    for row in rows:
        row["speedup_vs_torch"] = round(rows[0]["step_ms"] / row["step_ms"], 2)
    return rows


def _compiled_step(model, step: Callable, repeats: int, backend: Optional[str]) -> dict:
    """Time ``step`` on ``torch.compile(model)``: compile time apart, or the error."""
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    out: dict = dict(compile_backend=backend or "inductor")
    try:
        compiled = torch.compile(model, **({} if backend is None else dict(backend=backend)))
        t = time.perf_counter()
        step(compiled)
        first_s = time.perf_counter() - t
        ms = _median_ms(lambda: step(compiled), repeats)
    except Exception as e:  # e.g. a graph dynamo cannot trace: recorded, never fatal
        text = str(e).strip().splitlines()
        out["compile_error"] = f"{type(e).__name__}: {text[0][:300] if text else ''}"
        return out
    finally:
        try:
            torch._dynamo.reset()
        except Exception:
            pass
    out.update(compiled_step_ms=round(ms, 1), compile_s=round(max(first_s - ms / 1000, 0.0), 1))
    return out


def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                torch=torch.__version__, threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def to_markdown(results: dict) -> str:
    out = [f"Machine: {results['machine']['processor']}, {results['machine']['threads']} threads, "
           f"torch {results['machine']['torch']}; GEMM {results['gemm_gflops']:.1f} GFLOP/s "
           "(float32, 2048^3).", ""]
    out += ["### Selective scan, forward+backward (batch 2, float32)", "",
            "| backend | dim | K | L | forward ms | fwd+bwd ms | vs mambapy pscan | vs reference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["scan"]:
        out.append(f"| {r['backend']} | {r['dim']} | {r['images']} | {r['length']} | "
                   f"{r['forward_ms']} | {r['fwd_bwd_ms']} | "
                   f"{r.get('speedup_vs_mambapy_pscan', '-')}x | {r.get('speedup_vs_reference', '-')}x |")
    out += ["", f"### Pretraining step ({results['step'][0]['model']}, 192 px, forward+backward)", "",
            "| K | tokens/seq | images | step ms | images/s | ms/image | vs K=1 | GFLOP/s | of GEMM "
            "| peak RSS MB | decoder mask MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["step"]:
        out.append(f"| {r['images']} | {r['tokens']} | {r['batch_images']} | {r['step_ms']} | "
                   f"{r['images_per_s']} | {r['ms_per_image']} | {r['cost_per_image_vs_k1']}x | "
                   f"{r['achieved_gflops']} | {r.get('fraction_of_gemm', '-')} | "
                   f"{r['peak_rss_mb']} | {r['decoder_mask_mb']} |")
    out += ["", "### Default Fashion-MNIST pretraining step (star_tiny, 32 images, K = 4, "
            "forward+backward): eager vs torch.compile", "",
            "| scan backend | eager ms | eager images/s | speed-up vs torch | compiled ms "
            "| compiled images/s | compiled vs eager | compile s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["default_run"]:
        if "compile_error" in r:
            compiled = f"failed: {r['compile_error'].replace('|', '/')} | - | - | -"
        elif "compiled_step_ms" in r:
            compiled = (f"{r['compiled_step_ms']} | {r['compiled_images_per_s']} | "
                        f"{r['compile_speedup']}x | {r['compile_s']}")
        else:
            compiled = "- | - | - | -"
        out.append(f"| {r['backend']} | {r['step_ms']} | {r['images_per_s']} | "
                   f"{r['speedup_vs_torch']}x | {compiled} |")
    return "\n".join(out) + "\n"


def run_all(output_dir: str | Path = "runs/bench", quick: bool = False,
            compile_backend: Optional[str] = None) -> dict:
    """Run (a) to (d) and write ``bench.json`` and ``bench.md`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    gemm = gemm_flops()
    scan_kw = dict(widths=(192,), images=(1, 4), repeats=2) if quick else {}
    step_kw = dict(images=(1, 4), sequences=1, repeats=1) if quick else {}
    results = dict(machine=machine(), gemm_gflops=round(gemm / 1e9, 1),
                   scan=bench_scan(**scan_kw), step=bench_step(gemm=gemm, **step_kw),
                   default_run=bench_default_run(repeats=2 if quick else 5,
                                                 compile_backend=compile_backend))
    (output_dir / "bench.json").write_text(json.dumps(results, indent=1))
    (output_dir / "bench.md").write_text(to_markdown(results))
    return results
