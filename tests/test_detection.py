"""Detection (models/detection.py, data/detection.py, evaluation/detection.py): COCOeval
scores against known answers, the Mask R-CNN / Faster R-CNN over a tiny STAR backbone, the
COCO reader on a tree written here, the joint transforms, scene targets and the scored path
end to end."""
import json
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from timm.optim import create_optimizer_v2

from star_mamba.data.detection import (CocoDetection, DetectionDataOptions, DetectionTransform,
                                       SceneDetection, build_coco_detection, collate_detection,
                                       hflip, make_target)
from star_mamba.data.folder import collect_unreadable
from star_mamba.data.scenes import SceneDataset, SceneOptions
from star_mamba.errors import ConfigError, DataError, MissingFileError
from star_mamba.evaluation.detection import (coco_evaluate, evaluate_detection, metric_names,
                                             scenes_to_coco, to_coco_results)
from star_mamba.models.convert import load_pretrained
from star_mamba.models.detection import (DetectorConfig, build_detector, detector_from_config_dict,
                                         detector_config_dict, detector_param_groups)
from star_mamba.models.pretrain import StarPretrain
from star_mamba.models.registry import model_config

from .conftest import free_port

K = 3
# a small detector: 32 px pyramid, few proposals and RoIs, anchors 4 ... 64 px (stride 1 ... 16)
DET = dict(fpn_channels=32, gn_groups=8, anchor_scale=0.5, rpn_pre_nms_top_n_train=64,
           rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
           rpn_batch_size_per_image=32, box_batch_size_per_image=32, box_detections_per_img=20,
           image_mean=(0.286,), image_std=(0.353,))  # grey: the task fills the data's statistics


def tiny_cfg(**overrides):
    return model_config("star_tiny", **{**dict(embed_dim=32, depth=2, img_size=32, patch_size=4,
                                               in_chans=1, directions=2), **overrides})


def detector(seed=0, num_classes=K, model=None, **det):
    torch.manual_seed(seed)
    return build_detector(model or tiny_cfg(), num_classes, DetectorConfig(**{**DET, **det}))


def rect_mask(h, w, box):
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = 1
    return m


class Boxes:
    """A dataset of given (size, boxes, labels) images with rectangle masks (raw = items)."""

    classes = ("background", "a", "b", "c")

    def __init__(self, images):
        self.items = []
        for i, (size, boxes, labels) in enumerate(images):
            masks = np.stack([rect_mask(*size, b) for b in boxes])
            self.items.append((torch.zeros(1, *size), make_target(boxes, labels, masks, i, size)))

    def __len__(self):
        return len(self.items)

    def raw(self, i):
        return self.items[i]


GT = Boxes([((40, 40), [(0, 0, 20, 20), (20, 10, 40, 40)], [1, 2]),
            ((40, 48), [(5, 5, 25, 25)], [3])])


def outputs_from(dataset, shift=None, label_offset=0):
    """Predictions = the ground truth (score 1), optionally with each box cut by ``shift``."""
    outs = []
    for _, t in dataset.items:
        boxes = t["boxes"].clone()
        if shift is not None:
            boxes = shift(boxes)
        masks = torch.stack([torch.from_numpy(rect_mask(*t["orig_size"], b)) for b in boxes])
        outs.append(dict(boxes=boxes, labels=(t["labels"] - 1 + label_offset) % K + 1,
                         scores=torch.ones(len(boxes)), masks=masks[:, None].float()))
    return outs, [t["image_id"] for _, t in dataset.items]


# ------------------------------------------------------------------------------ COCOeval

def test_perfect_predictions_score_100_box_and_mask():
    gt = scenes_to_coco(GT)
    outs, ids = outputs_from(GT)
    m = coco_evaluate(gt, to_coco_results(outs, ids, None, with_masks=True))
    assert set(m) == set(metric_names())
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_75", "bbox_AR_100"):
        assert m[key] == pytest.approx(100.0), key


