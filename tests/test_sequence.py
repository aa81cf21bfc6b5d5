"""Pure sequence functions: permutations, separators, layouts, masks."""
import pytest
import torch

from star_mamba import sequence as seq
from star_mamba.config import SEPARATOR_POSITIONS, StarConfig


def test_patchify_round_trip_and_patch_content():
    images = torch.randn(3, 2, 12, 8)
    patches = seq.patchify(images, 4)  # (3, 6, 32)
    assert patches.shape == (3, 6, 4 * 4 * 2)
    # patch (row 1, col 1) holds pixels [4:8, 4:8] in (p, p, C) order
    expected = images[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[0, 1 * 2 + 1], expected, rtol=0, atol=0)
    back = seq.unpatchify(patches, 4, (3, 2), 2)
    assert torch.equal(back, images)


def test_patchify_rejects_indivisible_image():
    with pytest.raises(ValueError, match="patch_size=5"):
        seq.patchify(torch.zeros(1, 3, 12, 12), 5)


@pytest.mark.parametrize("grid,c", [((4, 4), 2), ((6, 6), 3), ((4, 8), 2), ((12, 12), 4), ((3, 3), 1)])
def test_cluster_order_matches_spec_formula_and_round_trips(grid, c):
    h, w = grid
    order = seq.cluster_order(grid, c)
    assert sorted(order.tolist()) == list(range(h * w))  # a permutation
    gw = w // c
    for k in range(h * w):
        q, j = divmod(k, c * c)
        row, col = (q // gw) * c + j // c, (q % gw) * c + j % c
        assert order[k] == row * w + col
    inv = seq.inverse_order(order)
    x = torch.randn(2, h * w, 3)
    assert torch.equal(x[:, order][:, inv], x)
    assert torch.equal(x[:, inv][:, order], x)


def test_cluster_order_groups_each_cluster_contiguously():
    order = seq.cluster_order((4, 4), 2)
    # first cluster: rows 0-1, cols 0-1 in raster order; second: rows 0-1, cols 2-3
    assert order[:4].tolist() == [0, 1, 4, 5]
    assert order[4:8].tolist() == [2, 3, 6, 7]
    assert order[8:12].tolist() == [8, 9, 12, 13]


def test_direction_orders_are_the_four_scans():
    fwd, rev, tr, tr_rev = seq.direction_orders((2, 3), 4)
    assert fwd.tolist() == [0, 1, 2, 3, 4, 5]
    assert rev.tolist() == [5, 4, 3, 2, 1, 0]
    assert tr.tolist() == [0, 3, 1, 4, 2, 5]
    assert tr_rev.tolist() == [5, 2, 4, 1, 3, 0]
    assert len(seq.direction_orders((2, 3), 2)) == 2


@pytest.mark.parametrize("cls_index", [0, 3, 6])
def test_direction_orders_keep_class_token_slot(cls_index):
    orders = seq.direction_orders((2, 3), 4, class_token_index=cls_index)
    for o in orders:
        assert sorted(o.tolist()) == list(range(7))
    fwd, _, tr, _ = orders
    assert fwd.tolist() == list(range(7))
    assert tr[cls_index] == cls_index  # the class token keeps its place in the transposed scan
    patches = [i for i in tr.tolist() if i != cls_index]
    unshift = [i - (i > cls_index) for i in patches]
    assert unshift == [0, 3, 1, 4, 2, 5]


def test_identity_separator_content():
    sep = seq.separator_patches("identity", 4, 12)  # (16, 12)
    assert sep.shape == (16, 12)
    for k in range(16):
        row, col = divmod(k, 4)
        assert torch.all(sep[k] == (1.0 if row == col else 0.0))
    assert sep.sum() == 4 * 12
    assert torch.all(seq.separator_patches("zeros", 2, 3) == 0)
    assert torch.all(seq.separator_patches("ones", 2, 3) == 1)
    with pytest.raises(ValueError, match="'bogus'"):
        seq.separator_patches("bogus", 2, 3)


@pytest.mark.parametrize("position", SEPARATOR_POSITIONS + ("none",))
@pytest.mark.parametrize("K", [1, 2, 4])
def test_layout_counts_and_positions(position, K):
    G = 4
    has_sep = position != "none"
    pos = position if has_sep else "SC"
    cfg = StarConfig(img_size=16, patch_size=2, cluster_size=4, images_per_sequence=K,
                     separator="identity" if has_sep else "none", separator_position=pos)
    assert cfg.clusters_per_image == G
    # pack segment ids: image k cluster g -> 100 * k + g, separator -> -1
    ids = torch.tensor([[100 * k + g for g in range(G)] for k in range(2 * K)]).float()  # (2K, G)
    layout = seq.segment_layout(G, pos, has_sep)
    packed = seq.pack_segments(ids, torch.tensor(-1.0) if has_sep else None, K, layout)
    assert packed.shape == (2, cfg.num_segments)
    n_sep = (packed[0] == -1).sum().item()
    expected_sep = {"SC": K, "CS": K, "SCS": K * G, "CSC": K * G, "none": 0}[position]
    assert n_sep == expected_sep
    assert cfg.num_segments == K * G + expected_sep
    mask = seq.separator_segment_mask(G, pos, has_sep, K)
    assert torch.equal(mask, packed[0] == -1)
    for b in range(2):
        for k in range(K):
            for g in range(G):
                t = seq.cluster_segment_index(k, g, G, pos, has_sep)
                assert packed[b, t] == 100 * (b * K + k) + g
    first = packed[0, 0].item()
    assert (first == -1) == (position in ("SC", "SCS"))
    last = packed[0, -1].item()
    assert (last == -1) == (position in ("CS", "CSC"))


def test_sc_segment_index_formula():
    G = 9
    for k in range(4):
        for g in range(G):
            assert seq.cluster_segment_index(k, g, G, "SC") == k * (G + 1) + 1 + g
            assert seq.cluster_segment_index(k, g, G, "CS") == k * (G + 1) + g
            assert seq.cluster_segment_index(k, g, G, "SCS") == k * 2 * G + 2 * g + 1
            assert seq.cluster_segment_index(k, g, G, "CSC") == k * 2 * G + 2 * g


def test_pack_rejects_batch_not_divisible_by_k():
    with pytest.raises(ValueError, match="images_per_sequence=4"):
        seq.pack_segments(torch.zeros(6, 2, 3), None, 4, [0, 1])


def test_block_causal_mask():
    m = seq.block_causal_mask(3, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_normalize_patches():
    x = torch.randn(5, 48) * 3 + 2
    y = seq.normalize_patches(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert torch.all(seq.normalize_patches(torch.ones(2, 8)) == 0)  # constant patches -> 0
