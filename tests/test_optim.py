"""The optimizer implementation (--opt-impl): which one runs, and that the fused kernels give the same training."""

import copy

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


# ---- MaskedAdamW: the optimizer step that also computes the next masks ----------------------------------------------

native_only = pytest.mark.skipif(__import__("sparsity.native", fromlist=["kernel"]).kernel() is None,
                                 reason="needs the native kernels (a C compiler)")


@native_only
@pytest.mark.parametrize("m,shape,threads", [(4, (24, 4, 9), 1), (2, (300, 2, 9), 2), (8, (4096, 8, 1), 2)])
def test_native_adamw_step_is_torchs_fused_adamw_bit_for_bit(m, shape, threads):
    """The kernel's AdamW equals torch's fused AdamW in every bit (weights and both moments), on its vector and its
    scalar path (blocks of 18 elements leave chunk ends that are not whole vectors, two threads split mid-tensor),
    with and without weight decay, over several steps of gradients spanning nine decades; the masks it writes are
    those of the updated weights, and the forward weight is W * E."""
    from sparsity.masks import nm_mask
    from sparsity.native import AdamWStep, NativeBatch
    from sparsity.optim import _adamw_scalars

    gen = torch.Generator().manual_seed(m)
    w = torch.randn(shape, generator=gen)
    w0, ref = w.clone(), nn.Parameter(w.clone())
    mom, sq = torch.zeros_like(w), torch.zeros_like(w)
    mask, out = torch.zeros(shape, dtype=torch.bool), torch.empty(shape)
    batch = NativeBatch([(mask, None, out, w)], m // 2, m)
    opt = torch.optim.AdamW([ref], fused=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step, (lr, wd) in enumerate([(1e-2, 0.05), (3e-3, 0.0), (1e-3, 0.1), (5e-4, 0.05)], start=1):
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = lr, wd
            g = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-8, 1, shape, generator=gen)
            ref.grad = g.clone()
            opt.step()
            s = (AdamWStep * 1)()
            s[0].g, s[0].m, s[0].v = g.data_ptr(), mom.data_ptr(), sq.data_ptr()
            (s[0].wdmul, s[0].c1, s[0].beta2, s[0].c2, s[0].bc2_sqrt, s[0].eps,
             s[0].neg_step) = _adamw_scalars(opt.param_groups[0], float(step))
            assert batch.run_adamw(0.0, s, [])
            st = opt.state[ref]
            assert torch.equal(w, ref.detach()) and torch.equal(mom, st["exp_avg"])
            assert torch.equal(sq, st["exp_avg_sq"])
            assert torch.equal(mask, nm_mask(w, m // 2, m, dim=1))
            assert torch.equal(out, w * mask)
    finally:
        torch.set_num_threads(prev)
    assert (w - w0).abs().max() > 1e-3  # the weights really moved


def _nm_run(method, fuse, steps=8, recipe_extra=None, decay=True, state=None, start=0):
    """A small conv net trained ``steps`` steps under a controller, with or without the masks (and SR-STE's decay)
    moved into the optimizer; returns the losses, the model and optimizer state after ``ctl.step(start + steps)``,
    and how many steps took the native path."""
    import sparsity
    from sparsity import optim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 8))
    rec = sparsity.recipe_from_dict({"method": method, "rules": [{"target": "conv", "n": 2, "m": 4},
                                                                 {"target": "linear", "n": 2, "m": 4}],
                                     **(recipe_extra or {})})
    sparsity.sparsify_(model, rec)
    ctl = sparsity.SparsityController(model, rec, total_steps=16)
    if state is not None:
        model.load_state_dict(state["model"])
        ctl.load_state_dict(state["ctl"])
    ctl.step(start)
    opt, _ = create_optimizer(_groups(model), impl="auto", opt="adamw", lr=2e-2, weight_decay=0.05)
    if state is not None:
        opt.load_state_dict(state["opt"])
    attached = optim.attach_masks(opt, ctl, srste_decay=decay) is None if fuse else False
    assert attached == fuse
    native = []
    if fuse:
        inner = opt._native_step
        opt._native_step = lambda work, dec: native.append(inner(work, dec)) or native[-1]
    losses = []
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + k)  # batch k, whatever step the run starts from
        x, y = torch.randn(8, 4, 8, 8, generator=gen), torch.randint(0, 8, (8,), generator=gen)
        ctl.step(k)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ctl.step(start + steps)
    return (losses, {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), ctl.state_dict(),
            sum(1 for t in native if t))


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_opt(a: dict, b: dict) -> bool:
    return a["state"].keys() == b["state"].keys() and all(_same_state(a["state"][k], b["state"][k]) for k in a["state"])


