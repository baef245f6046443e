"""``gmp``: cubic schedule, magnitude masks (unstructured and tiles), frozen pruned weights, RMSI, recipe errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsity
from sparsity.masks import block_mask, unstructured_mask
from sparsity.schedules import cubic_sparsity

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _build(block: dict, total: int = 100):
    torch.manual_seed(0)
    model = _Net()
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    return model, recipe, sparsity.SparsityController(model, recipe, total_steps=total, steps_per_epoch=10)


def _train_step(model, opt):
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_cubic_schedule_and_unstructured_masks():
    block = {"method": "gmp", "final_sparsity": 0.9, "init_sparsity": 0.1, "start_fraction": 0.1,
             "end_fraction": 0.6, "update_interval": 10, "rules": [{"target": ["re:fc[12]", "conv"]}]}
    model, _, ctl = _build(block)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checked = {}
    for t in range(70):
        before = {fqn: layer.weight.detach().clone() for fqn, layer in ctl.layers}
        prev_masks = {fqn: layer.weight_mask.clone() for fqn, layer in ctl.layers}
        ctl.step(t)
        if t in (0, 10, 20, 35, 40, 60, 65):
            s = cubic_sparsity(t, 10, 60, 0.1, 0.9)
            for fqn, layer in ctl.layers:
                if t in (35, 65):  # between updates (or after the end): mask unchanged
                    assert torch.equal(layer.weight_mask, prev_masks[fqn])
                    continue
                assert torch.equal(layer.weight_mask, unstructured_mask(before[fqn], s)), (t, fqn)
                density = layer.weight_mask.float().mean().item()
                assert abs(density - (1 - s)) <= 1.0 / layer.weight.numel()
                assert torch.all(layer.weight[~layer.weight_mask] == 0)
            checked[t] = s
        _train_step(model, opt)
    assert checked[0] == pytest.approx(0.1) and checked[60] == pytest.approx(0.9)
    assert checked[10] == pytest.approx(0.1)
    assert checked[20] == pytest.approx(0.9 - 0.8 * 0.8**3)
    assert checked[40] == pytest.approx(0.9 - 0.8 * 0.4**3)
    assert ctl.metrics()["target_sparsity"] == pytest.approx(0.9)
    assert ctl.metrics()["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_updates_count_from_the_ramp_start_and_the_end_is_always_an_update():
    # start 13, end 58, interval 10: the first step takes masks, then every 10 steps from 13 (not at the global
    # multiples of 10) and once more at 58, where the ramp ends off the interval; nothing after it.
    block = {"method": "gmp", "final_sparsity": 0.8, "init_sparsity": 0.0, "start_fraction": 0.13,
             "end_fraction": 0.58, "update_interval": 10, "rules": [{"target": ["re:fc[12]", "conv"]}]}
    model, _, ctl = _build(block)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    updates, phases = [], {}
    for t in range(75):
        ctl.step(t)
        if ctl.method.last_update == t:
            updates.append(t)
        phases[t] = ctl.metrics()["phase"]  # summary.csv's column
        _train_step(model, opt)
    assert updates == [0, 13, 23, 33, 43, 53, 58]
    assert [phases[t] for t in (0, 12, 13, 57, 58, 74)] == ["dense"] * 2 + ["ramp"] * 2 + ["finetune"] * 2
    assert ctl.metrics()["target_sparsity"] == pytest.approx(0.8)
    assert cubic_sparsity(58, 13, 58, 0.0, 0.8) == pytest.approx(0.8)


def test_block_pattern_and_rule_overrides():
    block = {"method": "gmp", "final_sparsity": 0.5, "tile": 8, "update_interval": 5, "end_fraction": 0.5,
             "rules": [{"target": "re:fc2", "sparsity": 0.75, "tile": 4}, {"target": "re:fc1"}]}
    model, _, ctl = _build(block, total=40)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(25):
        before = {fqn: layer.weight.detach().clone() for fqn, layer in ctl.layers}
        ctl.step(t)
        if t in (5, 20):
            for fqn, layer in ctl.layers:
                spec = layer.slices[0]
                s = cubic_sparsity(t, 0, 20, 0.0, spec.sparsity)
                assert torch.equal(layer.weight_mask, block_mask(before[fqn], s, spec.tile)), (t, fqn)
        _train_step(model, opt)
    fc1, fc2 = model.fc1, model.fc2
    assert (fc1.slices[0].sparsity, fc1.slices[0].tile) == (0.5, 8)
    assert (fc2.slices[0].sparsity, fc2.slices[0].tile) == (0.75, 4)
    tiles = fc2.weight_mask.reshape(16, 4, 16, 4).permute(0, 2, 1, 3).reshape(16, 16, 16)
    assert torch.all(tiles.all(-1) | ~tiles.any(-1))  # whole tiles kept or pruned
    rows = {r["fqn"]: r for r in sparsity.sparsity_report(model)}
    assert rows["fc2"]["conforms"] is True and rows["fc2"]["density"] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("seed", range(4))
def test_masks_are_nested_under_momentum(seed):
    """A weight once pruned stays pruned: the next update ranks the weights after the revived ones (momentum moves
    them during the optimizer step) are zeroed again, so it never brings one back."""
    block = {"method": "gmp", "final_sparsity": 0.9, "init_sparsity": 0.3, "update_interval": 2, "end_fraction": 0.8,
             "rules": [{"target": "linear"}]}
    model, _, ctl = _build(block, total=30)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    torch.manual_seed(seed)
    prev = None
    for t in range(26):
        ctl.step(t)
        masks = [layer.weight_mask.clone() for _, layer in ctl.layers]
        if prev is not None:
            for old, new in zip(prev, masks):
                assert not torch.any(new & ~old), t  # nothing pruned before is kept now
        prev = masks
        _train_step(model, opt)


def test_resume_is_exact_and_finalize_reaches_final():
    block = {"method": "gmp", "final_sparsity": 0.8, "update_interval": 3, "end_fraction": 0.8,
             "rules": [{"target": "linear"}]}

    def run(stop_at=None, state=None):
        model, _, ctl = _build(block, total=30)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            ctl.load_state_dict(state["ctl"])
            start = state["step"]
        for t in range(start, 20):
            if t == stop_at:
                return {"model": {k: v.clone() for k, v in model.state_dict().items()},
                        "opt": opt.state_dict(), "ctl": ctl.state_dict(), "step": t}
            ctl.step(t)
            torch.manual_seed(100 + t)
            _train_step(model, opt)
        return model, ctl

    ref, _ = run()
    resumed, ctl = run(state=run(stop_at=7))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    ctl.finalize()  # training stopped at step 20 < end (24): finalize prunes to the final sparsity
    for _, layer in ctl.layers:
        assert layer.weight_mask.float().mean().item() == pytest.approx(0.2, abs=1e-3)
        assert torch.all(layer.weight[~layer.weight_mask] == 0)


def test_rmsi_per_layer_type():
    block = {"method": "gmp", "final_sparsity": 0.5, "rules": [{"target": ["conv", "re:fc1"]}]}
    model, _, ctl = _build(block)
    ctl.step(0)
    ctl.metrics()  # resets the snapshot
    with torch.no_grad():
        model.fc1.weight.add_(0.5)
        model.conv.weight.add_(-0.25)
    m = ctl.metrics()
    assert m["rmsi_linear"] == pytest.approx(0.5, rel=1e-5)
    assert m["rmsi_conv"] == pytest.approx(0.25, rel=1e-5)
    assert ctl.metrics()["rmsi_linear"] == 0.0
    assert not math.isnan(m["target_sparsity"])


@pytest.mark.parametrize("block, match", [
    ({"method": "gmp", "rules": [{"target": "linear"}]}, "has no sparsity: set 'sparsity.final_sparsity'"),
    ({"method": "gmp", "final_sparsity": 0.5, "rules": [{"target": "linear", "n": 2, "m": 4}]}, "gives n/m"),
    ({"method": "gmp", "final_sparsity": 0.5, "start_fraction": 0.5, "end_fraction": 0.5,
      "rules": [{"target": "linear"}]}, "must be greater than start_fraction"),
    ({"method": "gmp", "final_sparsity": 1.5, "rules": [{"target": "linear"}]}, "final_sparsity' must be in"),
    ({"method": "gmp", "final_sparsity": 0.2, "init_sparsity": 0.5, "rules": [{"target": "linear"}]},
     "below init_sparsity"),
    ({"method": "gmp", "final_sparsity": 0.5, "update_interval": 0, "rules": [{"target": "linear"}]}, "must be >= 1"),
    ({"method": "gmp", "final_sparsity": 0.5, "final_sparsty": 0.5}, "did you mean 'final_sparsity'"),
    ({"method": "gmp", "final_sparsity": 0.5, "dense_fraction": 0.1, "rules": [{"target": "linear"}]},
     "use start_fraction and end_fraction"),
])
def test_recipe_errors(block, match):
    with pytest.raises(sparsity.RecipeError, match=match):
        sparsity.recipe_from_dict(block)
