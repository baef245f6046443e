"""``usd``: ERK budgets, the 75 % step-down rule, the weight penalty, the search, scheme.yaml round trip, resume."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from torch import nn

import sparsity
from sparsity.masks import weight_is_nm, weight_nm_mask
from sparsity.methods.usd import allowed_n, erk_densities, next_n

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """Layers of different shapes, so ERK gives them different budgets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 128)
        self.fc4 = nn.Linear(128, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = torch.relu(fc(x))
        return self.head(x)


SEARCH = {"method": "usd", "m": 16, "target_sparsity": 0.8, "update_interval": 5, "finetune_epochs": 1,
          "rules": [{"target": "re:fc[1-4]"}]}
TOTAL, PER_EPOCH = 300, 50


def _build(block: dict, total: int = TOTAL, seed: int = 0):
    torch.manual_seed(seed)
    model = _Net()
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    return model, recipe, sparsity.SparsityController(model, recipe, total_steps=total, steps_per_epoch=PER_EPOCH)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 32, generator=g)
    return x, x[:, :10].argmax(1)


def _train(model, ctl, opt, start: int, stop: int) -> None:
    x, y = _data()
    for t in range(start, stop):
        ctl.step(t)
        idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(t))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ctl.step(stop)


# ---- pure helpers ---------------------------------------------------------------------------------------------------
def test_allowed_values_and_erk():
    assert allowed_n(16) == [16, 8, 4, 2, 1]
    assert allowed_n(12) == [12, 8, 4, 2, 1]
    assert next_n(16, 16) == 8 and next_n(1, 16) == 1
    shapes = [(256, 32), (256, 256), (16, 128)]
    d = erk_densities(shapes, 0.2)
    numel = [a * b for a, b in shapes]
    assert sum(x * n for x, n in zip(d, numel)) / sum(numel) == pytest.approx(0.2)
    assert d[2] > d[0] > d[1]  # fewer parameters per (fan-in + fan-out): denser
    assert erk_densities(shapes, 0.9)[2] == 1.0  # capped at dense; the others absorb the rest


def _one_layer(erk_value: float, **extra):
    """Linear(4, 4) with m = 4: one group per row; rows 0 and 1 hold the largest weights."""
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[10.0, 9.0, 8.0, 7.0], [6.0, 5.5, 0.4, 0.3],
                                            [0.9, 0.8, 0.2, 0.1], [0.7, 0.6, 0.5, 0.05]]))
    block = {"method": "usd", "m": 4, "target_sparsity": 0.5, "erk_value": erk_value, "update_interval": 1,
             "finetune_epochs": 0, "rules": [{"target": "linear"}], **extra}
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    return model, sparsity.SparsityController(model, recipe, total_steps=10, steps_per_epoch=10)


def test_step_down_needs_75_percent_of_groups_below_n():
    # keep 6 of 16 (erk_value 0.625): survivors per row 4, 2, 0, 0 -> 3 of 4 groups have < 4 -> N: 4 -> 2
    model, ctl = _one_layer(0.625)
    ctl.step(0)
    assert ctl.method.n == {"0": 2}
    assert model[0].slices[0].n == 2 and weight_is_nm(model[0].sparse_weight(), 2, 4)
    assert ctl.method.done and ctl.method.stop_reason == "target reached"
    model, ctl = _one_layer(0.3125)  # keep 11: survivors 4, 2, 2, 3 -> rows 1-3 below 4 (75 %) -> step
    ctl.step(0)
    assert ctl.method.n == {"0": 2}
    model, ctl = _one_layer(0.125)  # keep 14: survivors 4, 4, 3, 3 -> 2 of 4 below -> stays at 4
    ctl.step(0)
    assert ctl.method.n == {"0": 4} and not ctl.method.done
    assert model[0].weight_mask.all()


def _rows_layer(rows: int, big: int, keep: int, tie_rows: int = 0):
    """Linear(4, rows), m = 4 (one group per row): ``big`` rows of large weights, ``tie_rows`` rows of exactly 1.0,
    the rest small and distinct; the unstructured budget keeps ``keep`` of the ``4 * rows`` weights."""
    model = nn.Sequential(nn.Linear(4, rows))
    w = 1e-3 * torch.arange(1.0, 4 * rows + 1).view(rows, 4)
    w[:big] += 10.0
    w[big:big + tie_rows] = 1.0
    with torch.no_grad():
        model[0].weight.copy_(w)
    block = {"method": "usd", "m": 4, "target_sparsity": 0.5, "erk_value": 1.0 - keep / (4 * rows),
             "update_interval": 1, "finetune_epochs": 0, "rules": [{"target": "linear"}]}
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10, steps_per_epoch=10)
    ctl.step(0)
    return ctl.method