@native_only
@pytest.mark.parametrize("method,extra", [
    ("ste", None), ("srste", None), ("mdgf", {"decay": {"type": "linear", "coef": 0.05}}),
    ("ste", {"mask_interval": 3, "dense_fraction": 0.25}),  # dense steps, then masks every third step
    ("srste", {"structure_decay": [[1, 4], [2, 4]], "finetune_fraction": 0.25}),  # a new frame, then a fine-tune
])
def test_masks_in_the_optimizer_step_train_exactly_like_the_controller_step(method, extra):
    """With the next masks computed inside the optimizer's pass (and SR-STE's decay added there instead of in the
    backward) training is the same bit for bit: every loss, weight, mask and moment; the native path really ran
    (it steps aside where a frame changes, a phase is dense or masks are not due: those steps take the usual
    path)."""
    base = _nm_run(method, fuse=False, steps=12, recipe_extra=extra)
    fused = _nm_run(method, fuse=True, steps=12, recipe_extra=extra)
    assert base[0] == fused[0]
    assert _same_state(base[1], fused[1]) and _same_opt(base[2], fused[2])
    assert fused[4] >= (1 if extra else 10)


@native_only
def test_srste_decay_stays_in_the_backward_when_the_loop_clips():
    """train.py with --clip-grad keeps SR-STE's decay in the backward (clipping must see it); the optimizer still
    computes the masks, and training is the same bit for bit."""
    base = _nm_run("srste", fuse=False)
    fused = _nm_run("srste", fuse=True, decay=False)
    assert base[0] == fused[0] and _same_state(base[1], fused[1]) and fused[4] >= 6


@native_only
def test_a_run_resumed_between_the_two_paths_is_exact():
    """A checkpoint of the fused optimizer loads into torch's AdamW and back (the state dict is AdamW's), and the
    first step after a resume, which has no prepared kernel call to fuse, keeps the run exact."""
    whole = _nm_run("srste", fuse=True, steps=8)
    first = _nm_run("srste", fuse=True, steps=4)
    state = {"model": first[1], "opt": first[2], "ctl": first[3]}
    for fuse in (True, False):  # a copy each: torch's load_state_dict keeps the moment tensors it is given
        second = _nm_run("srste", fuse=fuse, steps=4, state=copy.deepcopy(state), start=4)
        assert first[0] + second[0] == whole[0]
        assert _same_state(second[1], whole[1]) and _same_opt(second[2], whole[2])


@native_only
def test_masks_stay_in_the_controller_where_the_optimizer_cannot_take_them(monkeypatch):
    """Not attached: an optimizer other than fused AdamW, a method without an N:M mask pass, a torch build whose
    fused AdamW rounds differently (checked once per process) or SPARSITY_OPTIMIZER_MASKS=0."""
    import sparsity
    from sparsity import optim

    def attach(opt_name="adamw", method="ste", impl="auto", width=16):
        model = nn.Sequential(nn.Linear(width, 6 if width == 12 else 8))
        rule = {"target": "linear", "sparsity": 0.5, "tile": 4} if method == "supermask" else \
            {"target": "linear", "n": 2, "m": 4}
        rec = sparsity.recipe_from_dict({"method": method, "rules": [rule]})
        sparsity.sparsify_(model, rec)
        ctl = sparsity.SparsityController(model, rec, total_steps=4)
        opt, _ = create_optimizer(_groups(model), impl=impl, opt=opt_name, lr=1e-3, weight_decay=0.05)
        return optim.attach_masks(opt, ctl)

    assert attach() is None
    assert attach(opt_name="sgd") == attach(impl="foreach") == "not torch's fused AdamW"
    assert attach(method="supermask") == "method supermask has no N:M mask pass"
    assert attach(width=12) == "0: a weight of 72 elements, not whole vectors of 16"
    monkeypatch.setenv("SPARSITY_OPTIMIZER_MASKS", "0")
    assert attach() == "SPARSITY_OPTIMIZER_MASKS=0"
    monkeypatch.delenv("SPARSITY_OPTIMIZER_MASKS")
    monkeypatch.setattr(optim, "_FUSED_OK", False)
    assert attach() == "torch's fused AdamW rounds differently on this machine"


