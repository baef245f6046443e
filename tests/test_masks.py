import pytest
import torch

from sparsity.masks import (
    block_mask,
    conv_nm_mask,
    is_nm,
    linear_nm_mask,
    nm_mask,
    tile_mask,
    tile_scores,
    unstructured_mask,
    weight_is_nm,
)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (3, 16)])
def test_nm_mask_keeps_exactly_n_largest_per_group(n, m):
    torch.manual_seed(0)
    w = torch.randn(6, 4 * m)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    groups = mask.view(6, 4, m)
    assert (groups.sum(-1) == n).all()
    absg = w.abs().view(6, 4, m)
    kept_min = torch.where(groups, absg, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, absg).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_nm_mask_hand_example():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 9.0, 1.0, -1.5, 0.0]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, True, False, True, False]]
    assert nm_mask(w, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]


def test_row_and_col_grouping_differ_as_expected():
    torch.manual_seed(1)
    w = torch.randn(8, 8)
    row = linear_nm_mask(w, 2, 4, "row")
    col = linear_nm_mask(w, 2, 4, "col")
    assert (row.view(8, 2, 4).sum(-1) == 2).all()  # along the input dim
    assert (col.t().reshape(8, 2, 4).sum(-1) == 2).all()  # along the output dim
    assert torch.equal(col, linear_nm_mask(w.t().contiguous(), 2, 4, "row").t())
    assert not torch.equal(row, col)


def test_conv_groups_run_along_input_channels_not_taps():
    # Weight (O=1, I=4, 2, 2): at every tap the largest input channel differs; a grouping across taps would keep
    # whole channels instead.
    w = torch.zeros(1, 4, 2, 2)
    w[0, 0, 0, 0] = 5
    w[0, 1, 0, 1] = 5
    w[0, 2, 1, 0] = 5
    w[0, 3, 1, 1] = 5
    w += 0.01 * torch.arange(16.0).view(1, 4, 2, 2)
    mask = conv_nm_mask(w, 1, 4)
    assert mask.sum() == 4  # one kept per tap
    for (i, a, b) in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]:
        assert mask[0, i, a, b]
    # every (O, kh, kw) position keeps exactly one of the 4 input channels
    assert (mask.permute(0, 2, 3, 1).sum(-1) == 1).all()
    assert weight_is_nm(w * mask, 1, 4)


def test_is_nm_detects_violations_and_divisibility():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert is_nm(w, 2, 4)
    assert not is_nm(w, 1, 4)
    assert not is_nm(torch.ones(2, 6), 2, 4)  # 6 not divisible by 4


@pytest.mark.parametrize("bad", [(3, 2), (0, 4), (2, 0), (1.5, 4)])
def test_nm_mask_rejects_bad_patterns(bad):
    with pytest.raises(ValueError, match="N:M"):
        nm_mask(torch.ones(4, 4), *bad)


def test_unstructured_mask_exact_count_and_largest():
    torch.manual_seed(2)
    w = torch.randn(10, 10)
    mask = unstructured_mask(w, 0.9)
    assert int(mask.sum()) == 10
    assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_block_mask_whole_tiles():
    torch.manual_seed(3)
    w = torch.randn(16, 16)
    mask = block_mask(w, 0.75, 4)
    tiles = mask.view(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16)
    assert ((tiles.all(-1)) | (~tiles.any(-1))).all()  # constant within each tile
    assert int(tiles.all(-1).sum()) == 4  # 25 % of 16 tiles kept
    assert tile_mask(torch.arange(8.0), 0.5).tolist() == [False] * 4 + [True] * 4


