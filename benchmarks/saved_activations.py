"""Bytes saved for the backward per token of a STAR pretraining step: plain, with the fused
memory-bound ops (``model.fused_ops``: the one-node SwiGLU of ``ops/swiglu.py``), and with
activation checkpointing (``run.grad_checkpointing``), counted with
``torch.autograd.graph.saved_tensors_hooks`` on CPU (float32; bf16 autocast roughly halves the
float tensors).

    PYTHONPATH=src .venv/bin/python benchmarks/saved_activations.py [--out benchmarks/results]

Writes saved_activations.json / .md. Tensors saved twice (one tensor seen by two ops) are
counted once per distinct storage.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from star_mamba.models.blocks import SwiGLUMlp
from star_mamba.models.pretrain import StarPretrain
from star_mamba.models.registry import model_config

MODELS = {"star_tiny": dict(img_size=192, images_per_sequence=4),
          "star_base": dict(img_size=192, images_per_sequence=4)}


def saved_bytes(model: StarPretrain, images: torch.Tensor) -> int:
    """Distinct storage bytes autograd keeps for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    args = p.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        cfg = model_config(name, scan_backend="torch", **MODELS[name])
        model = StarPretrain(cfg).train()
        images = torch.randn(cfg.images_per_sequence, cfg.in_chans, cfg.img_size, cfg.img_size)
        tokens = (cfg.num_segments - 1) * cfg.tokens_per_segment  # encoder tokens per sequence
        row = dict(model=name, **MODELS[name], tokens_per_sequence=tokens)
        for label, checkpointed, fused in (("plain", False, False), ("fused", False, True),
                                           ("checkpointed", True, False)):
            model.set_grad_checkpointing(checkpointed)
            for m in model.modules():
                if isinstance(m, SwiGLUMlp):
                    m.fused = fused
            row[f"{label}_kib_per_token"] = round(saved_bytes(model, images) / tokens / 1024, 1)
        row["fused_fraction"] = round(row["fused_kib_per_token"] / row["plain_kib_per_token"], 3)
        row["saved_fraction"] = round(row["checkpointed_kib_per_token"]
                                      / row["plain_kib_per_token"], 3)
        rows.append(row)
        print(row)
    out = Path(args.out)
    command = "PYTHONPATH=src .venv/bin/python benchmarks/saved_activations.py"
    (out / "saved_activations.json").write_text(json.dumps(dict(command=command, rows=rows),
                                                           indent=2) + "\n")
    lines = ["# Bytes saved for the backward per encoder token (float32, CPU)", "", f"`{command}`",
             "", "| model | K | px | tokens | plain KiB/token | fused ops KiB/token | ratio | "
             "checkpointed KiB/token | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['images_per_sequence']} | {r['img_size']} | "
              f"{r['tokens_per_sequence']} | {r['plain_kib_per_token']} | "
              f"{r['fused_kib_per_token']} | {r['fused_fraction']} | "
              f"{r['checkpointed_kib_per_token']} | {r['saved_fraction']} |" for r in rows]
    (out / "saved_activations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