def test_iou_06_boxes_give_ap50_100_and_ap75_0():
    def cut(boxes):  # keep the top 60% of every box: IoU with its ground truth = 0.6
        boxes = boxes.clone()
        boxes[:, 3] = boxes[:, 1] + 0.6 * (boxes[:, 3] - boxes[:, 1])
        return boxes
    outs, ids = outputs_from(GT, shift=cut)
    m = coco_evaluate(scenes_to_coco(GT), to_coco_results(outs, ids, None, with_masks=True))
    for t in ("bbox", "segm"):
        assert m[f"{t}_mAP_50"] == pytest.approx(100.0)
        assert m[f"{t}_mAP_75"] == pytest.approx(0.0)
        assert 0 < m[f"{t}_mAP"] < 100


def test_wrong_class_and_no_predictions_score_0():
    gt = scenes_to_coco(GT)
    outs, ids = outputs_from(GT, label_offset=1)
    m = coco_evaluate(gt, to_coco_results(outs, ids, None, with_masks=True))
    assert m["bbox_mAP"] == pytest.approx(0.0) and m["segm_mAP"] == pytest.approx(0.0)
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                  scores=torch.zeros(0), masks=torch.zeros(0, 1, 40, 40))] * 2
    assert to_coco_results(empty, ids, None) == []
    m = coco_evaluate(gt, [])
    assert set(m) == set(metric_names()) and all(v == 0.0 for v in m.values())


def test_label_to_category_maps_results_back():
    outs, ids = outputs_from(GT)
    results = to_coco_results(outs, ids, {1: 7, 2: 9, 3: 11}, with_masks=False)
    assert sorted({r["category_id"] for r in results}) == [7, 9, 11]
    assert "segmentation" not in results[0]
    assert results[0]["bbox"] == [0.0, 0.0, 20.0, 20.0]  # xywh


# ------------------------------------------------------------------------------ the detector

def _targets(sizes):
    targets = []
    for h, w in sizes:
        boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 4.0, w - 1.0, h - 2.0]])
        masks = torch.stack([torch.from_numpy(rect_mask(h, w, b)) for b in boxes])
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 3]), masks=masks))
    return targets


def test_training_losses_are_finite_and_every_backbone_weight_gets_a_gradient():
    model = detector().train()
    sizes = [(32, 32), (30, 37)]  # the second is no multiple of the patch: padded
    losses = model([torch.rand(1, *s) for s in sizes], _targets(sizes))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.backbone.named_parameters() if p.grad is None]
    assert missing == []
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.body.backbone.blocks[0].parameters())


def test_eval_outputs_have_the_input_size_and_shapes():
    model = detector().eval()
    sizes = [(32, 32), (30, 37)]
    with torch.no_grad():
        outs = model([torch.rand(1, *s) for s in sizes])
    for out, (h, w) in zip(outs, sizes):
        n = len(out["boxes"])
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == out["scores"].shape == (n,)
        assert out["masks"].shape == (n, 1, h, w)
        assert n <= DET["box_detections_per_img"]
        if n:
            assert out["labels"].min() >= 1 and out["labels"].max() <= K
            assert out["boxes"][:, 2].max() <= w and out["boxes"][:, 3].max() <= h


def test_backbone_levels_strides_and_anchors():
    model = detector()
    feats = model.backbone(torch.rand(2, 1, 32, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 64), (16, 32), (8, 16), (4, 8), (2, 4)]
    assert all(f.shape[:2] == (2, 32) for f in feats.values()) and model.backbone.out_channels == 32
    assert model.transform.size_divisible == 16  # the pool level's stride (4 x patch 4)
    cfg = DetectorConfig()
    assert cfg.resolved_anchor_sizes(16) == ((32,), (64,), (128,), (256,), (512,))
    assert cfg.strides(16) == (4, 8, 16, 32, 64)


