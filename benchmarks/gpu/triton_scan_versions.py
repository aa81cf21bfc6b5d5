"""Triton scan v3 against v2 (and the torch scan) on one GPU: correctness first, then speed.

    PYTHONPATH=src python benchmarks/gpu/triton_scan_versions.py --out OUT.json [--budget 150]

1. Checks: every variant against the float64 reference loop (small shapes: fp32 and bf16, L not a
   multiple of any block, dim not a multiple of 32, d_state 12; both layouts), and v3 against the
   torch scan at the STAR-B shape; max |err| / max |ref| of y and of every gradient.
2. Timings (bf16 inputs, d_state 16, 256 images per batch: 256/K sequences of L = 160 K - 16):
   forward and forward+backward of selective_scan(..., delta_softplus=True) with D, z and
   delta_bias, median of triton.testing.do_bench, and the peak memory of one forward+backward.
   Variants: torch; v2 (the old path: float32 copies, bias/softplus/D/gate in PyTorch around the
   v2 kernel, kept in benchmarks/gpu/triton_scan_v2.py); v3 (the package's triton backend);
   v3/model and v2/model (u channel-major, delta and z time-major views, B and C slices of one
   tensor, as Mamba feeds the scan); and v3's two kernels alone (chunk 64, the default, and 32).
Every variant runs under try/except (errors are recorded, never raised); past --budget seconds
nothing new starts. Prints a table; writes everything to the JSON file.

--smoke runs every code path on CPU at toy sizes (needs TRITON_INTERPRET=1; timings there are
wall-clock and meaningless): a dry run for machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for triton_scan_v2
if str(HERE.parents[1] / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parents[1] / "src"))  # this checkout's star_mamba, as PYTHONPATH=src

from star_mamba.ops.testing import error_stats, fallbacks, scan_with_grads  # noqa: E402
from star_mamba.ops.testing import scan_inputs as _scan_inputs  # noqa: E402

DEV = "cuda"


def scan_inputs(b: int, d: int, L: int, n: int = 16, dtype=torch.bfloat16, seed: int = 0,
                layout: str = "channel") -> dict:
    """star_mamba.ops.testing.scan_inputs on DEV: u, delta, z, B, C in dtype, A, D,
    delta_bias float32; layout "channel" or "model" (as Mamba feeds the scan)."""
    return _scan_inputs(b, d, L, n, dtype=dtype, device=DEV, seed=seed, layout=layout)


# ----------------------------------------------------------------------------- variants

def _v2_scan():
    """The old dispatcher path around the v2 kernel: float32 contiguous copies, bias + softplus
    and D + gate in PyTorch under autograd, the kernel in an autograd.Function."""
    import triton_scan_v2 as v2
    from star_mamba.ops.scan_reference import _finish, _prepare_delta

    class Core(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C):
            y, last, ckpt = v2.forward(u, delta, A, B, C)
            ctx.save_for_backward(u, delta, A, B, C, ckpt)
            return y, last

        @staticmethod
        def backward(ctx, dy, dlast):
            u, delta, A, B, C, ckpt = ctx.saved_tensors
            dy = torch.zeros_like(u) if dy is None else dy.contiguous()
            dlast = (u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if dlast is None
                     else dlast.contiguous())
            return v2.backward(u, delta, A, B, C, ckpt, dy, dlast)

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False):
        dtype = u.dtype
        u32, A32, B32, C32, d32 = (t.float().contiguous() for t in (u, A, B, C, delta))
        d32 = _prepare_delta(d32, delta_bias, delta_softplus).contiguous()
        y, last = Core.apply(u32, d32, A32, B32, C32)
        y = _finish(y, u32, D, None if z is None else z.float())
        return (y.to(dtype), last.to(dtype)) if return_last_state else y.to(dtype)

    return scan


def variants() -> dict:
    from star_mamba.ops import selective_scan
    out = {"torch": lambda **kw: selective_scan(**kw, backend="torch"),
           "v3": lambda **kw: selective_scan(**kw, backend="triton")}
    try:
        out["v2"] = _v2_scan()
    except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
        print(f"v2 unavailable: {type(e).__name__}: {e}")
    return out


def run_with_grads(fn, inputs: dict) -> dict:
    """y, last_state and grad_<name> of the probe loss (star_mamba.ops.testing)."""
    return scan_with_grads(fn, inputs).tensors()


def rel_errors(got: dict, ref: dict) -> dict:
    """max |got - ref| / max |ref| of each quantity."""
    return {k: error_stats(got[k], ref[k])["max_rel"] for k in ref}


# ----------------------------------------------------------------------------- 1. checks

CHECKS = [  # (b, d, n, L, dtype, tolerance) against the float64 reference; tests/test_gpu.py
    (2, 40, 16, 130, torch.float32, 1e-4),  # checks more shapes: these are a sanity check
    (1, 72, 12, 257, torch.bfloat16, 3e-2),
]


def run_checks(fns: dict, deadline: float, big: bool = True) -> list[dict]:
    from star_mamba.ops.scan_reference import scan_reference
    rows = []
    for b, d, n, L, dtype, tol in CHECKS:
        for layout in ("channel", "model"):
            inputs = scan_inputs(b, d, L, n, dtype, seed=1, layout=layout)
            ref = run_with_grads(
                lambda **kw: scan_reference(**{k: v.double() if torch.is_tensor(v) else v
                                               for k, v in kw.items()}), inputs)
            for name, fn in fns.items():
                if time.time() > deadline:
                    break
                row = dict(variant=name, layout=layout, shape=[b, d, n, L],
                           dtype=str(dtype).replace("torch.", ""), tol=tol)
                try:
                    errs = rel_errors(run_with_grads(fn, inputs), ref)
                    worst = max(errs, key=errs.get)
                    row.update(max_rel={k: float(f"{v:.3g}") for k, v in errs.items()},
                               worst=worst, worst_rel=float(f"{errs[worst]:.3g}"),
                               ok=bool(errs[worst] <= tol))
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=f"{type(e).__name__}: {e}")
                rows.append(row)
                print(f"check {name:6s} {layout:7s} {str(row['shape']):18s} {row['dtype']:9s} "
                      f"{'ok' if row['ok'] else 'FAIL'} {row.get('worst', '')} "
                      f"{row.get('worst_rel', row.get('error', ''))}", flush=True)
    # v3 against the torch scan at the STAR-B shape (the reference loop is too slow there)
    if big and time.time() < deadline and "v3" in fns:
        inputs = scan_inputs(64, 768, 624, 16, torch.float32, seed=2, layout="model")
        row = dict(variant="v3", layout="model", shape=[64, 768, 16, 624], dtype="float32",
                   tol=1e-4, against="torch")
        try:
            errs = rel_errors(run_with_grads(fns["v3"], inputs),
                              run_with_grads(fns["torch"], inputs))
            worst = max(errs, key=errs.get)
            row.update(max_rel={k: float(f"{v:.3g}") for k, v in errs.items()}, worst=worst,
                       worst_rel=float(f"{errs[worst]:.3g}"), ok=bool(errs[worst] <= 1e-4))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        print(f"check v3 vs torch at STAR-B shape: {'ok' if row['ok'] else 'FAIL'} "
              f"{row.get('worst', '')} {row.get('worst_rel', row.get('error', ''))}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. timings

def _bench_ms(fn) -> float:
    if DEV == "cpu":  # --smoke
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    return float(triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median"))


def _peak_mib(fn) -> float:
    if DEV == "cpu":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def time_scan(fn, inputs: dict) -> dict:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            fn(**inputs, delta_softplus=True)

    def forward_backward():
        fn(**leaves, delta_softplus=True).float().sum().backward()
        for t in leaves.values():
            t.grad = None

    forward_backward()  # compile / warm up
    return dict(fwd_ms=round(_bench_ms(forward), 4),
                fwd_bwd_ms=round(_bench_ms(forward_backward), 4),
                peak_mib=round(_peak_mib(forward_backward), 1))


def time_kernels(inputs: dict, chunk: int) -> dict:
    """v3's forward and backward kernels alone (host-side preparation included)."""
    from star_mamba.ops import scan_triton as st
    x = inputs
    extra = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    y, last, ckpt = st.forward(*args, **extra, chunk=chunk)
    dy = torch.randn_like(y)
    fwd = lambda: st.forward(*args, **extra, chunk=chunk)  # noqa: E731
    bwd = lambda: st.backward(*args, ckpt, dy, None, **extra, chunk=chunk)  # noqa: E731
    bwd()
    return dict(fwd_ms=round(_bench_ms(fwd), 4), bwd_ms=round(_bench_ms(bwd), 4),
                ckpt_mib=round(ckpt.numel() * 4 / 2 ** 20, 1))