def test_the_75_percent_rule_at_its_boundary():
    # 3 full rows survive the threshold; the share of groups with fewer than N = 4 survivors is the rest:
    assert _rows_layer(rows=10, big=3, keep=12).n == {"0": 4}  # 7 of 10 = 70 %: stays
    assert _rows_layer(rows=11, big=3, keep=12).n == {"0": 4}  # 8 of 11 = 72.7 %: stays
    assert _rows_layer(rows=12, big=3, keep=12).n == {"0": 2}  # 9 of 12 = 75 %: steps down
    assert _rows_layer(rows=13, big=3, keep=12).n == {"0": 2}  # 10 of 13 = 77 %: steps down


def test_weights_equal_to_the_threshold_survive_it():
    # keep 5 of 16: tau is the 5th largest |w|, 1.0, held by all of rows 1 to 3; they survive (|w| >= tau), so
    # no group is below N and N stays at 4 (counting |w| > tau would leave 3 of 4 rows empty: a step-down)
    method = _rows_layer(rows=4, big=1, keep=5, tie_rows=3)
    assert method.tau["0"] == 1.0 and method.n == {"0": 4}


def test_penalty_factor_mixes_the_remaining_budget_and_the_flops_share():
    # Two units with erk_value 0.625 (final budget d* = 0.375 each): fc "0" (16 weights) steps down to 2:4, so
    # r = (2/4 - 0.375) / (1 - 0.375) = 0.2, and its FLOPs share is 16 / 32 (parameter counts before a forward);
    # fc "1" (32 weights, 3 of 8 rows full: 62.5 % below N) stays at 4:4 with r = 1 and share 1.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 8))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[10.0, 9.0, 8.0, 7.0], [6.0, 5.5, 0.4, 0.3],
                                            [0.9, 0.8, 0.2, 0.1], [0.7, 0.6, 0.5, 0.05]]))
        w = 0.01 * torch.arange(1.0, 33.0).view(8, 4)
        w[:3] += 20.0
        model[1].weight.copy_(w)
    block = {"method": "usd", "m": 4, "target_sparsity": 0.7, "erk_value": 0.625, "update_interval": 1,
             "penalty": 0.1, "finetune_epochs": 0, "rules": [{"target": "linear"}]}
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10, steps_per_epoch=10)
    ctl.step(0)
    assert ctl.method.n == {"0": 2, "1": 4} and not ctl.method.done
    assert ctl.method.coef["0"] == pytest.approx(0.1 * 0.5 * (0.2 + 0.5))
    assert ctl.method.coef["1"] == pytest.approx(0.1 * 0.5 * (1.0 + 1.0))


def test_gradient_is_masked_plus_penalty_below_threshold():
    model, ctl = _one_layer(0.125, penalty=0.1)  # no step-down: N = M, E all ones, penalty on
    ctl.step(0)
    layer = model[0]
    tau = ctl.method.tau["0"]
    assert tau == pytest.approx(0.2)  # the 14th largest |w| of 16
    coef = ctl.method.coef["0"]
    # single unit: FLOPs share 1; remaining budget r = (N/M - d*) / (1 - d*) = 1 -> f = 1
    assert coef == pytest.approx(0.1 * 0.5 * (1.0 + 1.0))
    x = torch.randn(3, 4)
    w = layer.weight.detach().clone()
    out = layer(x)
    out.sum().backward()
    g = torch.ones(3, 4).T @ x  # dL/dW~ for L = sum(W~ x + b)
    expect = g * layer.weight_mask + coef * w * (w.abs() < tau)
    assert torch.allclose(layer.weight.grad, expect, atol=1e-6)
    assert (w.abs() < tau).sum() == 2  # 0.1 and 0.05 are pulled toward zero


def test_penalty_is_scaled_with_the_loss_under_a_grad_scaler():
    """fp16 AMP: the penalty is added times the loss scale, so after unscale_ the gradient is the fp32 one."""
    model, ctl = _one_layer(0.125, penalty=0.1)
    ctl.step(0)
    layer = model[0]
    x = torch.randn(3, 4)
    layer(x).sum().backward()
    want = layer.weight.grad.clone()
    layer.weight.grad = None
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    scaled = scaler.scale(layer(x).sum())
    with sparsity.loss_scale(scaler):
        scaled.backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    assert bool((want != 0).any()) and torch.allclose(layer.weight.grad, want, atol=1e-6)


