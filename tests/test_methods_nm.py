"""Each N:M method's forward and gradient against DESIGN.md section 4, on small tensors."""

import math

import pytest
import torch
from torch import nn

import sparsity
from sparsity.masks import nm_mask


def _layer(method: str, seed: int = 0, **opts):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 4))
    recipe = sparsity.recipe_from_dict({"method": method, "rules": [{"target": "linear", "n": 2, "m": 4}], **opts})
    sparsity.sparsify_(model, recipe)
    return model, recipe


def _grad(model, x):
    model.zero_grad()
    out = model(x)
    out.backward(torch.ones_like(out))
    return out, model.fc.weight.grad.clone()


def _expected(w, x, d, b):
    # y = x @ (W * D)^T + b; dL/dW~ with L = sum(y) is ones^T x
    return x @ (w * d).t() + b, torch.ones(x.shape[0], w.shape[0]).t() @ x


@pytest.mark.parametrize("method", ["ste", "srste"])
def test_ste_and_srste(method):
    model, recipe = _layer(method, srste_lambda=0.1)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(0)
    fc = model.fc
    w = fc.weight.detach().clone()
    e = nm_mask(w, 2, 4)
    assert torch.equal(fc.weight_mask, e)
    x = torch.randn(3, 8)
    out, grad = _grad(model, x)
    ref_out, g = _expected(w, x, e.float(), fc.bias.detach())
    assert torch.allclose(out, ref_out, atol=1e-6)
    extra = 0.1 * (~e).float() * w if method == "srste" else 0.0
    assert torch.allclose(grad, g + extra, atol=1e-6)


def test_srste_default_lambda_is_2e_4():
    recipe = sparsity.recipe_from_dict({"method": "srste", "rules": [{"target": "ff", "n": 2, "m": 4}]})
    assert recipe.options.srste_lambda == 2e-4


@pytest.mark.parametrize("decay,coef,step,beta", [
    ("exp", 1e-1, 5, math.exp(-0.5)),
    ("linear", 1e-1, 5, 0.5),
    ("linear", 1e-1, 20, 0.0),
    ("step", 1e-1, 5, 0.0),
])
@pytest.mark.parametrize("grad_mode", ["ste", "exact"])
def test_mdgf_forward_and_gradient(decay, coef, step, beta, grad_mode):
    model, recipe = _layer("mdgf", decay={"type": decay, "coef": coef}, mdgf_grad=grad_mode)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(step)
    assert ctl.metrics()["beta"] == pytest.approx(beta, abs=1e-6)
    fc = model.fc
    w = fc.weight.detach().clone()
    e = nm_mask(w, 2, 4).float()
    d = e + beta * (1 - e)
    x = torch.randn(3, 8)
    out, grad = _grad(model, x)
    ref_out, g = _expected(w, x, d, fc.bias.detach())
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.allclose(grad, g * d if grad_mode == "exact" else g, atol=1e-6)


def test_bias_is_used():
    model, recipe = _layer("ste")
    sparsity.SparsityController(model, recipe, total_steps=10).step(0)
    with torch.no_grad():
        model.fc.bias.fill_(3.0)
    x = torch.zeros(2, 8)
    assert torch.allclose(model(x), torch.full((2, 4), 3.0))


def test_finetune_frozen_mask_keeps_pruned_weights_at_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    recipe = sparsity.recipe_from_dict({
        "method": "srste", "finetune_fraction": 0.5, "finetune_mask": "frozen",
        "rules": [{"target": "linear", "n": 1, "m": 4}],
    })
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=20)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # momentum would revive pruned weights if not masked
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    frozen_mask = None
    for step in range(20):
        ctl.step(step)
        if step == 10:
            frozen_mask = model[0].weight_mask.clone()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step >= 10:
            assert torch.all(model[0].weight.grad[~model[0].weight_mask] == 0)
        opt.step()
    ctl.step(20)
    assert torch.equal(model[0].weight_mask, frozen_mask)
    assert torch.all(model[0].weight[~frozen_mask] == 0)
    assert int((model[0].weight != 0).sum()) == 16 * 8 // 4
    assert all(r["conforms"] for r in sparsity.sparsity_report(model))


