"""run.compile: tiny pretraining and fine-tuning runs under torch.compile finish, and their
checkpoints hold the plain module's keys (no ``_orig_mod.`` prefixes), as uncompiled runs do."""
import pytest
import torch

from star_mamba import checkpoint as ckpt
from star_mamba.config import StarConfig
from star_mamba.data.build import classification_sets
from star_mamba.engine.config import load_config
from star_mamba.engine.run import compiles
from star_mamba.errors import ConfigError
from star_mamba.tasks.finetune import evaluate_checkpoint, finetune
from star_mamba.tasks.pretrain import pretrain
from star_mamba.models.classifier import StarClassifier

from .conftest import finetune_config, make_shapes, pretrain_config


SMALL = ("model.depth=1", "model.decoder_depth=1")  # compile time grows with the blocks


def _keys(out):
    saved = ckpt.load_checkpoint(out / ckpt.LATEST)
    return set(saved["model"]), {n: set(v) for n, v in saved["extras"].items()}


def test_compiled_pretraining_writes_plain_checkpoints(tmp_path):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        summary = pretrain(pretrain_config(out, "run.max_steps=2", *SMALL,
                                           f"run.compile={str(compiled).lower()}"))
        assert summary["step"] == 2
        runs[compiled] = _keys(out)
    assert runs[True] == runs[False]
    assert not any("_orig_mod" in k for k in runs[True][0])


def test_compiled_finetuning_and_eval_write_plain_checkpoints(tmp_path):
    make_shapes(tmp_path / "shapes", per_class=2)  # 8 images: 2 steps of 4, then evaluation
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        cfg = finetune_config(tmp_path / "shapes", out, "data.num_workers=0",
                              "optim.batch_size=4", "model.depth=1",
                              f"run.compile={str(compiled).lower()}")
        summary = finetune(cfg)
        assert summary["step"] == 2 and summary["best"]["epoch"] == 1
        runs[compiled] = _keys(out)
        # compiled evaluation of the EMA weights == the fraction right, counted here in eager mode
        result = evaluate_checkpoint(out / ckpt.LATEST, cfg, use_ema=True)
        saved = ckpt.load_checkpoint(out / ckpt.LATEST)
        model = StarClassifier(StarConfig.from_dict(saved["model_config"])).eval()
        model.load_state_dict({k[len("module."):]: v for k, v in saved["extras"]["ema"].items()})
        _, eval_set, _ = classification_sets(cfg.data, model.cfg, train=False)
        images, labels = zip(*(eval_set[i] for i in range(len(eval_set))))
        with torch.no_grad():
            right = (model(torch.stack(images)).argmax(1) == torch.tensor(labels)).sum().item()
        assert result["top1"] == pytest.approx(100 * right / len(eval_set))
    assert runs[True] == runs[False]
    assert not any("_orig_mod" in k for k in runs[True][0] | runs[True][1]["ema"])


@pytest.mark.parametrize("value,device,auto,expected", [
    ("auto", "cpu", True, False),   # the default leaves the CPU eager
    ("auto", "cuda", True, True),   # and compiles on CUDA
    ("auto", "cuda", False, False),  # except for the dense tasks' models
    (True, "cpu", False, True),     # an explicit value is taken as given
    (False, "cuda", True, False),
])
def test_run_compile_auto_compiles_on_cuda_only(value, device, auto, expected):
    run = load_config("pretrain/fashion_mnist", [f"run.compile={str(value).lower()}"]).run
    assert run.compile == value
    assert compiles(run, torch.device(device), auto) is expected


def test_run_compile_rejects_other_values():
    with pytest.raises(ConfigError, match=r"invalid config: run.compile='sometimes'"):
        load_config("pretrain/fashion_mnist", ["run.compile=sometimes"])
