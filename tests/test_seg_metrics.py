"""Segmentation metrics and inference (evaluation/segmentation.py): the confusion matrix and
mmseg's IoU / Acc conventions against hand counts and an independent set-based count; slide,
flip, multi-scale and padded inference against whole-image inference; the confusion summed over
two gloo processes against one process."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from star_mamba.evaluation.segmentation import (InferenceConfig, confusion_matrix,
                                                evaluate_segmentation, predict,
                                                segmentation_metrics, window_starts)

from .conftest import free_port

IGNORE = 255


# ------------------------------------------------------------------------------ metrics

def test_hand_counted_three_class_example():
    target = torch.tensor([[0, 0, 0, 1], [1, 2, IGNORE, 2]])
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0]])
    # (truth, pred) over the 7 counted pixels: (0,0) (0,0) (0,1) (1,1) (1,2) (2,2) (2,0)
    expected = torch.tensor([[2, 1, 0],
                             [0, 1, 1],
                             [1, 0, 1]])
    conf = confusion_matrix(pred, target, 3, IGNORE)
    assert conf.dtype == torch.int64 and torch.equal(conf, expected)
    m = segmentation_metrics(conf, classes=["sky", "road", "car"])
    # IoU = TP / (truth + predicted - TP): 2/(3+3-2), 1/(2+2-1), 1/(2+2-1)
    iou = [100 * 2 / 4, 100 / 3, 100 / 3]
    acc = [100 * 2 / 3, 50.0, 50.0]  # TP / truth
    assert [c["class"] for c in m["per_class"]] == ["sky", "road", "car"]
    assert [c["IoU"] for c in m["per_class"]] == pytest.approx(iou)
    assert [c["Acc"] for c in m["per_class"]] == pytest.approx(acc)
    assert m["mIoU"] == pytest.approx(sum(iou) / 3)
    assert m["mAcc"] == pytest.approx(sum(acc) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7)


def test_ignored_pixels_count_nowhere_whatever_is_predicted_there():
    target = torch.tensor([0, 1, IGNORE, IGNORE])
    a = confusion_matrix(torch.tensor([0, 1, 0, 0]), target, 2, IGNORE)
    b = confusion_matrix(torch.tensor([0, 1, 1, 1]), target, 2, IGNORE)
    assert torch.equal(a, b) and a.sum() == 2


def test_absent_class_is_nan_and_left_out_of_the_means():
    # class 2 neither true nor predicted -> NaN IoU and Acc; class 3 only predicted -> IoU 0
    # (it counts in mIoU), Acc NaN (no true pixel: out of mAcc)
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 3, 1, 1])
    m = segmentation_metrics(confusion_matrix(pred, target, 4, IGNORE))
    iou = [c["IoU"] for c in m["per_class"]]
    acc = [c["Acc"] for c in m["per_class"]]
    assert iou[:2] == pytest.approx([50.0, 100.0]) and math.isnan(iou[2]) and iou[3] == 0.0
    assert acc[:2] == pytest.approx([50.0, 100.0]) and math.isnan(acc[2]) and math.isnan(acc[3])
    assert m["mIoU"] == pytest.approx((50 + 100 + 0) / 3)
    assert m["mAcc"] == pytest.approx(75.0)
    assert [c["class"] for c in m["per_class"]] == ["0", "1", "2", "3"]


def test_nothing_counted_gives_nan_not_an_error():
    m = segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(m["mIoU"]) and math.isnan(m["mAcc"]) and math.isnan(m["aAcc"])


def _set_based_metrics(pred: np.ndarray, target: np.ndarray, k: int):
    """An independent count: per class, pixel index sets of the truth and the prediction."""
    keep = np.flatnonzero(target.ravel() != IGNORE)
    p, t = pred.ravel()[keep], target.ravel()[keep]
    ious, accs = [], []
    for c in range(k):
        truth, guess = set(np.flatnonzero(t == c)), set(np.flatnonzero(p == c))
        union = truth | guess
        ious.append(100 * len(truth & guess) / len(union) if union else math.nan)
        accs.append(100 * len(truth & guess) / len(truth) if truth else math.nan)
    return np.nanmean(ious), np.nanmean(accs), 100 * np.mean(p == t), ious


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_an_independent_set_based_count(seed):
    rng = np.random.default_rng(seed)
    k = 6
    target = rng.integers(0, k - 1, size=(3, 17, 13))  # class k-1 never true
    target[rng.random(target.shape) < 0.2] = IGNORE
    pred = rng.integers(0, k - 2, size=target.shape)  # nor k-2, k-1 predicted: k-1 is NaN
    m = segmentation_metrics(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target),
                                              k, IGNORE))
    miou, macc, aacc, ious = _set_based_metrics(pred, target, k)
    assert m["mIoU"] == pytest.approx(miou) and m["mAcc"] == pytest.approx(macc)
    assert m["aAcc"] == pytest.approx(aacc)
    np.testing.assert_allclose([c["IoU"] for c in m["per_class"]], ious)  # NaN where NaN


def test_bad_inputs_are_clear_value_errors():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3, IGNORE)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3, IGNORE)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64), classes=["a", "b"])
    with pytest.raises(ValueError, match="inference.stride=40"):
        InferenceConfig(mode="slide", crop=32, stride=40)
    with pytest.raises(ValueError, match="inference.mode"):
        InferenceConfig(mode="tiles")
    with pytest.raises(ValueError, match="inference.scales"):
        InferenceConfig(scales=())
    assert InferenceConfig.from_dict(dict(mode="slide", crop=64, scales=[0.5, 1])).scales == (0.5, 1.0)


# ------------------------------------------------------------------------------ inference

class Pointwise(nn.Module):
    """A 1x1 conv: each pixel's logits depend on that pixel alone. Refuses sizes that are not
    multiples of the patch, as StarSegmenter does."""

    def __init__(self, patch: int = 4, cin: int = 2, k: int = 3, kernel: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.patch = patch
        self.conv = nn.Conv2d(cin, k, kernel, padding=kernel // 2)

    def forward(self, x):
        assert x.shape[-2] % self.patch == 0 and x.shape[-1] % self.patch == 0, x.shape
        return self.conv(x)


def test_window_starts_cover_the_side_and_end_at_the_border():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]  # mmseg: 2 windows, the last at the border
    assert window_starts(100, 32, 21) == [0, 21, 42, 63, 68]
    assert window_starts(20, 32, 21) == [0]  # one (smaller) window


def test_slide_equals_whole_for_a_pointwise_model():
    model = Pointwise()
    images = torch.randn(2, 2, 48, 48)
    whole = predict(model, images, 3, InferenceConfig(), patch_size=4)
    # crop 32, stride 16: every pixel in one or two windows, so the mean is exact
    slide = predict(model, images, 3, InferenceConfig(mode="slide", crop=32, stride=16), 4)
    assert torch.equal(slide, whole)
    # uneven: sizes not multiples of the patch, windows padded, up to 3 overlaps
    images = torch.randn(1, 2, 45, 37)
    whole = predict(model, images, 3, InferenceConfig(), 4)
    slide = predict(model, images, 3, InferenceConfig(mode="slide", crop=16, stride=6), 4)
    assert whole.shape == (1, 3, 45, 37)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


def test_slide_crop_defaults_to_the_model_image_size():
    model = Pointwise()
    model.cfg = type("Cfg", (), dict(img_size=16))()
    images = torch.randn(1, 2, 40, 24)
    out = predict(model, images, 3, InferenceConfig(mode="slide"), 4)
    torch.testing.assert_close(out, model(images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="give the crop"):
        predict(Pointwise(), images, 3, InferenceConfig(mode="slide"), 4)


def test_whole_inference_pads_to_the_patch_and_returns_the_input_size():
    model = Pointwise(patch=8)
    images = torch.randn(2, 2, 30, 22)
    out = predict(model, images, 3, InferenceConfig(), patch_size=8)
    assert out.shape == (2, 3, 30, 22)
    torch.testing.assert_close(out, model.conv(images))  # pointwise: padding changes nothing


def test_flip_of_a_flip_equivariant_model_equals_the_plain_prediction():
    model = Pointwise(kernel=3)
    with torch.no_grad():  # a left-right symmetric kernel: conv(flip(x)) = flip(conv(x))
        model.conv.weight.copy_((model.conv.weight + model.conv.weight.flip(-1)) / 2)
    images = torch.randn(2, 2, 16, 24)
    plain = predict(model, images, 3, InferenceConfig(), 4)
    flipped = predict(model, images, 3, InferenceConfig(flip=True), 4)
    # two views -> log of the mean softmax: the same probabilities as the plain logits
    torch.testing.assert_close(flipped.softmax(1), plain.softmax(1))
    # a model that is not symmetric: flipping changes the answer (the flip is really used)
    asym = Pointwise(kernel=3)
    assert not torch.allclose(predict(asym, images, 3, InferenceConfig(flip=True), 4).softmax(1),
                              predict(asym, images, 3, InferenceConfig(), 4).softmax(1))


def test_multi_scale_returns_the_input_size_and_averages_probabilities():
    model = Pointwise()
    images = torch.randn(1, 2, 20, 28)
    out = predict(model, images, 3, InferenceConfig(scales=(0.5, 1.0, 1.5), flip=True), 4)
    assert out.shape == (1, 3, 20, 28) and torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 20, 28))  # log-probabilities


def test_evaluate_resizes_logits_to_the_masks_and_counts_valid_pixels():
    model = Pointwise()
    torch.manual_seed(1)
    images = torch.randn(4, 2, 16, 16)
    masks = torch.randint(0, 3, (4, 32, 32))
    masks[:, :4] = IGNORE
    loader = [(images[:2], masks[:2]), (images[2:], masks[2:])]
    out = evaluate_segmentation(model, loader, torch.device("cpu"), None, 3, IGNORE,
                                InferenceConfig(), patch_size=4)
    logits = nn.functional.interpolate(model(images), size=(32, 32), mode="bilinear")
    expected = segmentation_metrics(confusion_matrix(logits.argmax(1), masks, 3, IGNORE))
    assert out["mIoU"] == pytest.approx(expected["mIoU"])
    assert out["aAcc"] == pytest.approx(expected["aAcc"])
    ce = nn.functional.cross_entropy(logits, masks, ignore_index=IGNORE)
    assert out["loss"] == pytest.approx(ce.item(), rel=1e-6)


# ------------------------------------------------------------------------------ two processes

def _data():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 2, 12, 12, generator=g)
    masks = torch.randint(0, 3, (6, 12, 12), generator=g)
    masks[torch.rand(masks.shape, generator=g) < 0.2] = IGNORE
    return images, masks


def _rank_eval(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        images, masks = _data()
        share = range(rank, len(images), world)  # rank r: images r, r + 2, ...
        loader = [(images[i:i + 1], masks[i:i + 1]) for i in share]
        out = evaluate_segmentation(Pointwise(), loader, torch.device("cpu"), None, 3, IGNORE,
                                    InferenceConfig(), patch_size=4)
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()



@pytest.mark.slow  # two spawned interpreters importing torch: ~30 s on 2 busy cores
def test_two_gloo_processes_sum_to_the_one_process_metrics(tmp_path):
    images, masks = _data()
    one = evaluate_segmentation(Pointwise(), [(images[i:i + 1], masks[i:i + 1]) for i in range(6)],
                                torch.device("cpu"), None, 3, IGNORE, InferenceConfig(), 4)
    path = str(tmp_path / "out")
    mp.spawn(_rank_eval, args=(2, free_port(), path), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(f"{path}.{rank}")
        assert two["per_class"] == one["per_class"]  # exact: from the same integer counts
        assert two["mIoU"] == one["mIoU"] and two["aAcc"] == one["aAcc"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-12)