def test_faster_rcnn_and_several_taps():
    model = detector(kind="faster_rcnn", taps=(0,))  # one tap, not the last: no final norm
    assert model.roi_heads.mask_head is None and model.backbone.taps == (0,)
    model = detector(kind="faster_rcnn", model=tiny_cfg(depth=4), taps=(0, 1, 2, 3)).train()
    losses = model([torch.rand(1, 32, 32)], [dict(boxes=torch.tensor([[1.0, 1.0, 9.0, 9.0]]),
                                                  labels=torch.tensor([2]))])
    assert "loss_mask" not in losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert "masks" not in model([torch.rand(1, 32, 32)])[0]


def test_load_pretrained_fills_the_detector_backbone():
    torch.manual_seed(1)
    pre = StarPretrain(tiny_cfg(directions=1, cluster_size=2, decoder_dim=32, decoder_depth=2,
                                decoder_heads=2, images_per_sequence=2))
    model = detector()
    key = "blocks.1.mlp.fc1_x.weight"
    body = model.backbone.body
    assert not torch.equal(body.backbone.state_dict()[key], pre.encoder.state_dict()[key])
    report = load_pretrained(body, pre.state_dict())
    assert torch.equal(body.backbone.state_dict()[key], pre.encoder.state_dict()[key])
    assert not [k for k in report.new if k.startswith("backbone.blocks.")]


def test_layer_decay_groups_blocks_decayed_heads_at_1():
    model = detector()
    names = dict(model.named_parameters())
    for groups in (create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                       layer_decay=0.5).param_groups,
                   detector_param_groups(model, 1e-3, 0.05, layer_decay=0.5)):
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        assert len(scale) == len(names)

        def scales(prefix):
            return {scale[id(p)] for n, p in names.items() if n.startswith(prefix)}
        for head in ("backbone.pyramid.", "rpn.", "roi_heads."):
            assert scales(head) == {1.0}, head
        blocks = [scales(f"backbone.body.backbone.blocks.{i}.") for i in range(2)]
        assert all(len(s) == 1 for s in blocks)
        b0, b1 = blocks[0].pop(), blocks[1].pop()
        assert b0 < b1 < 1.0
        assert scales("backbone.body.backbone.patch_embed.") == {b0 * 0.5}
    groups = detector_param_groups(model, 1e-3, 0.05)
    assert {g["lr"] for g in groups} == {1e-3}
    assert any(n.endswith("A_log") for n in model.no_weight_decay())


def test_drop_path_and_config_round_trip():
    model = detector(model=tiny_cfg(drop_path_rate=0.1))
    assert model.backbone.body.cfg.drop_path_rate == 0.1
    rebuilt = detector_from_config_dict(json.loads(json.dumps(detector_config_dict(model))))
    assert rebuilt.det_cfg == model.det_cfg and rebuilt.num_object_classes == K
    assert DetectorConfig.from_dict(DetectorConfig(anchor_sizes=((8,),) * 5).to_dict()).anchor_sizes == ((8,),) * 5


@pytest.mark.parametrize("fields, message", [
    (dict(kind="retina"), "detect.kind"),
    (dict(taps=(1, 0)), "detect.taps"),
    (dict(pyramid=(2.0, 1.0)), "detect.pyramid"),
    (dict(min_size=32), "min_size"),
    (dict(image_mean=(0.5,)), "image_mean"),
    (dict(anchor_sizes=((8,),)), "anchor_sizes"),
    (dict(fpn_channels=0), "fpn_channels"),
])
def test_bad_config_is_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=message) as info:
        DetectorConfig(**fields)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="detect.image_mean"):
        build_detector(tiny_cfg(), K, DetectorConfig(image_mean=(0.1, 0.2, 0.3), image_std=(1, 1, 1)))
    with pytest.raises(ConfigError, match="detect.taps"):
        build_detector(tiny_cfg(), K, DetectorConfig(taps=(5,)))


# ------------------------------------------------------------------------------ COCO reader

