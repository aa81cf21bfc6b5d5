"""The ``star-mamba`` command line.

  star-mamba pretrain  [-c CONFIG] [--set section.key=value ...]   STAR pretraining
  star-mamba finetune  [-c CONFIG] [--set ...]                     fine-tune the classifier
  star-mamba linprobe  [-c CONFIG] [--set ...]                     linear probe (frozen backbone)
  star-mamba eval --checkpoint CKPT [-c CONFIG] [--ema]            top-1 / top-5 of a classifier
  star-mamba export --checkpoint CKPT --out FILE.safetensors [--ema]
  star-mamba bench [--quick]                                       benchmarks
  star-mamba ablate [--out DIR] [--axis NAME=V1,V2] [--full]       ablation grid (resumable)
  star-mamba models                                                model sizes
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .ablate import Budget

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
    sub.add_parser("models", help="list the model sizes")
    b = sub.add_parser("bench", help="scan backends, pretraining step and FLOP/s benchmarks")
    b.add_argument("--output-dir", default="benchmarks/results")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    return parser


def _error(e: Exception) -> int:
    print(f"star-mamba: error: {e}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from .models.registry import MODEL_SIZES
        for name, size in MODEL_SIZES.items():
            print(f"{name:12s} embed_dim={size['embed_dim']:5d} depth={size['depth']}")
        return 0
    if args.command == "bench":
        from .bench import run_all, to_markdown
        print(to_markdown(run_all(args.output_dir, quick=args.quick)), end="")
        print(f"results written to {args.output_dir}/bench.json and bench.md")
        return 0
    if args.command == "ablate":
        from .ablate import ablate, parse_axes
        budget = Budget(args.depth, args.pretrain_images, args.probe, args.probe_images,
                        args.eval_images, args.probe_blr, args.seed, tuple(args.overrides))
        command = "star-mamba " + " ".join(argv if argv is not None else sys.argv[1:])
        try:
            ablate(args.out, budget, parse_axes(args.axes), args.full, not args.no_scratch,
                   args.dry_run, command)
        except (ValueError, FileNotFoundError) as e:
            return _error(e)
        return 0
    if args.command == "export":
        from .engine.checkpoint import export_safetensors
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
