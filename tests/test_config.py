"""The one configuration system: StarConfig and the run config's sections, typed and checked by
one helper; where defaults live; what makes a checkpoint another model."""
import dataclasses
import json

import pytest

from star_mamba import checkpoint as ckpt
from star_mamba.config import StarConfig, typed_values
from star_mamba.data.config import DataConfig
from star_mamba.engine.config import (CONFIG_DIR, SECTIONS, ModelSection,
                                      load_config, resolve_config_path)
from star_mamba.tasks.pretrain import pretrain
from star_mamba.errors import CheckpointError, ConfigError

TINY_PRETRAIN = ["model.img_size=16", "model.patch_size=4", "model.in_chans=1",
                 "model.cluster_size=2", "model.embed_dim=32", "model.depth=2",
                 "model.decoder_dim=32", "model.decoder_depth=2", "model.decoder_heads=2",
                 "model.images_per_sequence=2", "data.name=synthetic", "data.synthetic_images=32",
                 "data.num_workers=0", "optim.batch_size=8", "optim.lr=1e-3",
                 "run.progress=false", "run.tensorboard=false", "run.threads=1", "run.log_every=1"]


def test_builtin_configs_load_and_overrides_apply():
    cfg = load_config("pretrain/fashion_mnist", ["optim.blr=1e-4", "model.depth=3",
                                                 "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.blr == 1e-4 and cfg.model.fields["depth"] == 3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.name == "fashion_mnist" and cfg.task == "pretrain"
    base = load_config("pretrain/star_base_in1k")
    assert base.model.name == "star_base" and base.optim.epochs == 1600
    assert base.model.star_config().embed_dim == 768  # from the size
    assert resolve_config_path("pretrain/star_base_in1k.yaml").is_file()


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIG_DIR).with_suffix(""))
                                        for p in CONFIG_DIR.rglob("*.yaml")))
def test_every_builtin_config_loads_and_names_its_task(name):
    cfg = load_config(name)
    assert cfg.task == name.split("/")[0]  # pretrain/, finetune/, linprobe/
    assert load_config(None, base=cfg.to_dict()) == cfg  # the saved form reads back the same