@native_only
def test_channels_last_weights_and_a_loaded_state_keep_the_native_step():
    """Channels-last conv weights (moments and gradients laid out alike) take the native step too, bit for bit;
    after ``load_state_dict`` (torch re-wraps the class's step with its hooks unless told not to) the optimizer
    still runs its hooks once per step and the forward still reads the precomputed weight."""
    import sparsity
    from sparsity import optim
    from sparsity.layers import to_channels_last

    def run(fuse):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        rec = sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": "conv", "n": 2, "m": 4}]})
        sparsity.sparsify_(model, rec)
        to_channels_last(model)
        ctl = sparsity.SparsityController(model, rec, total_steps=20)
        ctl.step(0)
        opt, _ = create_optimizer(_groups(model), impl="auto", opt="adamw", lr=1e-2, weight_decay=0.05)
        if fuse:
            assert optim.attach_masks(opt, ctl) is None
        opt.load_state_dict(opt.state_dict())
        posts = []
        handle = opt.register_step_post_hook(lambda *a: posts.append(1))
        fresh = []
        for k in range(6):
            x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(k)).to(
                memory_format=torch.channels_last)
            ctl.step(k)
            fresh.append(all(layer.fresh_masked_weight() is not None for _, layer in ctl.layers))
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        handle.remove()
        ctl.step(6)
        return {k: v.clone() for k, v in model.state_dict().items()}, len(posts), fresh, getattr(opt, "native_steps", 0)

    base, fused = run(False), run(True)
    assert _same_state(base[0], fused[0])
    assert fused[1] == 6 and all(fused[2]) and fused[3] >= 5
    assert model_is_channels_last(fused[0])


def model_is_channels_last(state: dict) -> bool:
    w = state["0.weight"]
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def _small_nm_run(method, fuse):
    """A conv + linear net at 2:4 under a controller stepped to 0 and its AdamW, attached (SR-STE's decay
    included) when ``fuse``."""
    import sparsity
    from sparsity import optim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 8))
    rec = sparsity.recipe_from_dict({"method": method, "rules": [{"target": "conv", "n": 2, "m": 4},
                                                                 {"target": "linear", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, rec)
    ctl = sparsity.SparsityController(model, rec, total_steps=10)
    ctl.step(0)
    opt, _ = create_optimizer(_groups(model), impl="auto", opt="adamw", lr=2e-2, weight_decay=0.05)
    if fuse:
        assert optim.attach_masks(opt, ctl, srste_decay=True) is None
    return model, ctl, opt


@native_only
@pytest.mark.parametrize("method", ["ste", "srste"])
def test_a_gradient_scaler_takes_the_usual_path(method):
    """torch's GradScaler hands a fused optimizer its scale and inf flag as attributes: such a step goes the usual
    way (torch unscales, and skips a step with an inf); training equals plain fused AdamW bit for bit. SR-STE's
    decay, moved to the optimizer, is scaled like the gradient there: the same values up to rounding (train.py
    keeps it in the backward under a scaler)."""
    import sparsity

    def run(fuse):
        model, ctl, opt = _small_nm_run(method, fuse)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        for k in range(5):
            gen = torch.Generator().manual_seed(100 + k)
            x, y = torch.randn(8, 4, 8, 8, generator=gen), torch.randint(0, 8, (8,), generator=gen)
            ctl.step(k)
            loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if k == 2 else 1.0)
            opt.zero_grad(set_to_none=True)
            with sparsity.loss_scale(scaler):
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        ctl.step(5)
        return {k: v.clone() for k, v in model.state_dict().items()}, getattr(opt, "native_steps", None)

    (base, _), (fused, native) = run(False), run(True)
    assert native == 0 and all(torch.isfinite(v).all() for v in fused.values() if v.is_floating_point())
    if method == "ste":
        assert _same_state(base, fused)
    else:
        assert all(torch.allclose(base[k].float(), fused[k].float(), rtol=1e-5, atol=1e-6) for k in base)


@native_only
def test_a_state_dict_loaded_mid_run_and_a_new_lr_reach_the_native_step():
    """load_state_dict replaces the optimizer's group dicts and a scheduler then sets their lr: the native step
    reads the groups as they are at each step (bit for bit what torch's AdamW does with them)."""

    def run(fuse):
        model, ctl, opt = _small_nm_run("ste", fuse)
        for k in range(6):
            if k == 3:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                for group in opt.param_groups:
                    group["lr"] = 1e-3
            gen = torch.Generator().manual_seed(100 + k)
            ctl.step(k)
            opt.zero_grad(set_to_none=True)
            model(torch.randn(8, 4, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
        ctl.step(6)
        return {k: v.clone() for k, v in model.state_dict().items()}, getattr(opt, "native_steps", 0)

    (base, _), (fused, native) = run(False), run(True)
    assert native >= 4 and _same_state(base, fused)
