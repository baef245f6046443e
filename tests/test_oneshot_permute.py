"""Channel permutation (sparsity/permute.py) and the ``oneshot`` method: exactness, kept magnitude, frozen masks."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.models.resnet import Bottleneck
from torch import nn

import sparsity
from sparsity.masks import weight_is_nm, weight_nm_mask
from sparsity.permute import find_pairs, kept_magnitude, permute_model_, search_permutation

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10)


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial per-channel affine and running stats, so a wrongly permuted norm would show in the logits."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
            if mod.weight is not None:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)


# ---- search ------------------------------------------------------------------------------------------------------
def test_search_recovers_lost_magnitude_on_random_weights():
    g = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(3):
        w = torch.randn(256, 256, generator=g)
        perm, info = search_permutation(w, 2, 4, time_limit=20.0)
        assert sorted(perm.tolist()) == list(range(256))
        assert info["kept_after"] >= info["kept_before"]
        assert kept_magnitude(w, 2, 4, perm) == pytest.approx(info["kept_after"], rel=1e-9)
        assert kept_magnitude(w, 2, 4) == pytest.approx(info["kept_before"], rel=1e-9)
        shares.append((info["kept_after"] - info["kept_before"]) / (info["total"] - info["kept_before"]))
    mean = sum(shares) / len(shares)
    print(f"2:4 on random 256x256: mean share of lost magnitude recovered = {mean:.4f} "
          f"({[round(s, 4) for s in shares]})")
    assert mean > 0.0


def test_a_search_cut_by_its_time_limit_says_so(caplog):
    """A search that converges repeats exactly; one cut by the clock depends on the machine's load, so it is
    flagged per layer and warned about."""
    from sparsity.permute import permute_model_

    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))
    perm_a, done = search_permutation(w, 1, 8, time_limit=60.0, window=64)
    perm_b, again = search_permutation(w, 1, 8, time_limit=60.0, window=64)
    assert not done["hit_limit"] and torch.equal(perm_a, perm_b) and done["seconds"] < 60.0
    _, cut = search_permutation(w, 1, 8, time_limit=0.0, window=64)
    assert cut["hit_limit"] and cut["kept_after"] <= done["kept_after"]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    with caplog.at_level("INFO", logger="sparsity.permute"):
        rows = permute_model_(model, 1, 8, time_limit=0.0, window=64, only={"blocks.0.mlp.fc2"})
    assert [(r["consumer"], r["hit_limit"]) for r in rows] == [("blocks.0.mlp.fc2", True)]
    assert "stopped at the 0 s limit" in caplog.text
    assert ("permutation search stopped at its 0 s time limit for 1 layer(s) (blocks.0.mlp.fc2) before it converged"
            in caplog.text)


def test_search_conv_groups_along_input_channels():
    w = torch.randn(8, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    perm, info = search_permutation(w, 1, 4, time_limit=5.0)
    kept = float((w[:, perm].abs() * weight_nm_mask(w[:, perm], 1, 4)).sum())
    assert kept == pytest.approx(info["kept_after"], rel=1e-6)
    assert info["kept_after"] >= info["kept_before"]


def test_search_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        search_permutation(torch.randn(4, 10), 2, 4)


# ---- exactness on timm models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, pairs", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=2), 2),
    ("resnet18", {}, 8),
])
def test_permuting_dense_model_keeps_logits(name, kwargs, pairs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    rows = permute_model_(model, 2, 4, time_limit=0.5, window=64)
    with torch.no_grad():
        after = model(x)
    assert len(rows) == pairs
    assert all(r["status"] in ("permuted", "unchanged") for r in rows)
    assert sum(r["status"] == "permuted" for r in rows) >= 1
    for r in rows:
        assert r["kept_after"] >= r["kept_before"]
        cons = model.get_submodule(r["consumer"]).weight
        assert kept_magnitude(cons, 2, 4) == pytest.approx(r["kept_after"], rel=1e-6)
    assert (after - before).abs().max().item() < 1e-5


def test_grn_mlp_is_exact():
    """ConvNeXt-V2's GlobalResponseNorm between fc1 and fc2: channel mean is order-free, affine is permuted."""
    from timm.layers import GlobalResponseNormMlp

    torch.manual_seed(0)
    mlp = GlobalResponseNormMlp(16, 32, use_conv=False).eval()
    with torch.no_grad():
        mlp.grn.weight.normal_()
        mlp.grn.bias.normal_()
    model = nn.Sequential(mlp)
    x = torch.randn(2, 4, 4, 16)
    with torch.no_grad():
        before = model(x)
    rows = permute_model_(model, 1, 4, time_limit=1.0)
    with torch.no_grad():
        after = model(x)
    assert rows[0]["status"] == "permuted"
    assert (after - before).abs().max().item() < 1e-5