@pytest.mark.parametrize("override,message", [
    ("optim.blrr=1", "did you mean 'blr'"),
    ("model.clustr_size=2", "unknown config key model.clustr_size; did you mean 'cluster_size'"),
    ("model.drop_path_rat=0.1", "did you mean 'drop_path_rate'"),
    ("optm.blr=1", "did you mean 'optim'"),
    ("model.name=star_bas", "model.name='star_bas'; did you mean 'star_base'"),
    ("optim.blr=abc", "optim.blr='abc': expected a number"),
    ("model.drop_path_rate=abc", "model.drop_path_rate='abc': expected a number"),
    ("model.depth=2.5", "model.depth=2.5: expected an integer"),
    ("model.separator_loss=3", "model.separator_loss=3: expected true or false"),
    ("model.decoder_taps=7", "model.decoder_taps=7: expected a list"),
    ("run.tensorboard=3", "expected true or false"),
    ("blr=1", "section.key=value"),
    ("optim.betas=[0.9", "cannot read the value as YAML"),
    ("optim.betas=[0.9]", "optim.betas=.*expected a list of 2 values"),
    ("model.img_size=18", r"model.img_size=18; must be divisible by patch_size=4"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("pretrain/fashion_mnist", [override])


def test_model_fields_are_typed_like_every_section():
    cfg = load_config("pretrain/fashion_mnist", [
        "model.drop_path_rate=1e-1", "model.decoder_taps=[3, 6, 9, 12]", "model.dt_rank=null",
        "model.separator_loss=false", "model.mlp_ratio=2", "optim.lr=1e-4", "optim.epochs=3.0"])
    f = cfg.model.fields
    assert f["drop_path_rate"] == 0.1 and isinstance(f["drop_path_rate"], float)
    assert f["decoder_taps"] == (3, 6, 9, 12) and all(isinstance(t, int) for t in f["decoder_taps"])
    assert f["dt_rank"] is None and f["separator_loss"] is False and f["mlp_ratio"] == 2.0
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.epochs, int)
    # YAML 1.1 reads 1e-1 (no dot) as a string: from a file too
    assert StarConfig.from_dict({"drop_path_rate": "1e-1"}).drop_path_rate == 0.1
    assert cfg.model.star_config().drop_path_rate == 0.1


def test_one_helper_checks_every_section():
    """StarConfig.from_dict, the model section and data/optim/run fail the same way."""
    for section, key in (("model", "drop_path_rate"), ("optim", "blr"), ("data", "crop_pct")):
        with pytest.raises(ConfigError, match=rf"invalid config: {section}\.{key}='x': expected a number"):
            load_config("finetune/fashion_mnist", [f"{section}.{key}=x"])
    with pytest.raises(ConfigError, match=r"invalid config: model\.drop_path_rate='x'"):
        StarConfig.from_dict({"drop_path_rate": "x"})
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        StarConfig.from_dict({"dpeth": 3})
    with pytest.raises(ConfigError, match="optim.batch_size=None: a value is required"):
        typed_values({"batch_size": None}, {"batch_size": int}, "optim")


def test_override_values_are_typed():
    cfg = load_config("pretrain/fashion_mnist", ["optim.lr=1e-4", "run.max_steps=7", "run.max_steps=8",
                                                 "data.root=null", "optim.epochs=3.0"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 8 and cfg.data.root is None and cfg.optim.epochs == 3
    with pytest.raises(ValueError, match="optim.epochs=2.5: expected an integer"):
        load_config("pretrain/fashion_mnist", ["optim.epochs=2.5"])
    with pytest.raises(ValueError, match="optim.batch_size=None: a value is required"):
        load_config("pretrain/fashion_mnist", ["optim.batch_size=null"])


def test_unknown_config_file_and_wrong_task():
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_config("pretrain/nope")
    with pytest.raises(ConfigError, match="config is for task 'pretrain', not 'finetune'"):
        load_config("pretrain/fashion_mnist", task="finetune")


def test_sections_are_plain_dataclasses_and_task_defaults_live_in_yaml():
    for cls in (ModelSection, *SECTIONS.values()):
        assert dataclasses.is_dataclass(cls) and cls.__bases__ == (object,), cls
    fine = load_config("finetune/fashion_mnist")
    assert (fine.optim.betas, fine.optim.clip_grad, fine.optim.layer_decay) == ((0.9, 0.999), None, 0.75)
    pre = load_config("pretrain/fashion_mnist")
    assert (pre.optim.betas, pre.optim.clip_grad, pre.optim.layer_decay) == ((0.9, 0.95), 3.0, None)
    # the classifier's 4 directions and learnable positions come from the YAML, not from Python
    model = fine.model.star_config(num_classes=10)
    assert (model.directions, model.learnable_pos_embed, model.num_classes) == (4, True, 10)
    assert "num_classes" not in fine.model.fields  # follows the dataset


def test_probe_section_is_typed_checked_and_defaults_to_the_protocol():
    cfg = load_config("linprobe/fashion_mnist", ["probe.layers=[2, 4]", "probe.knn_k=10.0",
                                                 "probe.weight_decays=[1e-3, 0]",
                                                 "probe.knn_temperature=null"])
    p = cfg.probe
    assert p.layers == (2, 4) and p.knn_k == 10 and isinstance(p.knn_k, int)
    assert p.weight_decays == (1e-3, 0.0) and p.knn_temperature is None
    default = load_config("pretrain/fashion_mnist").probe  # every config has the section
    assert (default.pool, default.layers, default.heldout_fraction, default.knn_k,
            default.knn_temperature, default.precision) == ("avg", None, 0.1, 20, 0.07, "float64")
    assert default.weight_decays == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    with pytest.raises(ConfigError, match=r"probe.pool='mean'; allowed: avg, cls"):
        load_config("linprobe/fashion_mnist", ["probe.pool=mean"])
    with pytest.raises(ConfigError, match=r"probe.weight_decays=\[\]; expected a non-empty"):
        load_config("linprobe/fashion_mnist", ["probe.weight_decays=[]"])
    with pytest.raises(ConfigError, match="did you mean 'knn_k'"):
        load_config("linprobe/fashion_mnist", ["probe.knn=5"])
    with pytest.raises(ConfigError, match="config is for task 'linprobe', not 'finetune'"):
        load_config("linprobe/fashion_mnist", task="finetune")


def test_eval_split_follows_the_dataset_unless_set():
    assert DataConfig(name="imagefolder").resolved_eval_split == "val"
    assert DataConfig(name="fashion_mnist").resolved_eval_split == "test"
    assert DataConfig(name="imagefolder", eval_split="test").resolved_eval_split == "test"
    cfg = load_config("finetune/fashion_mnist", ["data.name=imagefolder", "data.root=/x"])
    assert cfg.data.eval_split is None and cfg.data.resolved_eval_split == "val"
    assert load_config("finetune/fashion_mnist").data.resolved_eval_split == "test"


def test_runtime_fields_do_not_make_another_model(tmp_path):
    saved = StarConfig(scan_backend="numba").to_dict()
    ckpt.check_same_model(saved, StarConfig(scan_backend="torch").to_dict(), tmp_path / "c.pth")
    del saved["final_norm"]  # a checkpoint from before a field existed: the default
    ckpt.check_same_model(saved, StarConfig().to_dict(), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="model.embed_dim: checkpoint 192 vs config 256"):
        ckpt.check_same_model(saved, StarConfig(embed_dim=256).to_dict(), tmp_path / "c.pth")


def test_resume_under_another_scan_backend_but_not_another_width(tmp_path):
    out = f"run.output_dir={tmp_path}"
    pretrain(load_config("pretrain/fashion_mnist", [*TINY_PRETRAIN, out, "run.max_steps=1",
                                                   "model.scan_backend=reference"]))
    summary = pretrain(load_config("pretrain/fashion_mnist", [
        *TINY_PRETRAIN, out, "run.max_steps=2", "model.scan_backend=torch"]))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert summary["step"] == 2 and [r["step"] for r in rows] == [1, 2]  # resumed, one more step
    assert ckpt.load_checkpoint(tmp_path / ckpt.LATEST)["model_config"]["scan_backend"] == "torch"
    with pytest.raises(CheckpointError, match="model.embed_dim: checkpoint 32 vs config 64"):
        pretrain(load_config("pretrain/fashion_mnist", [*TINY_PRETRAIN, out, "run.max_steps=3",
                                                       "model.embed_dim=64"]))
