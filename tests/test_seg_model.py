"""The segmentation model (models/segmentation.py): output shapes for UPerNet and the linear
probe at the config's and another size, the simple feature pyramid, gradients, layer-wise lr
decay groups, pretrained backbone loading, the loss's ignore index and config errors."""
import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from star_mamba.models.convert import load_pretrained
from star_mamba.models.pretrain import StarPretrain
from star_mamba.models.registry import model_config
from star_mamba.models.segmentation import (SegmenterConfig, SimpleFeaturePyramid,
                                            StarSegmenter, segmentation_loss)

K = 5
SEG = dict(channels=16, aux_channels=8, pool_scales=(1, 2))  # small heads: fast on CPU


def tiny_cfg(**overrides):
    return model_config("star_tiny", **{**dict(embed_dim=32, depth=4, img_size=32, patch_size=4,
                                               in_chans=1, directions=2), **overrides})


def segmenter(seed: int = 0, **seg) -> StarSegmenter:
    torch.manual_seed(seed)
    return StarSegmenter(tiny_cfg(), K, SegmenterConfig(**{**SEG, **seg}))


@pytest.mark.parametrize("head", ["upernet", "linear"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])  # the config's, and another (dynamic)
def test_logits_have_the_input_size(head, size):
    model = segmenter(head=head).eval()
    images = torch.randn(2, 1, *size)
    assert model(images).shape == (2, K, *size)
    logits, aux = model.train().forward_train(images)
    assert logits.shape == (2, K, *size)
    assert (aux.shape == (2, K, *size)) if head == "upernet" else aux is None


def test_default_taps_are_evenly_spaced_and_end_at_the_last_block():
    assert segmenter().taps == (0, 1, 2, 3)
    assert SegmenterConfig().resolved_taps(12) == (2, 5, 8, 11)
    assert SegmenterConfig().resolved_taps(24) == (5, 11, 17, 23)
    assert SegmenterConfig(pyramid=(1.0,)).resolved_taps(12) == (11,)
    assert SegmenterConfig().resolved_aux_tap == 2  # mmseg: the third of four levels
    assert segmenter(aux_weight=0.0).aux_head is None


def test_pyramid_levels_for_scales_4_2_1_half():
    cfg = SegmenterConfig(**SEG)
    pyramid = SimpleFeaturePyramid(32, cfg)
    taps = [torch.randn(2, 32, 6, 10) for _ in range(4)]
    shapes = [tuple(x.shape) for x in pyramid(taps)]
    assert shapes == [(2, 16, 24, 40), (2, 16, 12, 20), (2, 16, 6, 10), (2, 16, 3, 5)]


def test_gradients_reach_the_backbone_and_every_head_weight():
    model = segmenter().train()
    images, masks = torch.randn(2, 1, 32, 32), torch.randint(0, K, (2, 32, 32))
    logits, aux = model.forward_train(images)
    segmentation_loss(logits, aux, masks, model.seg_cfg.aux_weight).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # the last tap goes through the final norm: DDP has no unused weights
    assert model.backbone.backbone.blocks[0].mixer.in_proj.weight.grad.abs().sum() > 0
    assert model.backbone.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_frozen_backbone_trains_only_the_linear_probe():
    model = segmenter(head="linear", linear_norm=True).train()
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    images, masks = torch.randn(2, 1, 32, 32), torch.randint(0, K, (2, 32, 32))
    logits, aux = model.forward_train(images)
    segmentation_loss(logits, aux, masks, 0.0).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.startswith("linear_head.")}
    assert with_grad == {"linear_head.norm.weight", "linear_head.norm.bias",
                         "linear_head.classifier.1.weight", "linear_head.classifier.1.bias"}
    assert len(list(model.head_parameters())) == 4


def test_layer_decay_groups_block_0_smallest_heads_undecayed():
    model = segmenter()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(scale) == len(names)

    def scales(prefix):
        return {scale[id(p)] for n, p in names.items() if n.startswith(prefix)}

    assert scales("decode_head.") == scales("pyramid.") == scales("aux_head.") == {1.0}
    block = [scales(f"backbone.backbone.blocks.{i}.") for i in range(4)]
    assert all(len(s) == 1 for s in block)
    block = [s.pop() for s in block]
    assert block == sorted(block) and block[0] < block[1] < block[3] < 1.0
    assert scales("backbone.backbone.patch_embed.") == {block[0] * 0.5}  # the stem below block 0
    # no weight decay: positions, SSM A_log / D (the backbone's list), under backbone.
    assert "backbone.backbone.pos_embed" in model.no_weight_decay()
    assert any(n.endswith(".A_log") for n in model.no_weight_decay())


