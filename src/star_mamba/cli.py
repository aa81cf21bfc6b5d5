"""The ``star-mamba`` command line.

  star-mamba pretrain  [-c CONFIG] [--set section.key=value ...]   STAR pretraining
  star-mamba finetune  [-c CONFIG] [--pretrained CKPT] [--set ...] fine-tune the classifier
  star-mamba segment   [-c CONFIG] [--pretrained CKPT] [--set ...] semantic segmentation
  star-mamba detect    [-c CONFIG] [--pretrained CKPT] [--set ...] Mask R-CNN detection
  star-mamba linprobe  [-c CONFIG] [--pretrained CKPT] [--set ...] converged linear probe + k-NN
  star-mamba eval --checkpoint CKPT [-c CONFIG] [--set ...] [--ema] top-1 / top-5 of a classifier,
                                                                   mIoU of a segmenter
  star-mamba export --checkpoint CKPT --out FILE.safetensors [--ema]
  star-mamba prepare-data SRC OUT [--short-side N] [--shard-size BYTES] [--workers W]
                                                                   ImageFolder splits -> shards
  star-mamba bench [--quick]                                       benchmarks
  star-mamba bench --data [--quick]                                input pipeline benchmark
  star-mamba bench --gpu [--output-dir D] [--dry-run]              GPU acceptance run
  star-mamba ablate [--out DIR] [--axis NAME=V1,V2] [--full]       ablation grid (resumable)
  star-mamba viz --checkpoint CKPT [--out DIR]                     predictions, losses, diagnostics
  star-mamba convert-arm SRC --out FILE.pth [--set model.KEY=VALUE] ARM checkpoint -> ours
  star-mamba models                                                model sizes

A mistake in what was asked (a config value, a missing file, a checkpoint that does not fit:
a ``star_mamba.errors.UserError``) ends as one line on stderr, "star-mamba <command>: error:
<message>", with exit code 2; star-mamba --debug <command> ... shows the traceback instead.
Anything else is a bug: its traceback is shown and the exit code is 1. Ctrl-C (or SIGTERM while
training, which stops at a step boundary with the checkpoint saved) ends without a traceback,
with exit code 130 (SIGINT) or 143 (SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from .errors import ConfigError, Interrupted, UserError

# Building the parser imports neither torch nor timm (``star-mamba --help`` is instant): every
# command imports what it needs in its handler. The defaults below are those of
# ``tools.ablate.Budget`` and ``data.prepare.PrepareOptions`` (tests/test_cli.py checks it).
ABLATE_DEFAULTS = dict(depth=6, pretrain_images=6400, probe_images=10000, eval_images=5000, seed=0)
PREPARE_DEFAULTS = dict(short_side=256, quality=90, seed=0)
BENCH_OUT = "runs/bench"  # bench's default output, untracked (benchmarks/results/ is tracked)

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
USER_ERRORS = (UserError,)
"""What :func:`main` reports as one line (exit code 2) instead of a traceback: config, data and
checkpoint mistakes, missing files, a run stopped by non-finite losses (``errors.py``: every one
says what to change). Any other exception is a bug and keeps its traceback (exit code 1)."""


# ------------------------------------------------------------------ arguments of each command

def _config_args(p: argparse.ArgumentParser, default_config: Optional[str],
                 config_help: Optional[str] = None) -> None:
    p.add_argument("--config", "-c", default=default_config,
                   help=config_help or f"YAML file or built-in config name (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set optim.blr=1e-4 (repeatable)")


def _train_args(default_config: str, pretrained: bool = False
                ) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        _config_args(p, default_config)
        if pretrained:
            p.add_argument("--pretrained", metavar="CKPT",
                           help="shortcut for --set run.pretrained=CKPT: the STAR pretraining "
                                "checkpoint to start from; 'null' starts from random weights")
        p.add_argument("--output-dir", help="shortcut for --set run.output_dir=DIR")
        p.add_argument("--resume", help="checkpoint to resume from; 'never' to start over "
                                        "(default: the latest checkpoint in the output directory)")
    return add


def _linprobe_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, "linprobe/fashion_mnist")
    p.add_argument("--pretrained", metavar="CKPT",
                   help="shortcut for --set run.pretrained=CKPT: a STAR pretraining checkpoint "
                        "or a fine-tuned classifier; 'null' probes a randomly initialised backbone")
    p.add_argument("--output-dir", help="shortcut for --set run.output_dir=DIR")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, None, "YAML file or built-in config name for the data (default: the run "
                          "config saved in the checkpoint, so the data it was trained for)")
    p.add_argument("--checkpoint", required=True, help="classifier (star-mamba finetune) or "
                                                       "segmentation (star-mamba segment) checkpoint")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint to export (.pth), or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")


def _ablate_args(a: argparse.ArgumentParser) -> None:
    a.add_argument("--out", default="runs/ablate", help="grid directory (default: runs/ablate)")
    a.add_argument("--axis", dest="axes", action="append", default=[], metavar="NAME=V1,V2",
                   help="restrict an axis, e.g. --axis separator=none,identity --axis K=1,4 "
                        "(repeatable; axes: separator, separator_position (pos), "
                        "images_per_sequence (K), cluster_size (c))")
    a.add_argument("--full", action="store_true",
                   help="the full product of the axes instead of one factor at a time")
    a.add_argument("--no-scratch", action="store_true", help="skip the no-pretraining row")
    a.add_argument("--probe", choices=["linprobe", "finetune"], default="linprobe",
                   help="linprobe (default): star-mamba linprobe's converged linear probe and "
                        "k-NN of the frozen backbone; finetune: a one-pass fine-tune")
    d = ABLATE_DEFAULTS
    a.add_argument("--depth", type=int, default=d["depth"],
                   help=f"encoder blocks of every model (default {d['depth']})")
    a.add_argument("--pretrain-images", type=int, default=d["pretrain_images"],
                   help=f"images seen in each pretraining run (default {d['pretrain_images']})")
    a.add_argument("--probe-images", type=int, default=d["probe_images"],
                   help=f"training images of each probe (default {d['probe_images']})")
    a.add_argument("--eval-images", type=int, default=d["eval_images"],
                   help=f"held-out test images each probe is scored on "
                        f"(default {d['eval_images']})")
    a.add_argument("--probe-blr", type=float, default=None,
                   help="the fine-tune's base lr (--probe finetune only; default 8e-3)")
    a.add_argument("--seed", type=int, default=d["seed"],
                   help=f"seed of every pretraining and probe run (default {d['seed']})")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra override for every pretraining and probe run")
    a.add_argument("--dry-run", action="store_true", help="list the points and exit")


def _viz_args(v: argparse.ArgumentParser) -> None:
    v.add_argument("--checkpoint", required=True,
                   help="STAR pretraining checkpoint (.pth / .safetensors) or its run directory")
    _config_args(v, None, "YAML file or built-in config name for the data (default: the run "
                          "config saved in the checkpoint, so the data it was trained on)")
    v.add_argument("--out", default=None, help="output directory (default: <checkpoint dir>/viz)")
    v.add_argument("--num-sequences", type=int, default=2, help="packed sequences in the grid")
    v.add_argument("--max-batches", type=int, default=8, help="batches averaged in the loss plot")
    v.add_argument("--split", default=None, help="data split to draw images from (default: the "
                                                 "data's eval split, images not trained on)")
    v.add_argument("--first-clusters", type=int, default=1,
                   help="clusters counted as 'first' in the printed summary (default 1)")
    v.add_argument("--seed", type=int, default=0,
                   help="seed of the draw of the images shown and scored (default 0)")
    v.add_argument("--device", default="cpu", help="device the model runs on, e.g. cuda "
                                                   "(default cpu)")
    v.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="skip diagnostics.png (the run's logged cross-image diagnostics and this "
                        "checkpoint's values on run.diag_images held-out images of the run's "
                        "data, or of -c's)")


def _convert_arm_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("src", help="ARM .pth ({'model': state_dict, ...} or a bare state dict)")
    c.add_argument("--out", required=True, help="output .pth (our checkpoint layout)")
    c.add_argument("--target", choices=["classifier", "pretrain"], default=None,
                   help="default: detected from the keys")
    c.add_argument("--strict", action="store_true",
                   help="fail when any ARM key is unmatched or any of our keys has no ARM weight")
    c.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="model.KEY=VALUE",
                   help="change a model config field after inference, e.g. model.global_pool=cls")


def _bench_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--output-dir", default=None,
                   help=f"where the results go (default: {BENCH_OUT}, {BENCH_OUT}/gpu with "
                        "--gpu; benchmarks/results/ holds the tracked, published ones)")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    b.add_argument("--gpu", action="store_true",
                   help="GPU acceptance run: device, CUDA tests, scan accuracy and speed, STAR-B "
                        "step (max batch, MFU), eager vs compile, 30-step loss check -> "
                        "gpu_acceptance.json / .md")
    b.add_argument("--data", action="store_true",
                   help="input pipeline: images/s per DataLoader worker for the pretraining "
                        "transform from full-size JPEGs (ImageFolder) vs shards -> "
                        "input_pipeline.json / .md")
    b.add_argument("--dry-run", action="store_true",
                   help="with --gpu: the same run on CPU at tiny sizes (a smoke test)")
    b.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the compile comparisons (default: inductor; "
                        "aot_eager in a --gpu --dry-run)")
    b.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="with --gpu: wall-clock budget of the whole run (default 570); sections "
                        "left when it runs out are recorded as skipped")
    b.add_argument("--sections", default=None, metavar="A,B,...",
                   help="with --gpu: run only these sections (device, tests, scan_accuracy, "
                        "scan_speed, pretrain_step, compile, convergence)")


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    d = PREPARE_DEFAULTS
    p.add_argument("src", help="ImageFolder tree: SRC/<split>/<class>/<images> for every split "
                               "folder (train/, val/, ...)")
    p.add_argument("out", help="output: OUT/<split>/shard-NNNNNN.tar and OUT/<split>/index.json; "
                               "train with --set data.name=shards --set data.root=OUT")
    p.add_argument("--short-side", type=int, default=d["short_side"], metavar="N",
                   help="short side of the re-encoded images in pixels, never enlarged; 0 keeps "
                        f"their size (default {d['short_side']})")
    p.add_argument("--shard-size", default="128MiB", metavar="BYTES",
                   help="target bytes per shard, e.g. 134217728, 128MiB, 100MB (default 128MiB)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="processes writing shards in parallel (default: the CPUs available)")
    p.add_argument("--quality", type=int, default=d["quality"],
                   help=f"JPEG quality (default {d['quality']})")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help=f"seed of the shuffle of the files before sharding (default {d['seed']})")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


# ------------------------------------------------------------------ handlers (raise, never print errors)

def _run_shortcuts(args: argparse.Namespace, *names: str) -> list[str]:
    """``--set`` overrides, then ``run.<name>=<value>`` for each shortcut option given
    (``--output-dir``, ``--resume``, ``--pretrained``)."""
    return [*args.overrides, *(f"run.{name}={getattr(args, name)}" for name in names
                               if getattr(args, name, None))]


def _train(args: argparse.Namespace) -> int:
    from .engine.config import load_config
    from .tasks import run_task
    run_task(load_config(args.config, _run_shortcuts(args, "output_dir", "resume", "pretrained"),
                         task=args.command))
    return 0


def _linprobe(args: argparse.Namespace) -> int:
    from .engine.config import load_config
    from .tasks.linprobe import linprobe
    # its log (stdout and log.txt) already names the weights, the result and the file written
    linprobe(load_config(args.config, _run_shortcuts(args, "pretrained", "output_dir"),
                         task="linprobe"))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .engine.config import load_config
    from .tasks.dense import checkpoint_task
    from .tasks.finetune import evaluate_checkpoint
    task = checkpoint_task(args.checkpoint)
    if task == "detect":
        from .tasks.detect import evaluate_detection_checkpoint
        cfg = (load_config(args.config, args.overrides, task="detect")
               if args.config is not None else None)
        print(json.dumps(evaluate_detection_checkpoint(args.checkpoint, cfg, args.overrides)))
        return 0
    if task == "segment":
        from .tasks.segment import evaluate_segmentation_checkpoint
        cfg = (load_config(args.config, args.overrides, task="segment")
               if args.config is not None else None)
        result = evaluate_segmentation_checkpoint(args.checkpoint, cfg, overrides=args.overrides)
        print(json.dumps({k: v for k, v in result.items() if k != "per_class"}))
        return 0
    if args.config is not None:
        result = evaluate_checkpoint(args.checkpoint, load_config(args.config, args.overrides,
                                                                  task="finetune"), args.ema)
    else:  # the run config saved in the checkpoint, with --set applied
        result = evaluate_checkpoint(args.checkpoint, None, args.ema, overrides=args.overrides)
    print(json.dumps(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import export_safetensors
    print(export_safetensors(args.checkpoint, args.out, use_ema=args.ema))
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    import os

    from .data.prepare import PrepareOptions, parse_size, prepare_data
    options = PrepareOptions(args.short_side, parse_size(args.shard_size), args.quality, args.seed)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    done = prepare_data(args.src, args.out, options, workers,
                        echo=lambda line: print(line, flush=True))
    splits = ", ".join(f"{split} ({index['num_samples']} images)" for split, index in done.items())
    print(f"prepared {splits} in {args.out}; train with --set data.name=shards "
          f"--set data.root={args.out}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models.registry import MODEL_SIZES
    for name, size in MODEL_SIZES.items():
        print(f"{name:12s} embed_dim={size['embed_dim']:5d} depth={size['depth']}")
    return 0


def gpu_harness_dir():
    """benchmarks/gpu/ of the source checkout this star_mamba was imported from (an installed
    wheel has none): the GPU acceptance harness, ``star-mamba bench --gpu``."""
    from pathlib import Path

    import star_mamba
    return Path(star_mamba.__file__).resolve().parents[2] / "benchmarks" / "gpu"


def load_gpu_harness():
    """benchmarks/gpu/acceptance.py as a module; a :class:`UserError` when it is not there."""
    import importlib.util

    path = gpu_harness_dir() / "acceptance.py"
    if not path.is_file():
        raise UserError(f"the GPU acceptance run needs a source checkout ({path} is missing, as in "
                        "an installed wheel): git clone the star-mamba repository, then from its "
                        "root run `PYTHONPATH=src star-mamba bench --gpu` or "
                        "`python benchmarks/gpu/acceptance.py`")
    name = "star_mamba_gpu_acceptance"
    module = sys.modules.get(name)
    if module is None or getattr(module, "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def _bench(args: argparse.Namespace) -> int:
    if args.gpu:
        import torch

        run_acceptance = load_gpu_harness().run_acceptance
        if not args.dry_run and not torch.cuda.is_available():
            raise UserError("--gpu needs a CUDA device (torch.cuda.is_available() is False); "
                            "--gpu --dry-run runs the same code on CPU at tiny sizes")
        out = args.output_dir or f"{BENCH_OUT}/gpu"
        sections = None if args.sections is None else [x.strip() for x in args.sections.split(",")
                                                         if x.strip()]
        if args.budget is not None and args.budget <= 0:
            raise UserError(f"--budget must be a positive number of seconds, got {args.budget}")
        r = run_acceptance(out, dry_run=args.dry_run, compile_backend=args.compile_backend,
                           sections=sections, budget_s=args.budget)
        bad = [n for n, e in r["sections"].items() if e["status"] == "error" or e["passed"] is False]
        print(f"{r['meta']['wall_s']} s; sections failed or in error: {', '.join(bad) or 'none'}")
        print(f"results written to {out}/gpu_acceptance.json and gpu_acceptance.md")
        return 1 if bad else 0
    for flag, value in (("--dry-run", args.dry_run), ("--budget", args.budget),
                        ("--sections", args.sections)):
        if value:
            raise UserError(f"{flag} belongs to --gpu")
    if args.data:
        from .tools.bench_input import run_input_bench, to_markdown
        out = args.output_dir or BENCH_OUT
        print(to_markdown(run_input_bench(out, quick=args.quick,
                                          command="star-mamba " + " ".join(args.argv))), end="")
        print(f"results written to {out}/input_pipeline.json and input_pipeline.md")
        return 0
    from .tools.bench import run_all, to_markdown
    out = args.output_dir or BENCH_OUT
    print(to_markdown(run_all(out, quick=args.quick, compile_backend=args.compile_backend)), end="")
    print(f"results written to {out}/bench.json and bench.md")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .tools.ablate import Budget, ablate, parse_axes
    budget = Budget(args.depth, args.pretrain_images, args.probe, args.probe_images,
                    args.eval_images, args.probe_blr, args.seed, tuple(args.overrides))
    ablate(args.out, budget, parse_axes(args.axes), args.full, not args.no_scratch,
           args.dry_run, "star-mamba " + " ".join(args.argv))
    return 0


def _viz(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools.viz import visualize
    out = args.out
    if out is None:
        ckpt = Path(args.checkpoint)
        out = (ckpt if ckpt.is_dir() else ckpt.parent) / "viz"
    if args.config is None and args.overrides:  # a bad --set is named before the checkpoint
        from .engine.config import load_config  # is read (its saved config comes with it)
        load_config("pretrain/fashion_mnist", list(args.overrides), task="pretrain")
    # no -c: the data config saved in the checkpoint
    r = visualize(args.checkpoint, out, args.config, num_sequences=args.num_sequences,
                  max_batches=args.max_batches, device=args.device, seed=args.seed,
                  split=args.split, first_clusters=args.first_clusters,
                  diagnostics=args.diagnostics, overrides=args.overrides)
    per_image = ", ".join(f"{v:.4f}" for v in r["mean_loss_per_image"])
    print(f"{r['sequences']} sequences of K={r['images_per_sequence']} from {r['data']} "
          f"({r['split']}): loss {r['loss']:.4f}; mean loss per image k=0..: {per_image}")
    print(f"first {r['first_clusters']} cluster(s): image 0 {r['first_cluster_loss_image0']:.4f}, "
          f"images 1.. {r['first_cluster_loss_later_images']:.4f}")
    if args.diagnostics:
        from .evaluation.diagnostics import summary_line
        step = r["diagnostics_step"]
        print(f"diagnostics{'' if step is None else f' at step {step}'} on "
              f"{r['diagnostics']['images']} held-out images: {summary_line(r['diagnostics'])}")
    for key in ("predictions", "loss_plot", "loss_json") + (
            ("diagnostics_plot", "diagnostics_json") if args.diagnostics else ()):
        print(f"wrote {r[key]}")
    return 0


def _convert_arm(args: argparse.Namespace) -> int:
    from .engine.config import parse_override
    from .tools.arm import convert_arm_checkpoint
    overrides = {}
    for item in args.overrides:
        (section, key), value = parse_override(item)
        if section != "model":
            raise ConfigError(f"override {item!r}: convert-arm sets model fields only "
                              "(model.KEY=VALUE, e.g. model.global_pool=cls)")
        overrides[key] = value
    report = convert_arm_checkpoint(args.src, args.out, args.target, args.strict, overrides)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


Handler = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    # name: (help, argument adder, handler)
    "pretrain": ("STAR pretraining (default: star_tiny on Fashion-MNIST)",
                 _train_args("pretrain/fashion_mnist"), _train),
    "finetune": ("fine-tune the classifier from a pretraining checkpoint",
                 _train_args("finetune/fashion_mnist", pretrained=True), _train),
    "segment": ("semantic segmentation on a STAR backbone (default: UPerNet on the built-in "
                "scenes, from the default pretraining run)",
                _train_args("segment/scenes", pretrained=True), _train),
    "detect": ("detection and instance segmentation (Mask R-CNN) on a STAR backbone (default: "
               "the built-in scenes, from the default pretraining run)",
               _train_args("detect/scenes", pretrained=True), _train),
    "linprobe": ("linear probe of a frozen backbone: features extracted once, logistic "
                 "regression to convergence with a weight-decay sweep, and k-NN",
                 _linprobe_args, _linprobe),
    "eval": ("top-1/top-5 of a fine-tuned classifier, mIoU of a segmenter or box/mask AP of a "
             "detector, by default on the data of the run that made it", _eval_args, _eval),
    "export": ("checkpoint weights + model config -> .safetensors", _export_args, _export),
    "ablate": ("grid over separator kind/position, K and cluster size: pretrain + probe per "
               "point, resumable, table + plot", _ablate_args, _ablate),
    "viz": ("from a pretraining checkpoint: predicted vs true clusters across image boundaries, "
            "the loss per sequence position and the cross-image diagnostics", _viz_args, _viz),
    "convert-arm": ("an official ARM checkpoint (pretraining or fine-tuning) -> a star-mamba "
                    "checkpoint", _convert_arm_args, _convert_arm),
    "prepare-data": ("every split folder of an ImageFolder tree as pre-resized WebDataset "
                     "shards with an index (resumable, parallel)", _prepare_data_args,
                     _prepare_data),
    "models": ("list the model sizes", _no_args, _models),
    "bench": ("scan backends, pretraining step and FLOP/s benchmarks; --gpu: the GPU acceptance "
              "run", _bench_args, _bench),
}


def plain_text(text: str) -> str:
    """reStructuredText as a terminal shows it: ``literal`` and :role:`target` markup removed."""
    import re
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star-mamba", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True,
                                help="the command; star-mamba COMMAND --help lists its options")
    for name, (text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of a one-line message")
        add_arguments(p)
    return parser


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. The one error boundary: :data:`USER_ERRORS` print one line and return
    2 (``--debug``: raised with their traceback); anything else propagates."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = COMMANDS[args.command][2]
    try:
        return handler(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"star-mamba {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or training stopped by a signal (Interrupted)
        if args.debug:
            raise
        if isinstance(e, Interrupted):  # its one line is in the run's log already
            return e.exit_code
        print(f"star-mamba {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