def write_coco(root, train_anns=None, broken=True):
    """3 train images (one grey, one broken if ``broken``, one without objects), 1 val image."""
    (root / "train2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "train2017" / "a.png")
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8), mode="L").save(root / "train2017" / "b.png")
    if broken:
        (root / "train2017" / "c.jpg").write_bytes(b"not an image")
    else:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "train2017" / "c.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "val2017" / "v.png")
    cats = [dict(id=18, name="dog"), dict(id=3, name="car"), dict(id=90, name="toothbrush")]
    images = [dict(id=1, file_name="a.png", height=20, width=30),
              dict(id=2, file_name="b.png", height=24, width=24),
              dict(id=5, file_name="c.jpg", height=16, width=16)]
    anns = train_anns if train_anns is not None else [
        dict(id=1, image_id=1, category_id=18, bbox=[2, 3, 10, 8], area=80, iscrowd=0,
             segmentation=[[2, 3, 12, 3, 12, 11, 2, 11]]),
        dict(id=2, image_id=1, category_id=3, bbox=[20, 10, 20, 20], area=100, iscrowd=0,  # past x = 30
             segmentation=[[20, 10, 30, 10, 30, 20, 20, 20]]),
        dict(id=3, image_id=1, category_id=90, bbox=[0, 0, 30, 20], area=600, iscrowd=1,
             segmentation=dict(counts=[0, 600], size=[20, 30])),
        dict(id=4, image_id=1, category_id=3, bbox=[31, 2, 5, 5], area=25, iscrowd=0,  # outside
             segmentation=[[31, 2, 36, 2, 36, 7]]),
        dict(id=5, image_id=5, category_id=3, bbox=[1, 1, 4, 4], area=16, iscrowd=0,
             segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]]),
    ]  # image 2 (grey) has no object
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps(dict(images=images, annotations=anns, categories=cats)))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(dict(
        images=[dict(id=7, file_name="v.png", height=20, width=20)],
        annotations=[dict(id=1, image_id=7, category_id=3, bbox=[1, 1, 5, 5], area=25, iscrowd=0,
                          segmentation=[[1, 1, 6, 1, 6, 6, 1, 6]])],
        categories=cats)))


def test_coco_reader_targets_crowd_clip_degenerate_and_mapping(tmp_path, caplog):
    write_coco(tmp_path, broken=False)
    with caplog.at_level(logging.WARNING, logger="star_mamba"):
        data = CocoDetection(tmp_path, "train", drop_empty=True)
    assert data.category_to_label == {3: 1, 18: 2, 90: 3}
    assert {v: k for k, v in data.category_to_label.items()} == data.label_to_category
    assert data.classes == ("background", "car", "dog", "toothbrush")
    assert data.ids == [1, 5]  # image 2 has no object: dropped
    assert sum("1 COCO box(es) with no area" in r.getMessage() for r in caplog.records) == 1
    image, t = data[0]
    assert image.shape == (3, 20, 30) and 0 <= image.min() and image.max() <= 1
    assert t["image_id"] == 1 and t["labels"].tolist() == [2, 1]  # the crowd box left out
    assert t["iscrowd"].tolist() == [0, 0]
    assert t["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0], [20.0, 10.0, 30.0, 20.0]]  # clipped
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, 20, 30)
    assert t["masks"][0, 5, 5] == 1 and t["masks"][0, 15, 15] == 0
    assert CocoDetection(tmp_path, "train", drop_empty=False).ids == [1, 2, 5]
    grey, t2 = CocoDetection(tmp_path, "train", drop_empty=False)[1]
    assert grey.shape == (3, 24, 24) and torch.equal(grey[0], grey[1]) and len(t2["boxes"]) == 0
    assert t2["masks"].shape == (0, 24, 24)
    val = build_coco_detection(tmp_path, "val", DetectionDataOptions(drop_empty=True))
    assert len(val) == 1 and val.coco.getImgIds() == [7]


