"""The ``star-mamba`` command line: ``star-mamba pretrain [--config FILE] [--set k=v ...]``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

DEFAULT_PRETRAIN_CONFIG = "pretrain/fashion_mnist"


def _add_run_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", "-c", default=default_config,
                   help=f"YAML file or built-in config name (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set optim.blr=1e-4 (repeatable)")
    p.add_argument("--output-dir", help="shortcut for --set run.output_dir=DIR")
    p.add_argument("--resume", help="checkpoint to resume from; 'never' to start over "
                                    "(default: the latest checkpoint in the output directory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star-mamba", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="STAR pretraining (default: star_tiny on Fashion-MNIST)")
    _add_run_args(p, DEFAULT_PRETRAIN_CONFIG)
    sub.add_parser("models", help="list the model sizes")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from .models.registry import MODEL_SIZES
        for name, size in MODEL_SIZES.items():
            print(f"{name:12s} embed_dim={size['embed_dim']:5d} depth={size['depth']}")
        return 0
    from .engine.config import load_config
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"star-mamba: error: {e}", file=sys.stderr)
        return 2
    from .engine.pretrain import pretrain
    try:
        pretrain(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad config or data, found before training
        print(f"star-mamba: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
