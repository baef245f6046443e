"""The optimizer implementation (--opt-impl): which one runs, and that the fused kernels give the same training."""

import pytest
import torch
from torch import nn

from sparsity.errors import UserError
from sparsity.optim import create_optimizer, has_fused


def _groups(model):
    return [{"params": [p for p in model.parameters() if p.ndim > 1]},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


@pytest.mark.parametrize("opt,expected", [("adamw", "fused"), ("adam", "fused"), ("sgd", "fused"),
                                          ("momentum", "fused"), ("lookahead_adamw", "fused"),
                                          ("lamb", "default"), ("adamp", "default")])
def test_auto_takes_the_fused_kernel_where_torch_has_one(opt, expected):
    optimizer, impl = create_optimizer(_groups(_model()), impl="auto", opt=opt, lr=1e-3, weight_decay=0.05)
    assert impl == expected
    assert has_fused(opt) == (expected == "fused")
    assert bool(optimizer.defaults.get("fused")) is (expected == "fused")


@pytest.mark.parametrize("impl,foreach", [("foreach", True), ("loop", False)])
def test_foreach_and_loop_are_passed_through(impl, foreach):
    optimizer, used = create_optimizer(_groups(_model()), impl=impl, opt="adamw", lr=1e-3)
    assert used == impl
    assert optimizer.defaults["foreach"] is foreach and not optimizer.defaults["fused"]


def test_impls_an_optimizer_lacks_are_refused_with_the_fix():
    with pytest.raises(UserError, match="torch has no fused kernel for --opt lamb.*use --opt-impl auto"):
        create_optimizer(_groups(_model()), impl="fused", opt="lamb", lr=1e-3)
    with pytest.raises(UserError, match="--opt lamb has no foreach implementation; use --opt-impl auto"):
        create_optimizer(_groups(_model()), impl="foreach", opt="lamb", lr=1e-3)
    with pytest.raises(UserError, match="unknown --opt-impl 'fast'"):
        create_optimizer(_groups(_model()), impl="fast", opt="adamw", lr=1e-3)
    assert create_optimizer(_groups(_model()), impl="loop", opt="lamb", lr=1e-3)[1] == "default"  # a loop already


def test_fused_needs_a_device_torch_has_kernels_for():
    """torch checks the device only at the first step: auto falls back up front, fused says why."""
    meta = nn.Linear(4, 4, device="meta")
    assert create_optimizer(meta.parameters(), impl="auto", opt="adamw", lr=1e-3)[1] == "default"
    with pytest.raises(UserError, match="cannot run --opt adamw fused here \\(parameters on meta"):
        create_optimizer(meta.parameters(), impl="fused", opt="adamw", lr=1e-3)


@pytest.mark.parametrize("saved", ["loop", "foreach"])
@pytest.mark.parametrize("opt", ["adamw", "lookahead_adamw"])
def test_loading_a_state_dict_keeps_the_runs_implementation(saved, opt):
    """Resuming a checkpoint written by another implementation keeps the one --opt-impl chose (torch would take the
    saved flags), with the saved state, and a gradient scaler's step still works (it asked the fused optimizer
    to unscale; a silently restored loop optimizer would refuse)."""
    model = _model()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    old, _ = create_optimizer(_groups(model), impl=saved, opt=opt, lr=1e-3)
    nn.functional.cross_entropy(model(x), y).backward()
    old.step()
    new, used = create_optimizer(_groups(model), impl="auto", opt=opt, lr=1e-3)
    new.load_state_dict(old.state_dict())
    assert used == "fused" and all(g["fused"] is True and not g["foreach"] for g in new.param_groups)
    weight = model[0].weight
    state = [getattr(o, "_base_optimizer", o).state[weight]["exp_avg"] for o in (new, old)]  # lookahead: its base's
    assert torch.equal(*state)
    scaler = torch.amp.GradScaler("cpu")
    new.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    before = weight.detach().clone()
    scaler.step(new)
    assert not torch.equal(weight, before)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_fused_trains_like_the_loop(opt):
    """Same weights after 20 steps of a small conv net, fused against the per-parameter loop (the update is one
    formula; only float rounding order may differ)."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    finals = {}
    for impl in ("fused", "loop"):
        model = _model()
        optimizer, used = create_optimizer(_groups(model), impl=impl, opt=opt, lr=0.05, weight_decay=0.05)
        assert used == impl
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        finals[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (finals["loop"] - torch.cat([p.detach().flatten() for p in _model().parameters()])).abs().max()
    assert moved > 1e-2  # the runs really trained
    assert (finals["fused"] - finals["loop"]).abs().max() <= 1e-5 * moved


@pytest.mark.parametrize("name, kwargs, exempt", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
     {"pos_embed", "cls_token"}),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, patch_size=2, embed_dim=16, depths=(1, 1),
                                          num_heads=(1, 2)), {"relative_position_bias_table"}),
])
def test_weight_decay_groups_match_timm(name, kwargs, exempt):
    """The controller's parameter groups decay what timm's create_optimizer_v2(model) decays (they decayed the
    ViT's position embedding and class token and Swin's relative position tables), and never the method's scores."""
    import timm
    from timm.optim import create_optimizer_v2

    import sparsity

    def no_decay(groups, model):
        ids = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    stock = no_decay(create_optimizer_v2(model, "adamw", weight_decay=0.05).param_groups, model)
    recipe = sparsity.recipe_from_dict({"method": "supermask", "rules": [{"target": "ff", "sparsity": 0.5,
                                                                            "tile": 4}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ours = no_decay(ctl.param_groups(0.05), model)
    scores = {n for n in ours if n.endswith("_scores")}
    assert scores and ours - scores == stock
    assert any(any(e in n for e in exempt) for n in stock)