def test_coco_broken_image_is_skipped_and_named(tmp_path, caplog):
    write_coco(tmp_path, broken=True)
    data = CocoDetection(tmp_path, "train", drop_empty=True, max_bad_fraction=0.9)
    with caplog.at_level(logging.WARNING, logger="star_mamba"):
        image, t = data[1]  # c.jpg is broken: the next readable item (index 0) instead
    assert t["image_id"] == 1
    assert any("c.jpg" in r.getMessage() for r in caplog.records)
    with collect_unreadable() as reports:
        data[1]
    assert reports and reports[0][0] == 1 and reports[0][1].endswith("c.jpg")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    (json.dumps(dict(images=[], categories=[])), "annotations"),
    (json.dumps(dict(images=[dict(id=1, file_name="a.png")], annotations=[], categories=[])),
     "missing key"),
])
def test_missing_or_malformed_annotation_file_is_one_clear_error(tmp_path, content, message):
    write_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_train2017.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises((MissingFileError, DataError), match=message) as info:
        CocoDetection(tmp_path, "train")
    assert "instances_train2017.json" in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------ transforms

def _asym():
    mask = np.zeros((1, 10, 20), np.uint8)
    mask[0, 2:5, 1:4] = 1  # a box (1, 2, 4, 5) near the left edge
    image = torch.zeros(1, 10, 20)
    image[0, 2:5, 1:4] = 1
    return image, make_target([(1, 2, 4, 5)], [1], mask, 0, (10, 20))