def _tile_mask_by_sort(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The documented rule spelled out: rank by score (NaN as +inf, -0 as +0), ties to the lower index."""
    flat = torch.nan_to_num(scores.flatten(), nan=float("inf")) + 0.0  # + 0.0 turns -0 into +0
    keep = int(round((1 - sparsity) * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:keep]
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order] = True
    return out.view_as(scores)


def test_tile_mask_ties_go_to_the_lower_index_and_nan_ranks_highest():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("nan"), -0.0, 0.0, 3.0, -1.0])
    # keep 4: NaN, then the first three of the four 3.0s; the 3.0 at index 8 loses its tie
    assert tile_mask(s, 0.6).nonzero().flatten().tolist() == [1, 2, 4, 5]
    assert tile_mask(torch.tensor([-1.0, 0.0, -0.0, -2.0]), 0.75).nonzero().flatten().tolist() == [1]  # -0 == +0
    assert tile_mask(torch.tensor([-1.0, -0.0, 0.0, -2.0]), 0.75).nonzero().flatten().tolist() == [1]
    assert tile_mask(s, 0.0).all() and not tile_mask(s, 1.0).any()
    gen = torch.Generator().manual_seed(0)
    for shape, sparsity in [((7, 9), 0.5), ((3, 40), 0.9), ((64,), 0.25), ((5, 5), 0.04)]:
        few_values = torch.randint(0, 4, shape, generator=gen).float() - 1.5  # many ties
        for scores in (torch.randn(shape, generator=gen), few_values):
            got = tile_mask(scores, sparsity)
            assert torch.equal(got, _tile_mask_by_sort(scores, sparsity))
            assert int(got.sum()) == int(round((1 - sparsity) * scores.numel()))


def _nm_mask_by_sort(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """The documented N:M rule spelled out per group: rank by |w| (NaN as the largest), ties to the lower index."""
    x = w.movedim(dim, -1)
    out = torch.zeros(x.shape, dtype=torch.bool)
    groups, flat_out = x.reshape(-1, m), out.view(-1, m)
    for g in range(groups.shape[0]):
        mag = [float("inf") if v != v else abs(v) for v in groups[g].tolist()]
        for i in sorted(range(m), key=lambda i: (-mag[i], i))[:n]:
            flat_out[g, i] = True
    return out.movedim(-1, dim)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 8), (5, 16), (2, 32)])
def test_nm_mask_ties_go_to_the_lower_index(n, m, path, monkeypatch):
    # Magnitudes from a small set ({0, 1, 2} with both signs, and NaN): most groups hold ties across the keep
    # boundary, so a rule that kept the higher index, or ranked by signed value, gives other masks. Three layouts:
    # a Linear row (groups contiguous), a 3x3 conv (groups strided by 9 taps) and dim-0 grouping. m = 32 goes to
    # the stable-sort path of the torch implementation.
    from sparsity import native
    if path == "torch":
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_status", "disabled for this test")
    elif m > 8 or native.kernel() is None:  # the kernel takes m in {2, 4, 8}; the torch case covers the rest
        pytest.skip(f"no native kernel for m={m} here ({native.status()})")
    gen = torch.Generator().manual_seed(n * 100 + m)
    for shape, dim in [((6, 2 * m), 1), ((3, 2 * m, 3, 3), 1), ((2 * m, 5), 0)]:
        w = torch.randint(-2, 3, shape, generator=gen).float()
        w[(torch.rand(shape, generator=gen) < 0.05)] = float("nan")
        w[w == 0] = torch.where(torch.rand(int((w == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
        expected = _nm_mask_by_sort(w, n, m, dim)
        assert torch.equal(nm_mask(w, n, m, dim=dim), expected), (shape, dim)
    # the hand case: all equal, and equal magnitudes of opposite sign
    assert nm_mask(torch.ones(1, m), n, m).tolist() == [[True] * n + [False] * (m - n)]
    row = torch.tensor([[-1.0, 1.0] * (m // 2)])
    assert nm_mask(row, n, m).tolist() == [[True] * n + [False] * (m - n)]


def test_tile_scores_are_mean_magnitudes_over_the_tiles_weights():
    # tile 0 is uniformly 1; tile 1 has one large weight (mean 10 / 16) and would win on max |w|; the edge tile 2
    # (4 x 2 weights of a 4 x 10 view) averages over its 8 weights, not over a padded 16.
    w = torch.zeros(4, 10)
    w[:, :4] = 1.0
    w[0, 4] = -10.0
    w[:, 8:] = 0.75
    assert torch.allclose(tile_scores(w, 4), torch.tensor([[1.0, 0.625, 0.75]]))
    mask = block_mask(w, 0.5, 4)  # round(1.5) = 2 tiles kept: the two best means
    assert mask[:, :4].all() and not mask[:, 4:8].any() and mask[:, 8:].all()