def test_load_pretrained_fills_the_backbone_blocks():
    torch.manual_seed(1)
    pre = StarPretrain(tiny_cfg(directions=1, cluster_size=2, decoder_dim=32, decoder_depth=2,
                                decoder_heads=2, images_per_sequence=2))
    model = segmenter()
    key = "blocks.2.mlp.fc1_x.weight"
    assert not torch.equal(model.backbone.backbone.state_dict()[key], pre.encoder.state_dict()[key])
    report = load_pretrained(model.backbone, pre.state_dict())
    assert torch.equal(model.backbone.backbone.state_dict()[key], pre.encoder.state_dict()[key])
    assert report.converted  # 1 direction widened to the segmenter's 2
    assert not [k for k in report.new if k.startswith("backbone.blocks.")]
    widened = "blocks.1.mixer.branches.{}.x_proj.weight"
    for branch in (0, 1):  # each direction of the segmenter starts from the causal branch
        assert torch.equal(model.backbone.backbone.state_dict()[widened.format(branch)],
                           pre.encoder.state_dict()[widened.format(0)])


def test_config_round_trip_rebuilds_the_same_model():
    model = segmenter(head="upernet", taps=(0, 1, 3), pyramid=(2.0, 1.0, 0.5), aux_tap=0)
    again = StarSegmenter.from_config_dict(model.config_dict())
    assert again.seg_cfg == model.seg_cfg and again.cfg == model.cfg
    assert again.load_state_dict(model.state_dict()) is not None  # same keys and shapes
    assert again.num_classes == K and model.cfg.dynamic_img_size and model.cfg.num_classes == 0
    assert SegmenterConfig.from_dict(SegmenterConfig().to_dict()) == SegmenterConfig()


def test_loss_ignores_255_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 6, 7)
    masks = torch.full((2, 6, 7), 255)
    masks[1, 3, 4] = 2
    pixels = masks.numel()  # the loss is a sum over valid pixels / all pixels (mmseg's default)
    one = F.cross_entropy(logits[1:, :, 3, 4], torch.tensor([2])) / pixels
    torch.testing.assert_close(segmentation_loss(logits, None, masks, 0.4), one)
    aux = torch.randn(2, K, 6, 7)
    with_aux = one + 0.4 * F.cross_entropy(aux[1:, :, 3, 4], torch.tensor([2])) / pixels
    torch.testing.assert_close(segmentation_loss(logits, aux, masks, 0.4), with_aux)
    assert segmentation_loss(logits, aux, torch.full((2, 6, 7), 255), 0.4) == 0  # not NaN


def test_image_size_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        segmenter()(torch.randn(1, 1, 30, 32))


@pytest.mark.parametrize("fields,message", [
    (dict(taps=(0, 1, 2, 9)), r"segment.taps=\(0, 1, 2, 9\); block indices are 0 to 3"),
    (dict(taps=(0, 1, 2)), "needs one scale per tap"),
    (dict(taps=(2, 1, 3, 0)), "blocks must increase"),
    (dict(pyramid=(4.0, 3.0)), "segment.pyramid"),
    (dict(pyramid=(1.0, 2.0)), "scales must decrease"),
    (dict(aux_tap=4), "segment.aux_tap=4"),
    (dict(head="fcn"), "segment.head='fcn'"),
    (dict(channels=0), "segment.channels=0"),
    (dict(dropout=1.0), "segment.dropout"),
])
def test_bad_config_is_one_clear_value_error(fields, message):
    with pytest.raises(ValueError, match=message):
        StarSegmenter(tiny_cfg(), K, SegmenterConfig(**fields))
    with pytest.raises(ValueError, match="segment.taps=None; a backbone of depth 2"):
        SegmenterConfig().resolved_taps(2)


def test_segmenter_runs_through_slide_flip_evaluation_under_bf16():
    from star_mamba.evaluation.segmentation import InferenceConfig, evaluate_segmentation
    model = segmenter()
    images, masks = torch.randn(1, 1, 40, 36), torch.randint(0, K, (1, 40, 36))
    out = evaluate_segmentation(model, [(images, masks)], torch.device("cpu"), torch.bfloat16, K,
                                255, InferenceConfig(mode="slide", flip=True), model.patch_size)
    assert 0 <= out["aAcc"] <= 100 and out["loss"] > 0 and len(out["per_class"]) == K