def test_search_reaches_target_and_scheme_round_trips(tmp_path, caplog):
    model, _, ctl = _build(SEARCH)
    ctl.method.output_dir = str(tmp_path)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="sparsity"):
        _train(model, ctl, opt, 0, TOTAL)
        ctl.finalize()
        ctl.on_train_end(str(tmp_path))
    assert caplog.text.count("usd: scheme written to") == 1  # when the search stopped; not again at the end
    method = ctl.method
    assert method.done and method.stop_reason == "target reached"
    assert method.stop_step < TOTAL - PER_EPOCH  # stopped inside the search window
    assert abs(method.scheme_sparsity() - 0.8) <= 0.01
    assert abs(ctl.metrics()["sparsity"] - 0.8) <= 0.01  # zeros actually in the forward weights
    ns = {k: n for k, n in method.n.items()}
    assert len(set(ns.values())) > 1, ns  # the layers differ
    for fqn, layer in ctl.layers:
        assert layer.slices[0].n == ns[fqn]
        assert weight_is_nm(layer.sparse_weight(), ns[fqn], 16)
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
    doc = yaml.safe_load((tmp_path / "scheme.yaml").read_text())
    assert {k: v["n"] for k, v in doc["layers"].items()} == ns
    assert all(v["m"] == 16 and v["density"] == v["n"] / 16 for v in doc["layers"].values())

    # a fixed-scheme recipe trains (or fine-tunes) with that scheme directly; its masks match
    fixed = {"method": "usd", "scheme": str(tmp_path / "scheme.yaml"), "rules": [{"target": "re:fc[1-4]"}]}
    model2, _, ctl2 = _build(fixed, seed=1)
    assert {fqn: layer.slices[0].n for fqn, layer in ctl2.layers} == ns
    model2.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("weight_mask")},
                           strict=False)
    ctl2.step(0)
    for (fqn, a), (_, b) in zip(ctl.layers, ctl2.layers):
        assert torch.equal(a.weight_mask, b.weight_mask), fqn
    assert ctl2.metrics()["phase"] == "finetune"

    # a checkpoint of the search run rebuilds its slices from the masks (validate/export without controller)
    model3, _, _ = _build(SEARCH, seed=2)
    model3.load_state_dict(model.state_dict())
    assert {fqn: model3.get_submodule(fqn).slices[0].n for fqn in ns} == ns


def test_resume_mid_search_is_exact():
    def fresh():
        model, _, ctl = _build(SEARCH)
        return model, ctl, torch.optim.Adam(model.parameters(), lr=1e-3)

    ref, ref_ctl, ref_opt = fresh()
    _train(ref, ref_ctl, ref_opt, 0, 160)

    model, ctl, opt = fresh()
    _train(model, ctl, opt, 0, 62)  # stop between two updates, mid-search
    assert not ctl.method.done
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "ctl": ctl.state_dict(),
             "opt": opt.state_dict()}
    model2, ctl2, opt2 = fresh()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    ctl2.load_state_dict(state["ctl"])
    _train(model2, ctl2, opt2, 62, 160)
    assert ctl2.method.n == ref_ctl.method.n and ctl2.method.stop_step == ref_ctl.method.stop_step
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_ema_sync_copies_masks_and_slices():
    model, _, ctl = _build(SEARCH)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, ctl, opt, 0, 120)
    ema, _, _ = _build(SEARCH, seed=3)
    ctl.sync(ema)
    for fqn, layer in ctl.layers:
        other = ema.get_submodule(fqn)
        assert torch.equal(other.weight_mask, layer.weight_mask)
        assert other.slices == layer.slices
        assert other.usd_penalize == layer.usd_penalize


@pytest.mark.parametrize("block, match", [
    ({"method": "usd", "rules": [{"target": "linear"}]}, "target_sparsity' in the recipe is required"),
    ({"method": "usd", "target_sparsity": 0.97, "rules": [{"target": "linear"}]}, "above what N:M with m=16"),
    ({"method": "usd", "target_sparsity": 0.5, "rules": [{"target": "linear", "n": 2, "m": 4}]},
     "usd searches N per layer"),
    ({"method": "usd", "target_sparsity": 0.5, "erk_value": 1.5, "rules": [{"target": "linear"}]},
     "erk_value' must be in"),
    ({"method": "usd", "target_sparsity": 0.5, "iter_update_erk": 10}, "did you mean 'update_interval'"),
    ({"method": "usd", "scheme": "/nonexistent/scheme.yaml", "rules": [{"target": "linear"}]}, "does not exist"),
    ({"method": "usd", "target_sparsity": 0.5, "finetune_fraction": 0.1, "rules": [{"target": "linear"}]},
     "does not apply to method 'usd'"),
])
def test_recipe_errors(block, match):
    with pytest.raises(sparsity.RecipeError, match=match):
        sparsity.recipe_from_dict(block)


def test_scheme_and_window_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers:\n  fc1: {n: 5, m: 4}\n")
    with pytest.raises(sparsity.RecipeError, match="1 <= n <= m"):
        sparsity.recipe_from_dict({"method": "usd", "scheme": str(bad), "rules": [{"target": "linear"}]})
    partial = tmp_path / "partial.yaml"
    partial.write_text("layers:\n  fc1: {n: 4, m: 16}\n")
    with pytest.raises(sparsity.RecipeError, match="not in the scheme, e.g. 'fc2'"):
        _build({"method": "usd", "scheme": str(partial), "rules": [{"target": "re:fc[1-4]"}]})
    with pytest.raises(sparsity.RecipeError, match="leaves no steps for the search"):
        _build({**SEARCH, "finetune_epochs": 6})
    assert weight_nm_mask(torch.ones(2, 16), 16, 16).all()