def test_flip_moves_boxes_and_masks_together():
    image, t = _asym()
    fimage, ft = hflip(image, t)
    assert ft["boxes"].tolist() == [[16.0, 2.0, 19.0, 5.0]]
    ys, xs = np.nonzero(ft["masks"][0].numpy())
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (16, 19, 2, 5)
    assert torch.equal(fimage[0] > 0, ft["masks"][0] > 0)
    np.random.seed(0)
    image2, t2 = DetectionTransform(DetectionDataOptions(flip_prob=1.0), train=True)(image, t)
    assert t2["boxes"].tolist() == [[16.0, 2.0, 19.0, 5.0]]
    image3, t3 = DetectionTransform(DetectionDataOptions(flip_prob=1.0), train=False)(image, t)
    assert t3["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0]]


def test_resize_and_lsj_sizes_and_boxes_inside():
    image, t = _asym()
    out, ot = DetectionTransform(DetectionDataOptions(min_size=20, max_size=100), train=False)(image, t)
    assert out.shape == (1, 20, 40) and ot["boxes"].tolist() == [[2.0, 4.0, 8.0, 10.0]]
    assert ot["masks"].shape == (1, 20, 40) and ot["orig_size"] == (10, 20)
    lsj = DetectionTransform(DetectionDataOptions(lsj=True, lsj_size=16, lsj_range=(0.3, 3.0)))
    np.random.seed(1)
    for _ in range(20):
        out, ot = lsj(image, t)
        assert out.shape == (1, 16, 16) and ot["masks"].shape[-2:] == (16, 16)
        b = ot["boxes"]
        assert len(b) == len(ot["labels"]) == len(ot["masks"]) <= 1
        if len(b):
            assert (b >= 0).all() and (b <= 16).all() and (b[:, 2:] > b[:, :2]).all()


# ------------------------------------------------------------------------------ scenes

SCENES = SceneOptions(canvas=32, items=(1, 2), scale=(0.5, 0.9), source="shapes")


def test_scene_targets_match_the_instances():
    scenes = SceneDataset(3, "test", seed=0, opts=SCENES)
    data = SceneDetection(scenes)
    for i in range(3):
        image, t = data[i]
        scene = scenes[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and image.max() <= 1
        assert t["labels"].tolist() == [inst.label + 1 for inst in scene.instances]
        assert t["boxes"].tolist() == [list(inst.box) for inst in scene.instances]
        assert t["masks"].dtype == torch.uint8
        assert all(np.array_equal(m.numpy().astype(bool), inst.mask)
                   for m, inst in zip(t["masks"], scene.instances))
    images, targets = collate_detection([data[0], data[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == 1


def test_untrained_detector_is_scored_end_to_end_on_scenes():
    scenes = SceneDetection(SceneDataset(4, "test", seed=0, opts=SCENES))
    gt = scenes_to_coco(scenes)
    assert len(gt.getImgIds()) == 4 and len(gt.getCatIds()) == 10
    # evaluated at 1.5x: predictions are scaled back to the ground truth's size
    loader = torch.utils.data.DataLoader(
        SceneDetection(scenes.scenes, DetectionTransform(DetectionDataOptions(min_size=48, max_size=48), False)),
        batch_size=2, collate_fn=collate_detection)
    model = detector(num_classes=10).train()
    metrics = evaluate_detection(model, loader, "cpu", None, gt, scenes.label_to_category)
    assert model.training  # the mode is restored
    assert set(metrics) == set(metric_names())
    assert all(np.isnan(v) or 0 <= v <= 100 for v in metrics.values())
    perfect = evaluate_detection(_Oracle(scenes), loader, "cpu", None, gt, None)
    assert perfect["bbox_mAP"] == pytest.approx(100.0) and perfect["segm_mAP"] == pytest.approx(100.0)


class _Oracle(torch.nn.Module):
    """Returns each scene's ground truth (resized to the input) as its predictions."""

    def __init__(self, scenes, order=None):
        super().__init__()
        self.scenes, self.order = scenes, list(order) if order is not None else list(range(len(scenes)))

    def forward(self, images):
        outs = []
        for image in images:
            idx = self.order[self._next]
            self._next += 1
            _, t = self.scenes.raw(idx)
            h, w = image.shape[-2:]
            sy, sx = h / t["orig_size"][0], w / t["orig_size"][1]
            masks = torch.nn.functional.interpolate(t["masks"][:, None].float(), size=(h, w))
            outs.append(dict(boxes=t["boxes"] * torch.tensor([sx, sy, sx, sy]), labels=t["labels"],
                             scores=torch.ones(len(t["labels"])), masks=masks))
        return outs

    _next = 0


def test_a_training_step_on_collated_scene_items_with_lsj_and_an_empty_image():
    scenes = SceneDataset(2, "train", seed=0, opts=SCENES)
    opts = DetectionDataOptions(lsj=True, lsj_size=32, lsj_range=(0.5, 1.5))
    data = SceneDetection(scenes, DetectionTransform(opts, train=True))
    np.random.seed(0)
    items = [data[0], data[1]]
    empty = (torch.rand(1, 28, 36), make_target(np.zeros((0, 4)), [], np.zeros((0, 28, 36)), 9, (28, 36)))
    images, targets = collate_detection([*items, empty])
    model = detector(num_classes=10).train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_evaluation_under_bf16_autocast_runs():
    scenes = SceneDetection(SceneDataset(2, "test", seed=0, opts=SCENES))
    loader = torch.utils.data.DataLoader(scenes, batch_size=2, collate_fn=collate_detection)
    metrics = evaluate_detection(detector(num_classes=10), loader, "cpu", torch.bfloat16,
                                 scenes_to_coco(scenes), scenes.label_to_category)
    assert set(metrics) == set(metric_names())


# ------------------------------------------------------------------------------ two processes

def _rank_eval(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        scenes = SceneDetection(SceneDataset(3, "test", seed=0, opts=SCENES))
        share = [[0, 2], [1, 0]][rank]  # a padded sampler: image 0 on both ranks
        loader = [collate_detection([scenes[i]]) for i in share]
        out = evaluate_detection(_Oracle(scenes, share), loader, "cpu", None,
                                 scenes_to_coco(scenes), None)
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()



@pytest.mark.slow  # two spawned interpreters importing torch: ~30 s on 2 busy cores
def test_two_gloo_processes_gather_every_image_once(tmp_path):
    path = str(tmp_path / "out")
    mp.spawn(_rank_eval, args=(2, free_port(), path), nprocs=2, join=True)
    for rank in (0, 1):  # every image scored (a missing one would cost recall), the same dict
        out = torch.load(f"{path}.{rank}")
        assert out["bbox_mAP"] == pytest.approx(100.0) and out["bbox_AR_100"] == pytest.approx(100.0)
    same = [{k: repr(v) for k, v in torch.load(f"{path}.{r}").items()} for r in (0, 1)]
    assert same[0] == same[1]  # NaN (no ground truth in an area range) included