@pytest.mark.parametrize("block", [
    {"method": "ste", "rules": [{"target": "linear", "n": 2, "m": 4}]},
    {"method": "mdgf", "decay": {"type": "exp", "coef": 0.1}, "rules": [{"target": "linear", "n": 1, "m": 4}]},
    {"method": "srste", "finetune_fraction": 0.5, "rules": [{"target": "linear", "n": 2, "m": 4}]},
    {"method": "supermask", "rules": [{"target": "linear", "sparsity": 0.5, "tile": 2}]},
    {"method": "gumbel", "rules": [{"target": "linear", "n": 2, "m": 4}]},
    {"method": "gmp", "final_sparsity": 0.5, "rules": [{"target": "linear"}]},
], ids=lambda b: b["method"])
def test_finalize_zeroes_the_pruned_weights_of_the_model_and_its_copies(block):
    """DESIGN 4: the model is exactly at its pattern at the end, in the raw state dict too (what a stock timm load
    of the checkpoint sees), although the last optimizer step's momentum moved pruned weights off zero."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    ema = copy.deepcopy(model)
    ctl = sparsity.SparsityController(model, recipe, total_steps=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for step in range(6):
        ctl.step(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p, q in zip(ema.parameters(), model.parameters()):
                p.lerp_(q, 0.5)
    layer = model[0]
    # off zero before finalize: STE trains pruned weights, and elsewhere momentum moves them
    assert torch.count_nonzero(layer.weight.detach() * ~layer.weight_mask) > 0
    ctl.step(6)
    before = model(x).detach()
    ctl.finalize(ema)
    for m in (model, ema):
        for _, lay in sparsity.layers.masked_modules(m):
            assert torch.count_nonzero(lay.weight.detach() * ~lay.weight_mask) == 0
        assert torch.equal(m[0].weight_mask, layer.weight_mask)
    assert all(r["conforms"] for r in sparsity.sparsity_report(model))
    if block["method"] in ("ste", "srste", "gmp"):  # their masks do not move at finalize: the forward is unchanged
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_dynamic_finetune_recomputes_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    recipe = sparsity.recipe_from_dict({"method": "ste", "finetune_fraction": 0.5, "finetune_mask": "dynamic",
                                        "rules": [{"target": "linear", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=4)
    ctl.step(2)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 8))
    ctl.step(3)
    assert torch.equal(model[0].weight_mask, nm_mask(model[0].weight, 2, 4))


def test_sdgf_masks_follow_the_ladder_and_mask_interval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    recipe = sparsity.recipe_from_dict({"method": "ste", "structure_decay": "sparsify", "mask_interval": 5,
                                        "rules": [{"target": "linear", "n": 1, "m": 8}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=40)
    kept = {}
    for step in range(40):
        ctl.step(step)
        kept[step] = int(model[0].weight_mask.sum())
    assert [kept[s] for s in (0, 10, 20, 30)] == [7 * 16, 4 * 16, 2 * 16, 1 * 16]
    # mask_interval: no recomputation between multiples of 5 inside a frame
    ctl.step(0)
    m0 = model[0].weight_mask.clone()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 16))
    ctl.step(1)
    assert torch.equal(model[0].weight_mask, m0)
    ctl.step(5)
    assert not torch.equal(model[0].weight_mask, m0)


@pytest.mark.parametrize("method", ["ste", "mdgf"])
def test_mask_interval_counts_from_the_start_of_the_sparse_phase(method):
    # dense_fraction 0.3 of 40 steps: the sparse phase starts at step 12, so with mask_interval 5 the masks are
    # recomputed at steps 12, 17, 22, ... (t = step - 12 a multiple of 5), not at the global multiples 15, 20.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    recipe = sparsity.recipe_from_dict({"method": method, "dense_fraction": 0.3, "mask_interval": 5,
                                        "rules": [{"target": "linear", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=40)
    recomputed = []
    for step in range(11, 28):
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(8, 16))  # new weights every step: a recomputation shows in the mask
        ctl.step(step)
        if step >= 12 and torch.equal(model[0].weight_mask, nm_mask(model[0].weight, 2, 4)):
            recomputed.append(step)
    assert recomputed == [12, 17, 22, 27]


def test_dense_phase_has_no_mask():
    model, recipe = _layer("ste", dense_fraction=0.5)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(2)
    x = torch.randn(2, 8)
    dense = nn.functional.linear(x, model.fc.weight, model.fc.bias)
    assert torch.allclose(model(x), dense)
    ctl.step(5)
    assert not torch.allclose(model(x), dense)


@pytest.mark.parametrize("finetune, last", [(0.0, "end"), (0.2, "finetune")])
def test_phase_after_the_last_step(finetune, last):
    """The evaluation after a run's last step reads ``phase`` "end" unless the run had a fine-tune phase (it
    read "finetune" in every run: step ``total_steps`` is past the sparse window)."""
    model, recipe = _layer("mdgf", finetune_fraction=finetune)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(7)
    assert ctl.metrics()["phase"] == "sparse"
    ctl.step(9)
    assert ctl.metrics()["phase"] == ("sparse" if finetune == 0 else "finetune")
    ctl.step(10)
    assert ctl.metrics()["phase"] == last


def test_first_flip_rate_compares_with_the_first_step():
    """The first epoch's mask flip rate counts the mask entries that changed since the run's first step (it read
    0.0 for every run); a controller that did not start at step 0 has no reference and still reports 0.0."""
    model, recipe = _layer("ste")
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(0)
    first = model.fc.weight_mask.clone()
    with torch.no_grad():
        model.fc.weight.copy_(torch.arange(32, dtype=torch.float32).view(4, 8).flip(1))  # every group reverses
    ctl.step(1)
    changed = (model.fc.weight_mask != first).float().mean().item()
    assert changed > 0 and ctl.flip_rate() == pytest.approx(changed)
    assert ctl.flip_rate() == 0.0  # nothing changed since the previous call
    late = sparsity.SparsityController(model, recipe, total_steps=10)
    late.step(5)
    assert late.flip_rate() == 0.0


def test_controller_state_roundtrip():
    model, recipe = _layer("ste", structure_decay=[[3, 4], [2, 4]], finetune_fraction=0.2)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    for s in range(9):
        ctl.step(s)
    state = ctl.state_dict()
    ctl2 = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl2.load_state_dict(state)
    assert ctl2.state_dict() == state
    assert state["state"]["frozen"] is True


def test_target_problem_names_what_is_not_final_yet():
    """model_best is ranked only when the evaluated model is the recipe's sparse model (trainer._save_epoch)."""
    from sparsity.report import target_problem

    model, recipe = _layer("ste", dense_fraction=0.5)  # dense warm-up: all-True masks
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(2)
    model.train()
    assert target_problem(model) == "fc is not at 2:4 yet (density 1.000)"
    assert model.training and model.fc.training  # the check runs in eval mode and restores the mode
    ctl.step(5)
    assert target_problem(model) is None

    model, recipe = _layer("mdgf", decay={"type": "linear", "coef": 0.1})  # beta = 1 - 0.1 t
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(5)  # beta 0.5: pruned weights still pass at half strength
    assert target_problem(model) == "fc's mask is at 2:4 but its pruned weights still reach the forward (beta 0.5), " \
                                    "density 1.000"
    ctl.step(10)  # beta 0
    assert target_problem(model) is None

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    recipe = sparsity.recipe_from_dict({"method": "ste", "structure_decay": "sparsify",
                                        "rules": [{"target": "linear", "n": 1, "m": 8}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=40)
    ctl.step(10)  # the ladder is at 4:8 on its way to 1:8
    assert target_problem(model) == "0 is not at 1:8 yet (density 0.500)"
    ctl.step(30)
    assert target_problem(model) is None


@pytest.mark.parametrize("precomputed", [True, False])
def test_srste_decay_is_scaled_with_the_loss_under_a_grad_scaler(precomputed):
    """fp16 AMP: the gradient arrives times the loss scale S and is divided by S before the step, so SR-STE's
    lambda (1 - E) W must be added times S too, or it ends up divided by S."""
    model, recipe = _layer("srste", srste_lambda=0.1)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(0)
    fc = model.fc
    if not precomputed:  # an in-place write invalidates the precomputed W * E: the factor path runs
        with torch.no_grad():
            fc.weight.mul_(1.0)
    assert (fc.fresh_masked_weight() is not None) == precomputed  # which autograd function runs
    w, e = fc.weight.detach().clone(), fc.weight_mask.clone()
    x = torch.randn(3, 8)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with sparsity.loss_scale(scaler):  # as documented: the scale is created inside, by scaler.scale
        scaler.scale(model(x).sum()).backward()
    assert fc.weight.grad.abs().max() > 100  # still scaled here
    scaler.unscale_(opt)
    _, g = _expected(w, x, e.float(), fc.bias.detach())
    assert torch.allclose(fc.weight.grad, g + 0.1 * (~e).float() * w, atol=1e-5)
    assert sparsity.layers.current_loss_scale(w) is None  # reset on exit


def test_controller_on_a_model_never_sparsified_is_refused():
    """Forgetting sparsify_ used to train a dense model without a word."""
    from sparsity.errors import UserError

    model = nn.Sequential(nn.Linear(16, 8))
    recipe = sparsity.recipe_from_dict({"method": "srste", "rules": [{"target": "linear", "n": 2, "m": 4}]})
    with pytest.raises(UserError, match=r"never sparsified for method 'srste'; pass it through "
                                        r"sparsify_\(model, recipe\) first"):
        sparsity.SparsityController(model, recipe, total_steps=10)
    sparsity.sparsify_(model, recipe)
    assert len(sparsity.SparsityController(model, recipe, total_steps=10).layers) == 1
    # sparsified, with every selected layer dense on purpose (supermask at sparsity 0): that is not the mistake
    model = nn.Sequential(nn.Linear(16, 8))
    recipe = sparsity.recipe_from_dict({"method": "supermask", "rules": [{"target": "linear", "sparsity": 0.0}]})
    sparsity.sparsify_(model, recipe)
    assert sparsity.SparsityController(model, recipe, total_steps=10).layers == []