SHAPES = [(768, 4), (768, 1), (768, 8), (192, 1), (192, 4), (192, 8)]  # (D, K), STAR-B first


def run_timings(fns: dict, deadline: float, images: int = 256, rows: list | None = None,
                save=lambda: None) -> list[dict]:
    """Appends to ``rows`` (and calls ``save``) after every measurement."""
    rows = [] if rows is None else rows
    plan = [("v3", "channel"), ("v3", "model"), ("v2", "channel"), ("v2", "model"),
            ("torch", "channel")]
    for D, K in SHAPES:
        L, b = 160 * K - 16, images // K
        for layout in ("channel", "model"):
            if time.time() > deadline:
                break
            inputs = scan_inputs(b, D, L, 16, torch.bfloat16, layout=layout)
            for name, lay in plan:
                if lay != layout or name not in fns or time.time() > deadline:
                    continue
                row = dict(variant=name, layout=layout, D=D, K=K, L=L, batch=b)
                try:
                    row.update(time_scan(fns[name], inputs))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                torch.cuda.empty_cache()
                rows.append(row)
                save()
                print(f"time {name:6s} {layout:7s} D{D:<4d} K{K} L{L:<5d} b{b:<4d} "
                      f"fwd {row.get('fwd_ms', '-')!s:>8} ms  "
                      f"fwd+bwd {row.get('fwd_bwd_ms', '-')!s:>8} ms  "
                      f"peak {row.get('peak_mib', '-')!s:>8} MiB {row.get('error', '')}",
                      flush=True)
            if layout == "model" and "v3" in fns:
                for chunk in (64, 32):
                    if time.time() > deadline:
                        break
                    row = dict(variant=f"v3 kernels, chunk {chunk}", layout=layout, D=D, K=K, L=L,
                               batch=b)
                    try:
                        row.update(time_kernels(inputs, chunk))
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    save()
                    print(f"kern {row['variant']:18s} D{D:<4d} K{K} "
                          f"fwd {row.get('fwd_ms', '-')} ms bwd {row.get('bwd_ms', '-')} ms "
                          f"ckpt {row.get('ckpt_mib', '-')} MiB {row.get('error', '')}", flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    out = []
    by = {(r["variant"], r["layout"], r["D"], r["K"]): r for r in rows if "fwd_bwd_ms" in r}
    for (name, layout, D, K), r in by.items():
        if name != "v3":
            continue
        s = dict(layout=layout, D=D, K=K, v3_fwd_bwd_ms=r["fwd_bwd_ms"])
        for base in ("v2", "torch"):
            o = by.get((base, layout, D, K)) or by.get((base, "channel", D, K))
            if o:
                s[f"x_vs_{base}_fwd_bwd"] = round(o["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
                s[f"x_vs_{base}_fwd"] = round(o["fwd_ms"] / r["fwd_ms"], 2)
        out.append(s)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds after which nothing new starts (default 150)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on CPU under TRITON_INTERPRET=1 (a dry run)")
    args = parser.parse_args(argv)
    t0 = time.time()
    result = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), budget_s=args.budget)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every step: a run killed by a time limit keeps what it measured
        result["elapsed_s"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))

    try:
        import triton
        images = 256
        if args.smoke:
            global DEV, CHECKS, SHAPES
            assert os.environ.get("TRITON_INTERPRET") == "1", "--smoke needs TRITON_INTERPRET=1"
            DEV, images = "cpu", 4
            CHECKS, SHAPES = CHECKS[:1] + [(1, 40, 12, 21, torch.bfloat16, 3e-2)], [(40, 1)]
            result["smoke"] = True
        else:
            result.update(device=torch.cuda.get_device_name(), sms=torch.cuda
                          .get_device_properties(0).multi_processor_count)
        result.update(torch=torch.__version__, triton=triton.__version__)
        torch.backends.cuda.matmul.allow_tf32 = False
        fns = variants()
        result["checks"] = run_checks(fns, t0 + 0.35 * args.budget, big=not args.smoke)
        save()
        run_timings(fns, t0 + args.budget, images, result.setdefault("timings", []), save)
        result["speedups"] = speedups(result["timings"])
        result["fallen_back"] = fallbacks()
    except Exception as e:  # noqa: BLE001 - write what there is
        result["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    save()
    print("\nspeedups of v3 (fwd+bwd):")
    for s in result.get("speedups", []):
        print("  ", s)
    n_fail = sum(not c.get("ok") for c in result.get("checks", []))
    print(f"checks: {len(result.get('checks', [])) - n_fail} ok, {n_fail} failed; "
          f"fallen back: {result.get('fallen_back')}; {result['elapsed_s']} s -> {args.out}")
    if result.get("fallen_back"):
        print("WARNING: a kernel fell back to the torch scan: its timings are the torch scan's")
    ok = n_fail == 0 and "error" not in result and not result.get("fallen_back")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
