"""Is a detection training step bound by Python? The share of one step spent outside the
model's forward and backward (reading and transforming the images, building the targets,
collating), measured on CPU at a small size.

    PYTHONPATH=src .venv/bin/python benchmarks/detect_step.py [--steps 6] [--out benchmarks/results]

Uses configs/detect/scenes.yaml (the default run's model and data, random weights), one torch
thread; times `steps` steps after one warm-up. Writes detect_step.json / .md with the GEMM rate.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from star_mamba.data.build import detection_sets
from star_mamba.data.detection import collate_detection
from star_mamba.engine.config import load_config
from star_mamba.models.detection import build_detector
from star_mamba.tools.bench import gemm_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--config", default="detect/scenes")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    model_cfg = cfg.model.star_config()
    train_set, _, classes, _ = detection_sets(cfg.data, cfg.detect.data_options(),
                                              model_cfg.in_chans, 0)
    model = build_detector(model_cfg, len(classes) - 1, cfg.detect.detector_config()).train()
    batch = cfg.optim.batch_size
    data_s = model_s = backbone_s = 0.0
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        images, targets = collate_detection([train_set[step * batch + i] for i in range(batch)])
        t1 = time.perf_counter()
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        # the backbone and pyramid alone on the same padded batch: the rest of the model's time
        # is torchvision's RPN and RoI heads (anchor matching, sampling, losses, mask targets)
        padded, _ = model.transform(images, None)
        sum(f.float().mean() for f in model.backbone(padded.tensors).values()).backward()
        model.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step:  # the first is a warm-up
            data_s, model_s = data_s + t1 - t0, model_s + t2 - t1
            backbone_s += t3 - t2
    gemm = gemm_flops() / 1e9
    result = dict(command="PYTHONPATH=src .venv/bin/python benchmarks/detect_step.py",
                  config=args.config, images_per_step=batch, steps=args.steps, threads=1,
                  data_ms_per_step=round(1000 * data_s / args.steps, 1),
                  model_ms_per_step=round(1000 * model_s / args.steps, 1),
                  outside_model_share=round(data_s / (data_s + model_s), 4),
                  backbone_ms_per_step=round(1000 * backbone_s / args.steps, 1),
                  heads_share=round(1 - backbone_s / model_s, 4),
                  gemm_gflops_1_thread=round(gemm, 1))
    out = Path(args.out)
    (out / "detect_step.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "detect_step.md").write_text(
        f"# Detection step on CPU ({args.config}, {batch} images, 1 thread)\n\n"
        f"`{result['command']}`\n\n"
        f"- data, targets, collate: {result['data_ms_per_step']} ms per step\n"
        f"- model forward + backward (incl. the losses): {result['model_ms_per_step']} ms\n"
        f"- outside the model: {result['outside_model_share']:.1%} of the step\n"
        f"- of the model's time, the STAR backbone + pyramid alone: {result['backbone_ms_per_step']}"
        f" ms; torchvision's RPN and RoI heads with their target matching, sampling and losses: "
        f"{result['heads_share']:.1%}\n"
        f"- float32 GEMM (1 thread, same run): {result['gemm_gflops_1_thread']} GFLOP/s\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
