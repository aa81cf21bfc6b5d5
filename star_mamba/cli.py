"""The ``star-mamba`` command line.

  star-mamba pretrain  [-c CONFIG] [--set section.key=value ...]   STAR pretraining
  star-mamba finetune  [-c CONFIG] [--set ...]                     fine-tune the classifier
  star-mamba linprobe  [-c CONFIG] [--set ...]                     linear probe (frozen backbone)
  star-mamba eval --checkpoint CKPT [-c CONFIG] [--ema]            top-1 / top-5 of a classifier
  star-mamba export --checkpoint CKPT --out FILE.safetensors [--ema]
  star-mamba bench [--quick]                                       benchmarks
  star-mamba bench --gpu [--output-dir D] [--dry-run]              GPU acceptance run
  star-mamba ablate [--out DIR] [--axis NAME=V1,V2] [--full]       ablation grid (resumable)
  star-mamba viz --checkpoint CKPT [--out DIR]                     prediction grid + loss plot
  star-mamba convert-arm SRC --out FILE.pth [--target T] [--strict] ARM checkpoint -> ours
  star-mamba models                                                model sizes
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .tools.ablate import Budget

DEFAULT_CONFIGS = {"pretrain": "pretrain/fashion_mnist", "finetune": "finetune/fashion_mnist",
                   "linprobe": "linprobe/fashion_mnist", "eval": "finetune/fashion_mnist"}


def _add_run_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", "-c", default=default_config,
                   help=f"YAML file or built-in config name (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set optim.blr=1e-4 (repeatable)")
    p.add_argument("--output-dir", help="shortcut for --set run.output_dir=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star-mamba", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("pretrain", "STAR pretraining (default: star_tiny on Fashion-MNIST)"),
                       ("finetune", "fine-tune the classifier from a pretraining checkpoint"),
                       ("linprobe", "linear probe: frozen backbone, trained linear head")):
        p = sub.add_parser(name, help=text)
        _add_run_args(p, DEFAULT_CONFIGS[name])
        p.add_argument("--resume", help="checkpoint to resume from; 'never' to start over "
                                        "(default: the latest checkpoint in the output directory)")
    e = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned checkpoint")
    _add_run_args(e, DEFAULT_CONFIGS["eval"])
    e.add_argument("--checkpoint", required=True, help="classifier checkpoint (star-mamba finetune)")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    x = sub.add_parser("export", help="checkpoint weights + model config -> .safetensors")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="output .safetensors file")
    x.add_argument("--ema", action="store_true", help="export the EMA weights")
    a = sub.add_parser("ablate", help="grid over separator kind/position, K and cluster size: "
                                      "pretrain + probe per point, resumable, table + plot")
    a.add_argument("--out", default="runs/ablate", help="grid directory (default: runs/ablate)")
    a.add_argument("--axis", dest="axes", action="append", default=[], metavar="NAME=V1,V2",
                   help="restrict an axis, e.g. --axis separator=none,identity --axis K=1,4 "
                        "(repeatable; axes: separator, separator_position (pos), "
                        "images_per_sequence (K), cluster_size (c))")
    a.add_argument("--full", action="store_true",
                   help="the full product of the axes instead of one factor at a time")
    a.add_argument("--no-scratch", action="store_true", help="skip the no-pretraining row")
    a.add_argument("--probe", choices=["linprobe", "finetune"], default="linprobe")
    a.add_argument("--depth", type=int, default=Budget.depth)
    a.add_argument("--pretrain-images", type=int, default=Budget.pretrain_images)
    a.add_argument("--probe-images", type=int, default=Budget.probe_images)
    a.add_argument("--eval-images", type=int, default=Budget.eval_images)
    a.add_argument("--probe-blr", type=float, default=None,
                   help="probe base lr (default 0.1 linear probe, 8e-3 fine-tune)")
    a.add_argument("--seed", type=int, default=Budget.seed)
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra override for every pretraining and probe run")
    a.add_argument("--dry-run", action="store_true", help="list the points and exit")
    v = sub.add_parser("viz", help="from a pretraining checkpoint: predicted vs true clusters "
                                   "across image boundaries, and the loss per sequence position")
    v.add_argument("--checkpoint", required=True,
                   help="STAR pretraining checkpoint (.pth / .safetensors) or its run directory")
    _add_run_args(v, DEFAULT_CONFIGS["pretrain"])
    v.add_argument("--out", default=None, help="output directory (default: <checkpoint dir>/viz)")
    v.add_argument("--num-sequences", type=int, default=2, help="packed sequences in the grid")
    v.add_argument("--max-batches", type=int, default=8, help="batches averaged in the loss plot")
    v.add_argument("--split", default="test", help="data split to draw images from "
                                                   "(default: test, images not trained on)")
    v.add_argument("--first-clusters", type=int, default=1,
                   help="clusters counted as 'first' in the printed summary (default 1)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="cpu")
    c = sub.add_parser("convert-arm", help="an official ARM checkpoint (pretraining or "
                                           "fine-tuning) -> a star-mamba checkpoint")
    c.add_argument("src", help="ARM .pth ({'model': state_dict, ...} or a bare state dict)")
    c.add_argument("--out", required=True, help="output .pth (our checkpoint layout)")
    c.add_argument("--target", choices=["classifier", "pretrain"], default=None,
                   help="default: detected from the keys")
    c.add_argument("--strict", action="store_true",
                   help="fail when any ARM key is unmatched or any of our keys has no ARM weight")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model config field after inference, e.g. global_pool=cls")
    sub.add_parser("models", help="list the model sizes")
    b = sub.add_parser("bench", help="scan backends, pretraining step and FLOP/s benchmarks; "
                                     "--gpu: the GPU acceptance run")
    b.add_argument("--output-dir", default=None,
                   help="default: benchmarks/results (benchmarks/results/gpu with --gpu)")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    b.add_argument("--gpu", action="store_true",
                   help="GPU acceptance run: device, CUDA tests, scan accuracy and speed, STAR-B "
                        "step (max batch, MFU), eager vs compile, 30-step loss check -> "
                        "gpu_acceptance.json / .md")
    b.add_argument("--dry-run", action="store_true",
                   help="with --gpu: the same run on CPU at tiny sizes (a smoke test)")
    b.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the compile comparisons (default: inductor; "
                        "aot_eager in a --gpu --dry-run)")
    return parser


def _error(e: Exception) -> int:
    print(f"star-mamba: error: {e}", file=sys.stderr)
    return 2


def _viz(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine.config import load_config
    from .tools.viz import visualize
    out = args.out
    if out is None:
        ckpt = Path(args.checkpoint)
        out = (ckpt if ckpt.is_dir() else ckpt.parent) / "viz"
    try:
        cfg = load_config(args.config, list(args.overrides), task="pretrain")
        r = visualize(args.checkpoint, out, cfg, num_sequences=args.num_sequences,
                      max_batches=args.max_batches, device=args.device, seed=args.seed,
                      split=args.split, first_clusters=args.first_clusters)
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    per_image = ", ".join(f"{v:.4f}" for v in r["mean_loss_per_image"])
    print(f"{r['sequences']} sequences of K={r['images_per_sequence']} from {r['data']} "
          f"({r['split']}): loss {r['loss']:.4f}; mean loss per image k=0..: {per_image}")
    print(f"first {r['first_clusters']} cluster(s): image 0 {r['first_cluster_loss_image0']:.4f}, "
          f"images 1.. {r['first_cluster_loss_later_images']:.4f}")
    for key in ("predictions", "loss_plot", "loss_json"):
        print(f"wrote {r[key]}")
    return 0


def _convert_arm(args: argparse.Namespace) -> int:
    import yaml

    from .tools.convert_arm import convert_arm_checkpoint
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            return _error(ValueError(f"--set expects KEY=VALUE, got {item!r}"))
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        report = convert_arm_checkpoint(args.src, args.out, args.target, args.strict, overrides)
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from .models.registry import MODEL_SIZES
        for name, size in MODEL_SIZES.items():
            print(f"{name:12s} embed_dim={size['embed_dim']:5d} depth={size['depth']}")
        return 0
    if args.command == "bench":
        if args.gpu:
            from .tools.bench_gpu import run_acceptance
            out = args.output_dir or "benchmarks/results/gpu"
            try:
                r = run_acceptance(out, dry_run=args.dry_run, compile_backend=args.compile_backend)
            except (RuntimeError, ValueError) as e:
                return _error(e)
            bad = [n for n, e in r["sections"].items() if e["status"] == "error" or e["passed"] is False]
            print(f"{r['meta']['wall_s']} s; sections failed or in error: {', '.join(bad) or 'none'}")
            print(f"results written to {out}/gpu_acceptance.json and gpu_acceptance.md")
            return 1 if bad else 0
        if args.dry_run:
            return _error(ValueError("--dry-run belongs to --gpu"))
        from .tools.bench import run_all, to_markdown
        out = args.output_dir or "benchmarks/results"
        print(to_markdown(run_all(out, quick=args.quick, compile_backend=args.compile_backend)),
              end="")
        print(f"results written to {out}/bench.json and bench.md")
        return 0
    if args.command == "ablate":
        from .tools.ablate import ablate, parse_axes
        budget = Budget(args.depth, args.pretrain_images, args.probe, args.probe_images,
                        args.eval_images, args.probe_blr, args.seed, tuple(args.overrides))
        command = "star-mamba " + " ".join(argv if argv is not None else sys.argv[1:])
        try:
            ablate(args.out, budget, parse_axes(args.axes), args.full, not args.no_scratch,
                   args.dry_run, command)
        except (ValueError, FileNotFoundError) as e:
            return _error(e)
        return 0
    if args.command == "viz":
        return _viz(args)
    if args.command == "convert-arm":
        return _convert_arm(args)
    if args.command == "export":
        from .checkpoint import export_safetensors
        try:
            print(export_safetensors(args.checkpoint, args.out, use_ema=args.ema))
        except (ValueError, FileNotFoundError) as e:
            return _error(e)
        return 0
    from .engine.config import load_config
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "resume", None):
        overrides.append(f"run.resume={args.resume}")
    if args.command == "linprobe":
        overrides.append("run.linprobe=true")
    task = "pretrain" if args.command == "pretrain" else "finetune"
    try:
        cfg = load_config(args.config, overrides, task=task)
        if args.command == "pretrain":
            from .engine.pretrain import pretrain
            pretrain(cfg)
        elif args.command in ("finetune", "linprobe"):
            from .engine.finetune import finetune
            finetune(cfg)
        else:
            from .engine.finetune import evaluate_checkpoint
            print(json.dumps(evaluate_checkpoint(args.checkpoint, cfg, use_ema=args.ema)))
    except (ValueError, FileNotFoundError) as e:  # bad config, data or checkpoint: before training
        return _error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
