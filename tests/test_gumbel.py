"""``gumbel`` learned N:M masks against DESIGN.md section 4: valid patterns, STE gradients, tau, export."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sparsity
from sparsity import native
from sparsity.masks import is_nm, nm_mask, weight_is_nm
from sparsity.methods import gumbel as gumbel_mod
from sparsity.methods.gumbel import MAX_PATTERNS, _gumbel_noise, counter_noise, nm_patterns
from tests.conftest import TINY, densified_as_stock, tiny_model


def _recipe(rules, **opts):
    return sparsity.recipe_from_dict({"method": "gumbel", "rules": rules, **opts})


def _single(make, n=2, m=4, seed=0, **opts):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("layer", make())
    recipe = _recipe([{"target": ["linear", "conv"], "n": n, "m": m}], **opts)
    sparsity.sparsify_(model, recipe)
    return model, recipe


def _optimizer(model, ctl, lr=0.1, wd=0.05):
    nwd = {id(p) for p in ctl.no_weight_decay_params()}
    rest = [p for p in model.parameters() if id(p) not in nwd]  # frozen ones included: they must stay put
    return torch.optim.AdamW([{"params": rest, "weight_decay": wd},
                              {"params": ctl.no_weight_decay_params(), "weight_decay": 0.0}], lr=lr)


def _step(model, ctl, opt, k, x):
    ctl.step(k)
    out = model(x)
    loss = F.cross_entropy(out.flatten(1), torch.arange(out.shape[0]) % out.flatten(1).shape[1])
    opt.zero_grad()
    loss.backward()
    opt.step()


def _argmax_mask(layer, spec, logits):
    """Independent reconstruction of the argmax-pattern mask of one unit."""
    table = nm_patterns(spec.n, spec.m)
    hard = table[logits.detach().argmax(-1)]  # (..., groups, M)
    w = layer.weight[spec.start:spec.stop]
    dim = 1 if w.dim() == 4 else w.dim() - 1
    moved = list(w.movedim(dim, -1).shape)
    return hard.reshape(moved).movedim(-1, dim)


def test_pattern_table():
    p = nm_patterns(2, 4)
    assert p.shape == (6, 4) and bool((p.sum(1) == 2).all()) and len({tuple(r.tolist()) for r in p}) == 6
    assert nm_patterns(4, 8).shape == (70, 8) and MAX_PATTERNS == 70


def test_recipe_errors():
    with pytest.raises(sparsity.RecipeError, match=r"C\(16,8\) = 12870 .*at most 70"):
        _recipe([{"target": "ff", "n": 8, "m": 16}])
    _recipe([{"target": "ff", "n": 4, "m": 8}])  # C(8,4) = 70: accepted
    with pytest.raises(sparsity.RecipeError, match="needs n and m"):
        _recipe([{"target": "ff", "sparsity": 0.5}])
    with pytest.raises(sparsity.RecipeError, match="tau.*end"):
        _recipe([{"target": "ff", "n": 2, "m": 4}], tau={"start": 2.0, "finish": 0.5})
    with pytest.raises(sparsity.RecipeError, match="tau.*> 0"):
        _recipe([{"target": "ff", "n": 2, "m": 4}], tau=0.0)
    with pytest.raises(sparsity.RecipeError, match="trainable"):
        _recipe([{"target": "ff", "n": 2, "m": 4}], trainable="weights")


def test_straight_through_gradients_by_hand():
    model, recipe = _single(lambda: nn.Linear(8, 3), tau=2.0, init="magnitude")
    layer = model.layer
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(3)
    assert layer.weight_logits.shape == (3, 2, 6)
    lg = layer.weight_logits.detach().clone()
    w = layer.weight.detach().clone()
    y = torch.softmax((lg + _gumbel_noise(lg.shape, layer.gumbel_seed, lg.device)) / 2.0, -1)
    table = nm_patterns(2, 4).float()
    e = table[y.argmax(-1)].reshape(3, 8)
    x, c = torch.randn(5, 8), torch.randn(5, 3)
    out = model(x)
    assert torch.equal(out, F.linear(x, w * e, layer.bias))  # the forward is exactly W * P[z]
    (out * c).sum().backward()
    g = c.t() @ x
    assert torch.allclose(layer.weight.grad, g * e, atol=1e-6)
    dy = (g * w).reshape(3, 2, 4) @ table.t()  # dL/dy over the patterns
    dlg = y * (dy - (dy * y).sum(-1, keepdim=True)) / 2.0
    assert torch.allclose(layer.weight_logits.grad, dlg, atol=1e-6)


def test_float64_logits_keep_float64_precision():
    # A float64 model (the torch path: the kernels take float32) adds the float32 noise to its logits in float64:
    # the logits' gradient matches a float64 reference of the same formula to rounding, not to float32's 1e-8.
    model, recipe = _single(lambda: nn.Linear(8, 3).double(), tau=0.5)
    layer = model.layer
    with torch.no_grad():
        layer.weight_logits.normal_()
    sparsity.SparsityController(model, recipe, total_steps=4).step(0)
    x, c = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    (model(x) * c).sum().backward()
    s = (layer.weight_logits.detach() + _gumbel_noise((3, 2, 6), layer.gumbel_seed, "cpu").double()) / 0.5
    y, table = torch.softmax(s, -1), nm_patterns(2, 4).double()
    dy = ((c.t() @ x) * layer.weight.detach()).reshape(3, 2, 4) @ table.t()
    dlg = y * (dy - (dy * y).sum(-1, keepdim=True)) / 0.5
    assert layer.weight_logits.grad.dtype == torch.float64
    assert torch.allclose(layer.weight_logits.grad, dlg, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_every_mask_is_nm_at_every_step(kind):
    model = tiny_model(kind)
    rules = [{"target": ["ff", "q", "k", "v"], "n": 2, "m": 4}] if kind == "vit" else \
        [{"target": r"re:layer1\.0\..*|layer2\.0\.downsample\.0", "n": 1, "m": 4}, {"target": "head", "n": 2, "m": 8}]
    recipe = _recipe(rules, tau={"start": 2.0, "end": 0.5})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=3)
    opt = _optimizer(model, ctl, lr=0.05)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    layers = sparsity.masked_modules(model)
    assert any(isinstance(m, nn.Linear) for _, m in layers) and (kind == "vit" or any(
        isinstance(m, nn.Conv2d) for _, m in layers))
    for k in range(3):
        ctl.step(k)
        for fqn, layer in layers:
            w_fwd = layer.sparse_weight().detach()  # the sampled mask of this step's forward
            for spec in layer.slices:
                part = layer.weight_mask[spec.start:spec.stop]
                assert weight_is_nm(part, spec.n, spec.m) and weight_is_nm(w_fwd[spec.start:spec.stop],
                                                                           spec.n, spec.m), (k, fqn)
                # groups run along dim 1 (input features / input channels)
                kept = part.movedim(1, -1).reshape(-1, spec.m).sum(-1)
                assert bool((kept == spec.n).all()), (k, fqn)  # exactly N kept in every group
        _step(model, ctl, opt, k, x)
    assert all(r["conforms"] for r in sparsity.sparsity_report(model) if r["method"] == "gumbel")


def test_conv_groups_run_along_input_channels_and_ignore_grouped():
    model, recipe = _single(lambda: nn.Conv2d(8, 4, 3), n=2, m=4)
    layer = model.layer
    assert layer.weight_logits.shape == (4, 3, 3, 2, 6)  # (O, kh, kw, I/M, K)
    assert is_nm(layer.weight_mask, 2, 4, dim=1)
    torch.manual_seed(0)
    seq = nn.Sequential()
    seq.add_module("grouped", nn.Conv2d(16, 16, 3, groups=2))  # 8 input channels per group
    seq.add_module("dw", nn.Conv2d(16, 16, 3, groups=16))
    sparsity.sparsify_(seq, _recipe([{"target": "conv", "n": 2, "m": 4}]))
    assert not sparsity.masked_modules(seq)
    assert "grouped conv (groups=2)" in seq.sparsity_skipped["grouped"]
    assert "depthwise" in seq.sparsity_skipped["dw"]
    seq2 = nn.Sequential(nn.Conv2d(16, 16, 3, groups=2), nn.Conv2d(16, 16, 3, groups=16))
    sparsity.sparsify_(seq2, _recipe([{"target": "conv", "n": 2, "m": 4}], ignore_grouped=False))
    masked = dict(sparsity.masked_modules(seq2))
    assert list(masked) == ["0"] and is_nm(masked["0"].weight_mask, 2, 4, dim=1)
    assert "not divisible" in seq2.sparsity_skipped["1"]


def test_trainable_mask_keeps_weights_bit_identical_and_none_freezes_all():
    x = torch.randn(4, 16)
    for trainable in ("mask", "none", "all"):
        model, recipe = _single(lambda: nn.Linear(16, 8), trainable=trainable)
        layer = model.layer
        w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
        l0 = layer.weight_logits.detach().clone()
        ctl = sparsity.SparsityController(model, recipe, total_steps=10)
        opt = _optimizer(model, ctl)
        model.train()
        for k in range(3):
            _step(model, ctl, opt, k, x)
        if trainable == "all":
            assert not torch.equal(layer.weight, w0) and not torch.equal(layer.weight_logits, l0)
        else:
            assert torch.equal(layer.weight, w0)  # bit-identical despite weight decay in its group
        if trainable == "mask":
            assert not torch.equal(layer.weight_logits, l0)
            assert not torch.equal(layer.bias, b0)
            assert [id(p) for p in ctl.no_weight_decay_params()] == [id(layer.weight_logits)]
        if trainable == "none":
            assert torch.equal(layer.weight_logits, l0) and ctl.no_weight_decay_params() == []


def test_tau_follows_its_schedule():
    model, _ = _single(lambda: nn.Linear(8, 4))
    for tau, want in [
        (1.5, {0: 1.5, 10: 1.5, 50: 1.5, 95: 1.5}),
        ({"start": 4.0, "end": 0.5}, {0: 4.0, 10: 4.0, 50: 2.25, 90: 0.5, 95: 0.5}),
        ({"start": 4.0, "end": 0.25, "schedule": "exp"}, {10: 4.0, 30: 2.0, 50: 1.0, 70: 0.5, 90: 0.25}),
    ]:
        m = copy.deepcopy(model)
        recipe = _recipe([{"target": "linear", "n": 2, "m": 4}], tau=tau, dense_fraction=0.1, finetune_fraction=0.1)
        ctl = sparsity.SparsityController(m, recipe, total_steps=100)
        for step, t in want.items():
            ctl.step(step)
            assert ctl.method.tau == pytest.approx(t) and ctl.method.temperature(step) == pytest.approx(t)
            if 10 <= step < 90:
                assert m.layer.gumbel_tau == pytest.approx(t) and m.layer.sparse_mode == "sample"
        assert ctl.metrics()["tau"] == pytest.approx(want[max(want)])
    assert _recipe([{"target": "ff", "n": 2, "m": 4}]).options.tau == 1.0  # the reference default


def test_phases_eval_argmax_and_finalize_fixes_the_argmax_pattern():
    model, recipe = _single(lambda: nn.Linear(64, 16), dense_fraction=0.2)
    layer = model.layer
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(0)  # dense phase: no mask
    assert layer.sparse_mode == "dense" and bool(layer.weight_mask.all())
    assert torch.equal(layer.sparse_weight(), layer.weight)
    opt = _optimizer(model, ctl, lr=0.5)
    x = torch.randn(8, 64)
    model.train()
    for k in range(2, 6):
        _step(model, ctl, opt, k, x)
    ctl.step(6)
    spec = layer.slices[0]
    argmax = _argmax_mask(layer, spec, layer.weight_logits)
    assert torch.equal(layer.weight_mask, argmax)
    model.eval()  # eval: the argmax pattern, deterministic
    w_eval = layer.sparse_weight().detach()
    assert torch.equal(w_eval, layer.weight.detach() * argmax) and torch.equal(layer.sparse_weight(), w_eval)
    model.train()  # training samples: with uniform init the sample differs from the argmax somewhere
    assert not torch.equal(layer.sparse_weight().detach() != 0, argmax)
    ctl.finalize()
    assert layer.sparse_mode == "frozen" and torch.equal(layer.weight_mask, argmax)
    with torch.no_grad():
        layer.weight_logits.normal_()  # logits no longer matter, in train mode either
    assert torch.equal(layer.sparse_weight().detach(), layer.weight.detach() * argmax)


def test_init_and_metrics():
    model, recipe = _single(lambda: nn.Linear(16, 4), init="magnitude")
    layer = model.layer
    assert torch.equal(layer.weight_mask, nm_mask(layer.weight, 2, 4))  # magnitude init: argmax = magnitude mask
    kept = (layer.weight.detach().abs().reshape(4, 4, 4) @ nm_patterns(2, 4).float().t())
    ratio = layer.weight_logits.detach() / kept
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # proportional to the kept magnitude
    model, recipe = _single(lambda: nn.Linear(16, 4))  # uniform
    layer = model.layer
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(0)
    m = ctl.metrics()
    assert m["mask_entropy"] == pytest.approx(math.log(6)) and m["mask_flip"] == 0.0
    with torch.no_grad():  # make 4 of the 16 groups pick a pattern other than pattern 0 (the uniform argmax)
        layer.weight_logits[0, :, 5] = 10.0
    m = ctl.metrics()
    assert m["mask_flip"] == pytest.approx(4 / 16)
    p = torch.softmax(torch.tensor([0.0] * 5 + [10.0]), 0)
    want = (12 * math.log(6) + 4 * float(-(p * p.log()).sum())) / 16
    assert m["mask_entropy"] == pytest.approx(want, abs=1e-5)
    assert ctl.metrics()["mask_flip"] == 0.0


def test_dense_state_dict_loads_and_densified_export_matches_stock_timm():
    name, kw = TINY["vit"]
    stock_model = tiny_model("vit")
    stock = copy.deepcopy(stock_model.state_dict())
    recipe = _recipe([{"target": ["ff", "q", "k", "v", "proj"], "n": 2, "m": 4}, {"target": "head", "n": 1, "m": 4}],
                     init="magnitude")
    torch.manual_seed(1)
    model = timm.create_model(name, **kw)
    sparsity.sparsify_(model, recipe)
    model.load_state_dict(stock, strict=True)
    qkv = model.blocks[0].attn.qkv
    assert {n for n, _ in qkv.named_parameters()} == {"weight", "bias", "weight_logits_q", "weight_logits_k",
                                                      "weight_logits_v"}
    ctl = sparsity.SparsityController(model, recipe, total_steps=4)
    ctl.step(0)  # magnitude logits re-initialised from the loaded weights: the argmax is their magnitude mask
    w = stock["blocks.0.mlp.fc1.weight"]
    assert torch.equal(model.blocks[0].mlp.fc1.weight_mask, nm_mask(w, 2, 4))
    opt = _optimizer(model, ctl, lr=1e-3)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    for k in range(2):
        _step(model, ctl, opt, k, x)
    ctl.finalize()
    fresh = densified_as_stock(model, name, kw, x)
    assert is_nm(fresh.blocks[1].mlp.fc2.weight, 2, 4) and is_nm(fresh.head.weight, 1, 4)


def test_exact_resume_and_ema_sync():
    def build():
        model, recipe = _single(lambda: nn.Linear(16, 8), tau={"start": 2.0, "end": 0.5})
        ctl = sparsity.SparsityController(model, recipe, total_steps=6)
        return model, ctl, _optimizer(model, ctl, lr=0.05)

    x = torch.randn(4, 16)
    model, ctl, opt = build()
    model.train()
    for k in range(6):
        _step(model, ctl, opt, k, x)
    model2, ctl2, opt2 = build()
    model2.train()
    for k in range(3):
        _step(model2, ctl2, opt2, k, x)
    ckpt = copy.deepcopy({"model": model2.state_dict(), "opt": opt2.state_dict(), "ctl": ctl2.state_dict()})
    torch.manual_seed(123)  # the global RNG does not matter: the noise is a function of the step
    model3, ctl3, opt3 = build()
    model3.load_state_dict(ckpt["model"], strict=True)
    opt3.load_state_dict(ckpt["opt"])
    ctl3.load_state_dict(ckpt["ctl"])
    model3.train()
    for k in range(3, 6):
        _step(model3, ctl3, opt3, k, x)
    for (k, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), k
    ema = copy.deepcopy(model)
    ctl.step(5)
    ctl.sync(ema)
    assert torch.equal(ema.layer.weight_mask, model.layer.weight_mask)
    assert ema.layer.gumbel_tau == model.layer.gumbel_tau == pytest.approx(2.0 - 1.5 * 5 / 6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_step():
    model = tiny_model("vit").cuda()
    recipe = _recipe([{"target": ["ff", "q", "k", "v"], "n": 2, "m": 4}], tau={"start": 2.0, "end": 0.5})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(1)
    model.train()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    for _, layer in sparsity.masked_modules(model):
        w1, w2 = layer.sparse_weight().detach(), layer.sparse_weight().detach()
        assert torch.equal(w1, w2)  # the noise is a function of the step, on CUDA too
        for spec, name in zip(layer.slices, layer.logit_names):
            assert weight_is_nm(w1[spec.start:spec.stop], 2, 4) and weight_is_nm(layer.weight_mask, 2, 4)
            grad = getattr(layer, name).grad
            assert grad is not None and bool(torch.isfinite(grad).all())
    assert ctl.metrics()["mask_flip"] == 0.0


def test_logits_learn_a_planted_support_from_uniform_init():
    """The straight-through estimator carries signal: with the weights frozen (``trainable: mask``), a student whose
    target is the same weights under a random 2:4 support finds that support in every group from uniform logits."""
    model, recipe = _single(lambda: nn.Linear(32, 8, bias=False), trainable="mask", finetune_fraction=0.0)
    layer = model.layer
    gen = torch.Generator().manual_seed(1)
    planted = torch.randint(0, 6, (8, 8), generator=gen)  # one of the 6 patterns per group of 4 inputs
    teacher = layer.weight.detach() * nm_patterns(2, 4)[planted].reshape(8, 32)
    ctl = sparsity.SparsityController(model, recipe, total_steps=200)
    opt = torch.optim.Adam([layer.weight_logits], lr=0.1)
    model.train()
    for k in range(200):
        ctl.step(k)
        x = torch.randn(64, 32, generator=gen)
        loss = F.mse_loss(model(x), x @ teacher.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.weight_logits.argmax(-1), planted)
    assert ctl.method.metrics()["mask_entropy"] < 0.5 * math.log(6)  # confident, not just a lucky argmax


def test_warns_at_the_end_when_logits_stayed_near_uniform(caplog):
    x = torch.randn(4, 16)
    for init, warned in (("uniform", True), ("magnitude", False)):
        model, recipe = _single(lambda: nn.Linear(16, 8), init=init)
        ctl = sparsity.SparsityController(model, recipe, total_steps=10)
        opt = _optimizer(model, ctl, lr=1e-4)
        model.train()
        for k in range(3):
            _step(model, ctl, opt, k, x)
        caplog.clear()
        with caplog.at_level("WARNING", logger="sparsity.methods.gumbel"):
            ctl.on_train_end(None)  # not the process that writes the run: silent
            assert caplog.records == []
            ctl.on_train_end("run")
        messages = [r.getMessage() for r in caplog.records]
        assert (len(messages) == 1 and "ended near uniform" in messages[0] and "init: magnitude" in messages[0]) \
            == warned, (init, messages)


# ---- the CPU noise stream and the native kernels (sparsity/csrc/gumbel.c) ---------------------------------------
needs_kernel = pytest.mark.skipif(native.status() != "loaded", reason=f"native kernel: {native.status()}")


def _torch_path(monkeypatch):
    """Run gumbel as if no C compiler were there: the torch noise and the torch sampled weight."""
    monkeypatch.setattr(gumbel_mod, "_native_unit", lambda *a, **k: None)
    monkeypatch.setattr(native, "gumbel_noise_native", lambda *a, **k: None)


def test_counter_noise_is_standard_gumbel_and_a_function_of_the_index(monkeypatch):
    _torch_path(monkeypatch)  # the definition; the native kernel is compared with it below
    x = counter_noise(1 << 20, 11)
    assert bool(torch.isfinite(x).all())
    assert abs(float(x.mean()) - 0.5772157) < 0.01 and abs(float(x.var()) - math.pi ** 2 / 6) < 0.02
    for q in (-1.0, 0.0, 1.0, 3.0):  # the CDF exp(-exp(-q))
        assert abs(float((x <= q).float().mean()) - math.exp(-math.exp(-q))) < 0.002, q
    other = counter_noise(1 << 20, 12)
    assert abs(float(torch.corrcoef(torch.stack([x, other]))[0, 1])) < 0.005  # seeds give unrelated streams
    assert torch.equal(counter_noise(10, 11, first=1000), x[1000:1010])  # any range, computed on its own


@needs_kernel
@pytest.mark.parametrize("seed,first", [(0, 0), (5, 10_000_000), ((1 << 62) - 1, 3)])
def test_native_noise_has_the_torch_streams_bits(seed, first, monkeypatch):
    got = native.gumbel_noise_native(5000, seed, first)
    _torch_path(monkeypatch)
    assert torch.equal(got, counter_noise(5000, seed, first))


_LAYERS = {  # (make, n, m, sparse_dim, tau, input shape)
    "linear 2:4 tau 0.7": (lambda: nn.Linear(64, 16), 2, 4, "row", 0.7, (5, 64)),
    "conv 2:4, 34 groups a row": (lambda: nn.Conv2d(136, 24, 3), 2, 4, "row", 1.0, (2, 136, 5, 5)),
    "conv 1:4": (lambda: nn.Conv2d(32, 8, 3), 1, 4, "row", 1.3, (2, 32, 6, 6)),
    "linear 1:8, two threads": (lambda: nn.Linear(1032, 300), 1, 8, "row", 1.0, (3, 1032)),
    "linear 4:8, 70 patterns": (lambda: nn.Linear(64, 16), 4, 8, "row", 1.0, (5, 64)),
    "linear 2:4 along out": (lambda: nn.Linear(64, 16), 2, 4, "col", 1.0, (5, 64)),
}


def _sampled_step(model, recipe, x):
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(3)
    out = model(x)
    (out.float() ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    masks = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    return out.detach(), grads, masks


@needs_kernel
@pytest.mark.parametrize("trainable", ["all", "mask"])
@pytest.mark.parametrize("case", list(_LAYERS))
def test_native_sampled_weight_matches_the_torch_path(case, trainable, monkeypatch):
    make, n, m, sparse_dim, tau, shape = _LAYERS[case]
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", make())
    recipe = _recipe([{"target": ["linear", "conv"], "n": n, "m": m, "sparse_dim": sparse_dim}], tau=tau,
                     init="magnitude", trainable=trainable)
    sparsity.sparsify_(model, recipe)
    twin = copy.deepcopy(model)
    x = torch.randn(*shape)
    out, grads, masks = _sampled_step(model, recipe, x)
    assert "GumbelNative" in type(model.layer.sparse_weight().grad_fn).__name__  # the kernel did run
    _torch_path(monkeypatch)
    ref_out, ref_grads, ref_masks = _sampled_step(twin, recipe, x)
    assert torch.equal(out, ref_out)  # same noise, same patterns, same forward bits
    assert all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks)  # the controller's argmax masks
    assert sorted(grads) == sorted(ref_grads) and ("layer.weight" in grads) == (trainable == "all")
    for name, ref in ref_grads.items():  # the same gradients up to float rounding (exp, summation order)
        assert torch.allclose(grads[name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), name


@needs_kernel
def test_native_gumbel_on_a_vit_with_qkv_thirds_and_dense_rows(monkeypatch):
    """Units on the q and k thirds of a fused qkv (v rows stay dense) and on the MLP: the model's logits and every
    gradient match the torch path."""
    model = tiny_model("vit")
    recipe = _recipe([{"target": ["q", "k", "ff"], "n": 2, "m": 4}], tau=0.8)
    sparsity.sparsify_(model, recipe)
    twin = copy.deepcopy(model)
    model.train()
    twin.train()
    x = torch.randn(2, 3, 32, 32)
    out, grads, masks = _sampled_step(model, recipe, x)
    _torch_path(monkeypatch)
    ref_out, ref_grads, ref_masks = _sampled_step(twin, recipe, x)
    assert torch.allclose(out, ref_out, atol=1e-5)  # the same sampled weights; the attention's rounding differs
    assert all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks)
    assert any("weight_logits_q" in k for k in grads) and sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert torch.allclose(grads[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())), name


@needs_kernel
def test_native_gumbel_gives_the_same_bits_on_any_thread_count():
    model, recipe = _single(lambda: nn.Conv2d(136, 64, 3), tau=0.9, init="magnitude")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 136, 5, 5)
    assert torch.get_num_threads() == 2  # conftest; 117 k logits: both threads work
    two = _sampled_step(model, recipe, x)
    torch.set_num_threads(1)
    try:
        one = _sampled_step(twin, recipe, x)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(two[0], one[0])
    assert all(torch.equal(two[1][k], one[1][k]) for k in one[1]) and all(
        torch.equal(two[2][k], one[2][k]) for k in one[2])


@needs_kernel
def test_native_kernels_decline_what_they_do_not_take():
    w, logits, table = torch.randn(8, 16), torch.randn(8, 4, 6), nm_patterns(2, 4)
    assert native.GumbelUnit.create(w, logits, 1, table) is not None
    assert native.GumbelUnit.create(w.bfloat16(), logits, 1, table) is None  # float32 only
    assert native.GumbelUnit.create(w.t().contiguous().t(), logits, 1, table) is None  # not contiguous
    assert native.GumbelUnit.create(w, logits[:, :3], 1, table) is None  # logits of another shape
    assert native.GumbelUnit.create(torch.randn(8, 18), torch.randn(8, 4, 6), 1, table) is None  # 18 % 4
    bad = native.GumbelUnit(8, 16, 1, torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.uint8), native.kernel())
    with pytest.raises(RuntimeError, match="refused"):  # patterns keeping different counts: the C side says no
        bad.forward(w, torch.randn(8, 4, 2), 0, 1.0)


@needs_kernel
def test_native_gumbel_takes_channels_last_conv_weights(monkeypatch):
    """A channels-last conv weight is (O, kh, kw, I) in memory, input channels innermost: the kernels run on it as
    is (the gradient handed back in the weight's format), with the torch path's results."""
    model, recipe = _single(lambda: nn.Conv2d(136, 24, 3), tau=0.8, init="magnitude")
    sparsity.layers.to_channels_last(model)
    w = model.layer.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert model.layer.weight_logits.dim() == 5  # left as it was: torch's own conversion fails on it
    twin = copy.deepcopy(model)
    x = torch.randn(2, 136, 5, 5).contiguous(memory_format=torch.channels_last)
    out, grads, masks = _sampled_step(model, recipe, x)
    assert "GumbelNative" in type(model.layer.sparse_weight().grad_fn).__name__
    assert grads["layer.weight"].is_contiguous(memory_format=torch.channels_last)
    _torch_path(monkeypatch)
    ref_out, ref_grads, ref_masks = _sampled_step(twin, recipe, x)
    assert torch.equal(out, ref_out) and all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks)
    for name, ref in ref_grads.items():
        assert torch.allclose(grads[name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), name


@needs_kernel
def test_a_forward_made_on_the_kernel_finishes_its_backward_without_it(monkeypatch):
    """The kernel library going away between a forward and its backward (as the torch-only fixtures do) leaves that
    backward on the library the forward used; the next forward takes the torch path."""
    model, recipe = _single(lambda: nn.Linear(64, 16), init="magnitude")
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(3)
    out = model(torch.randn(4, 64))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", "disabled for this test")
    out.square().sum().backward()
    assert model.layer.weight_logits.grad is not None and bool(torch.isfinite(model.layer.weight_logits.grad).all())
    ctl.step(4)  # the argmax masks from torch ops
    assert "GumbelNative" not in type(model.layer.sparse_weight().grad_fn).__name__


@needs_kernel
def test_a_nan_logit_makes_its_groups_gradient_nan_as_in_the_torch_path(monkeypatch):
    model, recipe = _single(lambda: nn.Linear(16, 2), init="magnitude")
    with torch.no_grad():
        model.layer.weight_logits[0, 1, 2] = float("nan")
    twin = copy.deepcopy(model)
    x = torch.randn(3, 16)
    _, grads, _ = _sampled_step(model, recipe, x)
    _torch_path(monkeypatch)
    _, ref_grads, _ = _sampled_step(twin, recipe, x)
    got, ref = grads["layer.weight_logits"], ref_grads["layer.weight_logits"]
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got[0, 1].isnan().all())
    finite = ~ref.isnan()
    assert torch.allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-7)
