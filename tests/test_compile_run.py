"""run.compile: tiny pretraining and fine-tuning runs under torch.compile finish, and their
checkpoints hold the plain module's keys (no ``_orig_mod.`` prefixes), as uncompiled runs do."""
from star_mamba import checkpoint as ckpt
from star_mamba.engine.config import load_config
from star_mamba.engine.finetune import evaluate_checkpoint, finetune
from star_mamba.engine.pretrain import pretrain

from .test_distributed import shapes_overrides
from .test_finetune import make_shapes
from .test_reliability import TINY as TINY_PRETRAIN


def _keys(out):
    saved = ckpt.load_checkpoint(out / ckpt.LATEST)
    return set(saved["model"]), {n: set(v) for n, v in saved["extras"].items()}


def test_compiled_pretraining_writes_plain_checkpoints(tmp_path):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        summary = pretrain(load_config("pretrain/fashion_mnist", [
            *TINY_PRETRAIN, "run.max_steps=2", f"run.compile={str(compiled).lower()}",
            f"run.output_dir={out}"]))
        assert summary["step"] == 2
        runs[compiled] = _keys(out)
    assert runs[True] == runs[False]
    assert not any("_orig_mod" in k for k in runs[True][0])


def test_compiled_finetuning_and_eval_write_plain_checkpoints(tmp_path):
    make_shapes(tmp_path / "shapes", per_class=2)  # 8 images: 2 steps of 4, then evaluation
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        cfg = load_config("finetune/fashion_mnist", shapes_overrides(
            tmp_path / "shapes", out, "data.num_workers=0", "optim.batch_size=4",
            f"run.compile={str(compiled).lower()}"))
        summary = finetune(cfg)
        assert summary["step"] == 2 and summary["best"]["score"] is not None
        runs[compiled] = _keys(out)
        result = evaluate_checkpoint(out / ckpt.LATEST, cfg, use_ema=True)
        assert 0.0 <= result["top1"] <= 100.0
    assert runs[True] == runs[False]
    assert not any("_orig_mod" in k for k in runs[True][0] | runs[True][1]["ema"])
