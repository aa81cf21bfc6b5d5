"""Fused memory-bound ops against the code they replace, side by side in one process: the
SwiGLU MLP of a STAR block (timm's ``SwiGLU`` vs ``ops/swiglu.py``'s one-node version), forward
+ backward, float32 and bf16 autocast, interleaved repetitions (median), plus the activation
bytes each keeps for the backward.

    PYTHONPATH=src .venv/bin/python benchmarks/fused_ops.py [--out benchmarks/results] [--device cpu]

Writes fused_ops.json / .md with the machine's float32 GEMM rate beside the times.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from star_mamba.models.blocks import SwiGLUMlp
from star_mamba.tools.bench import gemm_flops

WIDTHS = {"star_tiny": 192, "star_base": 768}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_seconds(mlp, x, grad, autocast: bool, device) -> float:
    """One forward + backward of ``mlp`` on ``x``."""
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = mlp(x)
    out.backward(grad)
    _sync(device)
    return time.perf_counter() - start


def saved_bytes(mlp, x, autocast: bool, device) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if t.shape[:-1].numel() == x.shape[:-1].numel():  # one row per token: an activation
            seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            mlp(x)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=2 * 624, help="tokens per step (B x L)")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, dim in WIDTHS.items():
        hidden = int(dim * 8 / 3)
        torch.manual_seed(0)
        plain = SwiGLUMlp(dim, hidden, fused=False).to(device)
        fused = SwiGLUMlp(dim, hidden, fused=True).to(device)
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(1, args.tokens, dim, device=device, requires_grad=True)
        grad = torch.randn(1, args.tokens, dim, device=device)
        for autocast in (False, True):
            times = {"timm": [], "fused": []}
            for _ in range(2):  # warm-up
                step_seconds(plain, x, grad, autocast, device)
                step_seconds(fused, x, grad, autocast, device)
            for _ in range(args.reps):  # interleaved, so drift hits both alike
                times["timm"].append(step_seconds(plain, x, grad, autocast, device))
                times["fused"].append(step_seconds(fused, x, grad, autocast, device))
            t_timm, t_fused = (statistics.median(times[k]) * 1e3 for k in ("timm", "fused"))
            row = dict(model=name, dim=dim, hidden=hidden, tokens=args.tokens,
                       dtype="bf16 autocast" if autocast else "float32",
                       timm_ms=round(t_timm, 2), fused_ms=round(t_fused, 2),
                       speedup=round(t_timm / t_fused, 3),
                       timm_saved_kib_per_token=round(
                           saved_bytes(plain, x, autocast, device) / args.tokens / 1024, 2),
                       fused_saved_kib_per_token=round(
                           saved_bytes(fused, x, autocast, device) / args.tokens / 1024, 2))
            rows.append(row)
            print(row)
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               + (torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"cpu; GEMM {gemm_flops() / 1e9:.1f} GFLOP/s (float32, 2048^3)"))
    command = f"PYTHONPATH=src .venv/bin/python benchmarks/fused_ops.py --device {args.device}"
    out = Path(args.out)
    (out / "fused_ops.json").write_text(json.dumps(dict(command=command, machine=machine,
                                                        rows=rows), indent=2) + "\n")
    lines = ["# Fused SwiGLU MLP vs timm's SwiGLU (forward + backward)", "", f"`{command}`", "",
             f"Machine: {machine}.", "",
             "| model | D | hidden | tokens | dtype | timm ms | fused ms | speed-up | "
             "timm saved KiB/token | fused saved KiB/token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['dim']} | {r['hidden']} | {r['tokens']} | {r['dtype']} | "
              f"{r['timm_ms']} | {r['fused_ms']} | {r['speedup']}x | "
              f"{r['timm_saved_kib_per_token']} | {r['fused_saved_kib_per_token']} |" for r in rows]
    (out / "fused_ops.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
