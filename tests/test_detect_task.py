"""star-mamba detect end to end: a COCO-layout tree a test writes (a crowd box, an image
without objects, a degenerate box, a box past the border, a grayscale image, a broken file)
and the built-in scenes through the CLI, eval of the checkpoint, one process against two."""
import json

import pytest
import torch

from star_mamba.engine.config import load_config

from .conftest import QUIET, as_overrides, assert_same_tensors, output_of, run_cli, run_module
from .test_detection import write_coco

MODEL = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, directions=2,
             class_token="none", drop_path_rate=0.0)
DETECT = ["detect.fpn_channels=16", "detect.gn_groups=4", "detect.anchor_scale=0.25",
          "detect.rpn_pre_nms_top_n_train=50", "detect.rpn_post_nms_top_n_train=20",
          "detect.rpn_pre_nms_top_n_test=50", "detect.rpn_post_nms_top_n_test=20",
          "detect.box_batch_size_per_image=16", "detect.rpn_batch_size_per_image=16",
          "detect.viz_images=1"]
SMALL = [*as_overrides("model", MODEL), *DETECT, "optim.batch_size=2", "optim.epochs=1",
         "run.pretrained=null", "data.num_workers=0", *QUIET]
SCENES = [*SMALL, "model.in_chans=1", "data.name=scenes", "data.scene_canvas=32",
          "data.scene_images=16", "data.max_eval_images=4", "data.scene_source=shapes"]


def _eval_json(out) -> dict:
    return json.loads((out / "eval.json").read_text())


def test_coco_layout_trains_and_evaluates_through_the_cli(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "run"
    write_coco(root)
    done = run_cli("detect", [*SMALL, "data.name=coco", f"data.root={root}",
                              "data.max_bad_fraction=0.5", "detect.drop_empty=false",
                              f"run.output_dir={out}"])
    assert done.returncode == 0, output_of(done)
    log = (out / "log.txt").read_text()
    assert "c.jpg" in log  # the broken image is named
    assert "1 COCO box(es) with no area inside their image dropped" in log  # counted, in the log
    result = _eval_json(out)
    assert {"bbox_mAP", "bbox_mAP_50", "segm_mAP"} <= result.keys()
    assert all(0 <= result[k] <= 100 for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP"))
    assert (out / "checkpoint-best.pth").exists() and (out / "predictions.png").exists()
    again = run_module(["star_mamba", "eval", "--checkpoint", str(out / "checkpoint-best.pth")])
    assert again.returncode == 0, output_of(again)
    scored = json.loads(again.stdout.strip().splitlines()[-1])
    assert scored["bbox_mAP"] == pytest.approx(result["bbox_mAP"])


def test_a_missing_annotation_file_is_one_line_naming_it(tmp_path):
    root = tmp_path / "coco"
    write_coco(root)
    (root / "annotations" / "instances_train2017.json").unlink()
    done = run_cli("detect", [*SMALL, "data.name=coco", f"data.root={root}",
                              f"run.output_dir={tmp_path / 'run'}"])
    assert done.returncode == 2, output_of(done)
    assert "instances_train2017.json" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_scenes_one_process_and_two_train_the_same_detector(tmp_path):
    """The same micro-batches (1 x accum 2, 2 x accum 1): the same weights and box AP."""
    results, weights = [], []
    for nproc, accum in ((1, 2), (2, 1)):
        out = tmp_path / f"p{nproc}"
        done = run_cli("detect", [*SCENES, f"optim.accum_iter={accum}", f"run.output_dir={out}"],
                       f"--nproc_per_node={nproc}")
        assert done.returncode == 0, output_of(done)
        results.append(_eval_json(out))
        weights.append(torch.load(out / "checkpoint-latest.pth", weights_only=True)["model"])
    assert_same_tensors(*weights, "weights", rtol=1e-4, atol=1e-6)
    assert results[0]["bbox_mAP"] == pytest.approx(results[1]["bbox_mAP"], abs=1e-6)


def test_recipes_load_with_their_numbers():
    coco = load_config("detect/star_base_coco")
    assert coco.model.star_config().img_size == 1024 and coco.detect.lsj
    assert coco.detect.lsj_size == 1024 and coco.detect.lsj_range == (0.1, 2.0)
    assert coco.optim.layer_decay == 0.7 and coco.optim.epochs == 100
    default = load_config("detect/scenes")
    assert default.task == "detect" and default.data.name == "scenes"