def test_unsafe_pairs_are_reported_not_touched():
    grouped = Bottleneck(64, 16, cardinality=2, base_width=64)  # conv2 grouped
    bn_mlp = Mlp(16, 32, norm_layer=nn.BatchNorm1d)
    model = nn.Sequential(grouped, bn_mlp)
    problems = {p.consumer: p.problem for p in find_pairs(model)}
    assert "grouped conv" in problems["0.conv2"]
    assert "grouped conv" in problems["0.conv3"]
    assert "BatchNorm1d" in problems["1.fc2"]
    w = model[1].fc2.weight.clone()
    rows = permute_model_(model, 2, 4, time_limit=0.5)
    assert all(r["status"].startswith("skipped") for r in rows)
    assert torch.equal(model[1].fc2.weight, w)


# ---- oneshot --------------------------------------------------------------------------------------------------------
def _oneshot_vit(permute: bool, total: int = 20):
    torch.manual_seed(0)
    model = _tiny_vit()
    recipe = sparsity.recipe_from_dict({
        "method": "oneshot", "permute": permute, "permute_time_limit": 0.5,
        "rules": [{"target": "ff", "n": 2, "m": 4}, {"target": ["q", "k", "v"], "n": 1, "m": 4}],
    })
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=total, steps_per_epoch=10)
    return model, recipe, ctl


def test_oneshot_masks_are_magnitude_nm_and_pruned_weights_stay_zero_under_adam():
    model, _, ctl = _oneshot_vit(permute=False)
    dense = {fqn: layer.weight.detach().clone() for fqn, layer in ctl.layers}
    ctl.step(0)
    for fqn, layer in ctl.layers:
        for s in layer.slices:
            expect = weight_nm_mask(dense[fqn][s.start:s.stop], s.n, s.m)
            assert torch.equal(layer.weight_mask[s.start:s.stop], expect)
            assert weight_is_nm(layer.weight[s.start:s.stop], s.n, s.m)
    masks = {fqn: layer.weight_mask.clone() for fqn, layer in ctl.layers}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for step in range(1, 5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for _, layer in ctl.layers:
            assert torch.all(layer.weight.grad[~layer.weight_mask] == 0)  # g * E
        opt.step()
        ctl.step(step)
        for fqn, layer in ctl.layers:
            assert torch.equal(layer.weight_mask, masks[fqn])  # frozen
            assert torch.all(layer.weight[~layer.weight_mask] == 0)  # exactly zero
    # something that revives a pruned weight (e.g. stale momentum) is undone at the next step
    layer = ctl.layers[0][1]
    with torch.no_grad():
        layer.weight[~layer.weight_mask] = 1.0
    ctl.step(5)
    assert torch.all(layer.weight[~layer.weight_mask] == 0)


def test_oneshot_permute_then_resume_does_not_redo():
    model, recipe, ctl = _oneshot_vit(permute=True)
    dense_kept = {fqn: kept_magnitude(layer.weight, layer.slices[0].n, layer.slices[0].m)
                  for fqn, layer in ctl.layers if fqn.endswith("fc2")}
    ctl.step(0)
    report = ctl.method.permute_report
    assert [r["consumer"] for r in report] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    for r in report:
        assert r["kept_after"] >= r["kept_before"] == pytest.approx(dense_kept[r["consumer"]], rel=1e-6)
        layer = model.get_submodule(r["consumer"])
        kept = float((layer.weight.detach().abs() * layer.weight_mask).sum())
        assert kept == pytest.approx(r["kept_after"], rel=1e-5)
    assert ctl.metrics()["permute_recovered"] >= 0.0
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "ctl": ctl.state_dict()}

    model2, _, ctl2 = _oneshot_vit(permute=True)
    model2.load_state_dict(state["model"])
    ctl2.load_state_dict(state["ctl"])
    layer = model2.get_submodule("blocks.0.mlp.fc2")
    with torch.no_grad():  # a recomputed mask would now differ: the first kept weight becomes the smallest
        idx = layer.weight_mask.nonzero()[0]
        layer.weight[tuple(idx)] = 1e-12
    ctl2.step(3)
    for (fqn, a), (_, b) in zip(ctl.layers, ctl2.layers):
        assert torch.equal(a.weight_mask, b.weight_mask), fqn
    assert torch.equal(model2.get_submodule("blocks.0.mlp.fc1").weight,
                       model.get_submodule("blocks.0.mlp.fc1").weight)  # not permuted again


def test_oneshot_recipe_errors():
    with pytest.raises(sparsity.RecipeError, match="needs n and m"):
        sparsity.recipe_from_dict({"method": "oneshot", "rules": [{"target": "ff"}]})
    with pytest.raises(sparsity.RecipeError, match="permute_time_limit"):
        sparsity.recipe_from_dict({"method": "oneshot", "permute_timelimit": 3,
                                   "rules": [{"target": "ff", "n": 2, "m": 4}]})
    with pytest.raises(sparsity.RecipeError, match="must be >= 0"):
        sparsity.recipe_from_dict({"method": "oneshot", "permute_time_limit": -1.0,
                                   "rules": [{"target": "ff", "n": 2, "m": 4}]})
    with pytest.raises(sparsity.RecipeError, match="does not apply to method 'oneshot'"):
        sparsity.recipe_from_dict({"method": "oneshot", "finetune_fraction": 0.2,
                                   "rules": [{"target": "ff", "n": 2, "m": 4}]})
