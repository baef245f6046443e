"""The fast training path keeps the math: batched rank masks equal the reference, no host syncs in
``controller.step``, cached mask factors follow the mask, torch.compile and bf16 autocast train. Nothing here is
timed (timings live in benchmark.py / docs/performance.md)."""

import contextlib
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sparsity
from sparsity import masks as M
from sparsity import nm_batch as NB
from sparsity.bench_train import TrainBenchSettings, bench_train, builtin_recipe

METHODS = ["ste", "srste", "mdgf", "supermask", "gumbel"]


def _reference_nm_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Top-n of every m by |w| with a stable descending sort: ties go to the lower index (the documented rule)."""
    g = M._group_view(w.abs(), m, dim)
    idx = g.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(g.shape, dtype=torch.bool).scatter_(-1, idx, True)
    out = torch.empty(w.shape, dtype=torch.bool)
    M._group_view(out, m, dim).copy_(keep)
    return out


def _topk_nm_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """The previous implementation (topk + scatter); its tie order is unspecified, so compare on tie-free input."""
    g = M._group_view(w.abs(), m, dim)
    keep = torch.zeros(g.shape, dtype=torch.bool).scatter_(-1, g.topk(n, dim=-1, sorted=False).indices, True)
    out = torch.empty(w.shape, dtype=torch.bool)
    M._group_view(out, m, dim).copy_(keep)
    return out


PATTERNS = [(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (7, 8), (2, 16), (1, 16), (4, 32), (8, 64)]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_fast_mask_equals_reference_including_ties(n, m):
    gen = torch.Generator().manual_seed(n * 100 + m)
    shapes = [((128, 64), -1), ((128, 64), 0), ((32, 64, 3, 3), 1), ((64, 32, 1, 1), 1), ((64, 16, 5, 5), 0)]
    for shape, dim in shapes:
        if shape[dim] % m:
            continue
        tied = torch.randint(-3, 4, shape, generator=gen).float()  # many ties, zeros and signed twins
        smooth = torch.randn(shape, generator=gen)
        for w in (tied, smooth):
            got = M.nm_mask(w, n, m, dim)
            assert torch.equal(got, _reference_nm_mask(w, n, m, dim)), (shape, dim)
            assert bool((M._group_view(got, m, dim).sum(-1) == n).all())  # exactly n per group
        assert torch.equal(M.nm_mask(smooth, n, m, dim), _topk_nm_mask(smooth, n, m, dim))


def test_ties_lower_index_wins_and_nan_counts_as_largest():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 2.0, -2.0, 3.0, float("nan"), 1.0, 9.0]])
    assert M.nm_mask(w, 2, 4).int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1]]


def test_batched_masks_match_per_tensor_on_every_layout():
    """One batched call over views of different layouts (slices, channels-last, a small chunk that splits layers)
    gives each tensor its own mask, and the float factors get the same values."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.randn(96, 64, generator=gen)
    conv = torch.randn(32, 16, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    conv_nchw = torch.randn(16, 32, 3, 3, generator=gen)
    point = torch.randn(32, 16, 1, 1, generator=gen)
    weights = [lin[:32], lin[32:], conv, conv_nchw, point, conv_nchw]
    dims = [-1, -1, 1, 1, 1, 0]
    masks = [torch.zeros_like(w, dtype=torch.bool) for w in weights]
    factors = [torch.full_like(w, 7.0) for w in weights]
    old = NB.RANK_CHUNK
    try:
        NB.RANK_CHUNK = 1000  # force every layer to be split over several chunks
        workspace: dict = {}
        for _ in range(2):  # the second call reuses the workspace
            M.nm_masks_(masks, weights, 2, 4, dims, workspace=workspace, factors=factors)
            for w, mask, factor, dim in zip(weights, masks, factors, dims):
                ref = _reference_nm_mask(w, 2, 4, dim)
                assert torch.equal(mask, ref)
                assert torch.equal(factor, ref.float())
    finally:
        NB.RANK_CHUNK = old


def test_gpu_mask_step_is_few_large_ops():
    """Off CPU every op is a kernel launch: ViT-B's 36 masked weights (78 M, 2:4) take a few hundred ops, not the
    ~3 000 of CPU cache-sized chunks. Counted on the meta device (no GPU here), which takes the GPU chunking."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "slice", "detach", "permute", "transpose", "select", "alias", "expand", "as_strided"}

    class Launches(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                Launches.count += 1
            return func(*args, **(kwargs or {}))

    shapes = [(2304, 768), (3072, 768), (768, 3072)] * 12  # ViT-B/16: qkv, fc1, fc2 of 12 blocks
    ws = [torch.empty(s, device="meta") for s in shapes]
    masks = [torch.empty(s, device="meta", dtype=torch.bool) for s in shapes]
    outs = [torch.empty(s, device="meta") for s in shapes]
    workspace: dict = {}
    M.nm_masks_(masks, ws, 2, 4, [1] * 36, workspace=workspace, masked=outs)  # buffers allocated
    with Launches():
        M.nm_masks_(masks, ws, 2, 4, [1] * 36, workspace=workspace, masked=outs)
    assert 36 < Launches.count < 300, Launches.count  # W * E alone is 72: the ranks add a fixed handful per chunk


_EAGER_RANK = NB._rank_keep_


@pytest.fixture
def compiled_masks(monkeypatch):
    """nm_masks_ with SPARSITY_COMPILED_MASKS=1 and no native kernel: the rank as one compiled kernel per tensor
    (here inductor's C++ instead of a GPU's Triton: the same traced graph)."""
    from sparsity import native

    monkeypatch.setenv(NB.COMPILED_MASKS_ENV, "1")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", "disabled for this test")
    assert NB._compile_failed is None

    def no_eager(*args, **kwargs):
        raise AssertionError("the eager rank ran: the compiled kernel did not take this tensor")

    monkeypatch.setattr(NB, "_rank_keep_", no_eager)


def _hard_weights(shape, dtype, gen):
    """Ties, signed twins, zeros of both signs, inf and NaN of both signs: every rule of the ranking at once."""
    w = torch.randint(-3, 4, shape, generator=gen).to(dtype)
    flat = w.view(-1)
    flat[::7], flat[::11], flat[::13] = -0.0, float("inf"), float("nan")
    flat[5::17] = -float("nan")
    return w


@pytest.mark.parametrize("dtype,layout,patterns", [
    (torch.float32, "linear", [(2, 4), (1, 4), (3, 4)]),  # n is a traced value: one graph for all three
    (torch.float32, "linear", [(1, 8), (4, 8)]),
    (torch.float32, "conv", [(2, 4), (1, 4)]),  # 3x3 taps: runs of 9 (natural layout), channels-last: runs of 1
    (torch.bfloat16, "linear", [(2, 4)]),
])
def test_compiled_rank_equals_the_reference_bit_for_bit(compiled_masks, dtype, layout, patterns):
    gen = torch.Generator().manual_seed(len(patterns))
    if layout == "linear":  # the q and k thirds of a fused qkv (row slices), a plain weight, grouped along dim 0
        qkv = _hard_weights((96, 32), dtype, gen)
        weights, dims = [qkv[:32], qkv[32:64], _hard_weights((48, 64), dtype, gen), qkv[64:]], [-1, -1, -1, 0]
    else:
        weights = [_hard_weights((16, 32, 3, 3), dtype, gen),
                   _hard_weights((32, 16, 3, 3), dtype, gen).contiguous(memory_format=torch.channels_last)]
        dims = [1, 1]
    for n, m in patterns:
        masks = [torch.zeros_like(w, dtype=torch.bool) for w in weights]  # laid out like the weight, as a layer's
        factors = [torch.full_like(w, 7.0) for w in weights]
        M.nm_masks_(masks, weights, n, m, dims, workspace={}, factors=factors)
        for w, mask, factor, dim in zip(weights, masks, factors, dims):
            ref = _reference_nm_mask(w.float(), n, m, dim)
            assert torch.equal(mask, ref), (n, m, tuple(w.shape), dim)
            assert torch.equal(factor, ref.to(dtype))
    assert NB._compile_failed is None  # and the fixture's eager rank never ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rank_on_cuda_equals_the_reference(dtype, monkeypatch):
    monkeypatch.setenv(NB.COMPILED_MASKS_ENV, "1")
    gen = torch.Generator().manual_seed(0)
    qkv, conv = _hard_weights((96, 64), dtype, gen), _hard_weights((16, 32, 3, 3), dtype, gen)
    weights, dims = [qkv[:32].cuda(), qkv[32:].cuda(), conv.cuda()], [-1, -1, 1]
    for n, m in [(2, 4), (1, 8)]:
        masks = [torch.zeros(w.shape, dtype=torch.bool, device="cuda") for w in weights]
        factors = [torch.full_like(w, 7.0) for w in weights]
        M.nm_masks_(masks, weights, n, m, dims, workspace={}, factors=factors)
        for w, mask, factor, dim in zip(weights, masks, factors, dims):
            ref = _reference_nm_mask(w.cpu().float(), n, m, dim)
            assert torch.equal(mask.cpu(), ref) and torch.equal(factor.cpu(), ref.to(dtype))
    assert NB.rank_kernel_status() == "compiled"  # no fallback to the eager ops happened
    assert any(kind[2] == "cuda" for kind in NB._compiled)  # compiled for the GPU


def test_compiled_rank_failure_falls_back_to_the_same_masks_once(compiled_masks, monkeypatch, caplog):
    monkeypatch.setattr(NB, "_rank_keep_", _EAGER_RANK)  # the fallback is what this test checks
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("Cannot find a working triton installation\nmore details")

    monkeypatch.setattr(NB, "_compile_failed", None)
    monkeypatch.setattr(NB, "_compiled_rank", lambda kind: broken)
    gen = torch.Generator().manual_seed(0)
    w = _hard_weights((64, 32), torch.float32, gen)
    with caplog.at_level("WARNING", logger="sparsity.nm_batch"):
        first, second = M.nm_mask(w, 2, 4, -1), M.nm_mask(w, 2, 4, -1)
    assert torch.equal(first, _reference_nm_mask(w, 2, 4, -1)) and torch.equal(second, first)
    assert len(calls) == 1  # not retried on every step
    assert NB._compile_failed == "RuntimeError: Cannot find a working triton installation"
    assert NB.rank_kernel_status() == f"eager (compiling failed: {NB._compile_failed})"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "unset SPARSITY_COMPILED_MASKS" in warned[0]


def test_compiled_rank_out_of_memory_is_not_a_compiler_failure(compiled_masks, monkeypatch, caplog):
    """An OOM inside the compiled kernel ranks that step with the eager ops and keeps the compiled rank on."""
    monkeypatch.setattr(NB, "_rank_keep_", _EAGER_RANK)
    monkeypatch.setattr(NB, "_compile_failed", None)
    calls = []

    def oom(*args):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(NB, "_compiled_rank", lambda kind: oom)
    w = _hard_weights((64, 32), torch.float32, torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="sparsity.nm_batch"):
        first, second = M.nm_mask(w, 2, 4, -1), M.nm_mask(w, 2, 4, -1)
    assert torch.equal(first, _reference_nm_mask(w, 2, 4, -1)) and torch.equal(second, first)
    assert len(calls) == 2 and NB._compile_failed is None and NB.rank_kernel_status() == "compiled"
    assert not caplog.records


def _mdgf_vit_after_steps(steps: int = 3) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model, recipe = _tiny("vit", "mdgf")
    ctl = sparsity.SparsityController(model, recipe, total_steps=40)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        ctl.step(step)
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    ctl.step(steps)
    return [(fqn, layer.weight_mask.clone(), layer.sparse_weight().detach().clone()) for fqn, layer in ctl.layers]


def test_controller_step_with_the_compiled_rank_equals_the_default_one(monkeypatch):
    """mdgf on a small ViT: masks and forward weights after a few steps do not depend on which kernel ranked them
    (the CPU default, native C, against the compiled rank)."""
    from sparsity import native

    default = _mdgf_vit_after_steps()
    monkeypatch.setenv(NB.COMPILED_MASKS_ENV, "1")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", "disabled for this test")
    monkeypatch.setattr(NB, "_rank_keep_", None)  # the eager rank must not be what runs
    compiled = _mdgf_vit_after_steps()
    assert NB._compile_failed is None
    assert len(default) == len(compiled) > 0
    for (fqn, mask_a, w_a), (_, mask_b, w_b) in zip(default, compiled):
        assert torch.equal(mask_a, mask_b), fqn
        assert torch.equal(w_a, w_b), fqn


@contextlib.contextmanager
def _no_host_sync():
    """Make every CPU-side read of a tensor value raise (what would be a device sync on a GPU)."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called inside controller.step")
        return raiser

    for name in names:
        setattr(torch.Tensor, name, forbid(name))
    setitem = torch.Tensor.__setitem__

    def checked_setitem(self, index, value):
        # `x[idx] = True` with tensor indices turns the Python value into a CPU tensor that a CUDA index_put_ copies
        # host-to-device, a sync (index_fill_/masked_fill_ take the scalar as is)
        idx = index if isinstance(index, tuple) else (index,)
        if isinstance(value, (bool, int, float)) and any(isinstance(i, torch.Tensor) for i in idx):
            raise AssertionError("host synchronisation on CUDA: tensor[indices] = Python scalar in controller.step")
        return setitem(self, index, value)

    torch.Tensor.__setitem__ = checked_setitem
    saved["__setitem__"] = setitem
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _tiny(kind: str, method: str, **opts):
    torch.manual_seed(0)
    if kind == "vit":
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                  num_heads=2, num_classes=10)
    else:
        model = timm.create_model("resnet18", num_classes=10)
    recipe = builtin_recipe(method, model)
    if opts:
        recipe = sparsity.recipe_from_dict({**recipe.to_dict(), **opts})
    sparsity.sparsify_(model, recipe)
    return model, recipe


@pytest.mark.parametrize("kind,method", [(k, m) for k in ("vit", "resnet") for m in METHODS
                                         if (k, m) != ("resnet", "gumbel")])  # conv gumbel: same step code, 8 s
def test_controller_step_does_no_host_sync(kind, method):
    model, recipe = _tiny(kind, method)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # build the mask factor caches outside the guard
    for k in range(3):
        with _no_host_sync():
            ctl.step(k)
        model(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_controller_step_does_no_cuda_sync(method):
    model, recipe = _tiny("vit", method)
    model.cuda()
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(0)
    model(torch.randn(2, 3, 32, 32, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    for k in range(1, 4):
        torch.cuda.set_sync_debug_mode("error")
        try:
            ctl.step(k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model(torch.randn(2, 3, 32, 32, device="cuda")).sum().backward()


@pytest.mark.parametrize("method", ["ste", "srste", "mdgf", "supermask"])
def test_mask_factor_cache_follows_every_mask_change(method):
    model, recipe = _tiny("vit", method)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(0)
    x = torch.randn(2, 3, 32, 32)
    layer = sparsity.masked_modules(model)[0][1]
    for change in ("setitem", "load_state_dict", "fill"):
        model(x)  # the cache is built from the current mask
        new = ~layer.weight_mask
        if change == "setitem":
            layer.weight_mask[:] = new
        elif change == "load_state_dict":
            sd = model.state_dict()
            sd[f"{sparsity.masked_modules(model)[0][0]}.weight_mask"] = new
            model.load_state_dict(sd)
        else:
            layer.weight_mask.fill_(True)
            new = layer.weight_mask.clone()
        assert torch.equal(layer.mask_factor(), new.to(layer.weight.dtype)), change
        e = new.to(layer.weight.dtype)
        beta = layer.sparse_beta if getattr(layer, "sparse_mode", "") == "mdgf" else 0.0
        expected = layer.weight * (e + beta * (1 - e))
        assert torch.allclose(layer.sparse_weight().detach(), expected.detach(), atol=0, rtol=0), change


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("method", ["ste", "mdgf", "gumbel"])
def test_compiled_masked_model_matches_eager(method):
    model, recipe = _tiny("vit", method, **({"decay": {"type": "exp", "coef": 0.05}} if method == "mdgf" else {}))
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(5)
    model.eval() if method == "gumbel" else model.train()  # gumbel: eval uses the argmax mask (no noise)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    eager = _loss(model, x, y)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    try:
        compiled = torch.compile(model, backend="inductor")
        loss = _loss(compiled, x, y)
    except Exception as e:  # noqa: BLE001 - no C++ toolchain: the graph capture still must work
        pytest.skip(f"inductor unavailable here ({type(e).__name__}); aot_eager covered below")
    assert torch.allclose(loss, eager, rtol=1e-4, atol=1e-5)
    loss.backward()
    for n, g in grads.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, rtol=1e-3, atol=1e-5), n


def test_compiled_aot_eager_training_steps_match_eager():
    """Several optimizer steps with the mask recomputed every step: compiled (aot_eager) and eager agree."""
    runs = []
    for backend in (None, "aot_eager"):
        model, recipe = _tiny("vit", "srste", srste_lambda=0.01)
        ctl = sparsity.SparsityController(model, recipe, total_steps=100)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        fwd = torch.compile(model, backend=backend) if backend else model
        torch.manual_seed(1)
        losses = []
        for k in range(3):
            ctl.step(k)
            loss = _loss(fwd, torch.randn(4, 3, 32, 32), torch.arange(4))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), [layer.weight_mask.clone() for _, layer in ctl.layers]))
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("method", METHODS)
def test_compile_does_not_recompile_every_step(method):
    """Per-step values (beta, tau, the noise seed, new masks) must not be baked into compiled graphs."""
    opts = {"mdgf": {"decay": {"type": "exp", "coef": 0.05}}, "gumbel": {"tau": {"start": 2.0, "end": 0.5}}}
    model, recipe = _tiny("vit", method, **opts.get(method, {}))
    ctl = sparsity.SparsityController(model, recipe, total_steps=20)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = []
    for k in range(5):
        ctl.step(k)
        loss = compiled(torch.randn(2, 3, 32, 32)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts.append(len(graphs))
    assert counts[1] == counts[-1], counts  # everything compiled by the end of step 1, nothing after


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_training_step_on_cpu(method):
    model, recipe = _tiny("vit", method)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for k in range(2):
        ctl.step(k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(4, 3, 32, 32))
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out.float(), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    for fqn, layer in ctl.layers:
        for spec in layer.slices:
            if spec.n is not None:
                assert M.weight_is_nm(layer.weight_mask[spec.start:spec.stop], spec.n, spec.m, spec.sparse_dim), fqn


def test_channels_last_masks_equal_contiguous():
    runs = []
    for channels_last in (False, True):
        model, recipe = _tiny("resnet", "ste")
        if channels_last:
            model.to(memory_format=torch.channels_last)
        ctl = sparsity.SparsityController(model, recipe, total_steps=10)
        ctl.step(0)
        x = torch.randn(2, 3, 32, 32)
        out = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        runs.append((out.detach(), [layer.weight_mask.clone() for _, layer in ctl.layers]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-4)


def test_qkv_slices_with_one_pattern_are_one_run():
    model, recipe = _tiny("vit", "ste")
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    method = ctl.method
    fqn, layer = next((f, lay) for f, lay in ctl.layers if f.endswith("attn.qkv"))
    assert method._runs(fqn, layer, None) == [(2, 4, "row", 0, layer.weight.shape[0])]


def test_bench_train_reports_every_variant(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    recipes = {m: builtin_recipe(m, model) for m in ("ste", "supermask")}
    res = bench_train("resnet18", recipes, TrainBenchSettings(img_size=32, batch_size=2, steps=2, warmup=1))
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "ste", "supermask"} and rows["dense"]["ratio"] == 1.0
    for r in rows.values():
        assert r["steps"] == 2 and r["step_ms"] > 0 and (r["masked_layers"] > 0) == (r["variant"] != "dense")
        assert abs(sum(r[f"{p}_ms"] for p in ("mask", "forward", "backward", "optimizer")) - r["step_ms"]) < 0.2 * \
            r["step_ms"] + 1.0
    json.dumps(res)  # plain types only


def test_benchmark_cli_writes_json_csv(tmp_path, capsys):
    import benchmark

    out = tmp_path / "bench"
    rc = benchmark.main(["--bench", "train", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                         "patch_size=8", "depth=1", "--img-size", "32", "--batch-size", "2", "--steps", "2",
                         "--warmup", "1", "--methods", "ste", "gumbel", "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "bench_train.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["dense", "ste", "gumbel"]
    assert [r["pattern"] for r in data["rows"]] == ["", "ff=2:4 k=2:4 q=2:4 v=2:4", "ff=2:4 q,k,v=2:4"]  # gumbel: rules
    assert (out / "bench_train.csv").read_text().splitlines()[0].startswith("variant,")
    assert "ratio" in capsys.readouterr().out


def test_benchmark_cli_bad_input_is_one_line(capsys):
    import benchmark

    assert benchmark.main(["--bench", "train", "--model", "resnet18", "--methods", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    for flags, message in ((["--steps", "0"], "--steps must be at least 1, got 0"),
                           (["--block", "0"], "--block must be at least 1, got 0"),
                           (["-b", "0"], "--batch-size must be at least 1, got 0"),
                           (["--device", "xpu"], "--device xpu: benchmark.py runs on cpu or cuda"),
                           (["--at", "1.0"], "--at must be in [0, 1)"),
                           (["--lr", "-1"], "--lr must be 0 or more, got -1.0"),
                           (["--num-classes", "0"], "--num-classes must be at least 1, got 0"),
                           (["--torchcompile", "bogus"], "--torchcompile bogus: not a torch.compile backend"),
                           (["--model-kwargs", "foo=1"], "model 'resnet18' does not accept these arguments"),
                           (["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8",
                             "depth=1", "--img-size", "30"], "cannot take the data's 3x30x30 inputs")):
        assert benchmark.main(["--bench", "train", "--model", "resnet18", "--methods", "ste", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (flags, err)
    assert benchmark.main(["--bench", "masks", "--model", "some/checkpoint.pth.tar"]) == 2
    assert "--bench masks takes a timm model name" in capsys.readouterr().err
    assert benchmark.main(["--bench", "masks", "--model", "resnet10t", "--model-kwargs", "foo=1"]) == 2
    assert "model 'resnet10t' does not accept these arguments" in capsys.readouterr().err


def test_bench_masks_times_the_pattern_asked_for(tmp_path):
    import benchmark

    assert benchmark.main(["--bench", "masks", "--model", "resnet10t", "--nm", "1:8", "--steps", "1", "--output",
                           str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_masks.json").read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["1:8"] and rows[0]["equal"] is True


def test_bench_train_times_recipes_where_the_run_is_at_and_says_what_ran():
    """At step 0 an SDGF ladder runs its first frame (8:64 on the way to 1:8) and a GMP run is still dense: the
    timed steps sit at ``at`` of the run instead, and each row names the phase and pattern that ran. The ViT's
    input size defaults to the one it was built for."""
    sdgf = sparsity.recipe_from_dict({"method": "srste", "structure_decay": "fine", "finetune_fraction": 0.1,
                                      "rules": [{"target": "ff", "n": 1, "m": 8}]})
    gmp = sparsity.recipe_from_dict({"method": "gmp", "final_sparsity": 0.75, "start_fraction": 0.1,
                                     "end_fraction": 0.6, "rules": [{"target": "ff"}]})
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1}
    rows = {}
    for at in (0.0, 0.85):
        res = bench_train("vit_tiny_patch16_224", {"sdgf": sdgf, "gmp": gmp},
                          TrainBenchSettings(img_size=32, batch_size=2, steps=1, warmup=1, at=at, model_kwargs=kwargs))
        rows[at] = {r["variant"]: r for r in res["rows"]}
    assert rows[0.0]["sdgf"]["pattern"] == "ff=8:64" and rows[0.85]["sdgf"]["pattern"] == "ff=1:8"
    assert rows[0.0]["sdgf"]["phase"] == rows[0.85]["sdgf"]["phase"] == "sparse"
    assert rows[0.85]["sdgf"]["timed_step"] == 85_000 + 1  # one warm-up, one timed step after step 85 000
    assert rows[0.0]["gmp"]["forward_sparsity"] == 0.0  # at step 0 gmp has not started pruning
    assert rows[0.85]["gmp"]["forward_sparsity"] == pytest.approx(0.75, abs=1e-3)  # past its ramp: at 75 %
    res = bench_train("vit_tiny_patch16_224", {"gmp": gmp},
                      TrainBenchSettings(batch_size=2, steps=1, warmup=1, at=0.0, model_kwargs=kwargs))
    assert res["settings"]["img_size"] == 32  # the size the ViT was built for (timm's own default: 224)


def test_benchmark_cli_train_defaults_to_the_models_input_size(tmp_path):
    import benchmark

    rc = benchmark.main(["--bench", "train", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                         "patch_size=8", "depth=1", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                         "--methods", "ste", "--output", str(tmp_path)])
    assert rc == 0  # timm's ViT built for 32 px would refuse 224 px inputs
    assert json.loads((tmp_path / "bench_train.json").read_text())["settings"]["img_size"] == 32


def test_unknown_layout_falls_back_exactly():
    w = torch.randn(8, 16, 3, 3)[:, :, :, :2]  # not dense in memory
    assert torch.equal(M.nm_mask(w, 2, 4, 1), _reference_nm_mask(w, 2, 4, 1))
    mask = torch.zeros(8, 3, 3, 16, dtype=torch.bool).permute(0, 3, 1, 2)  # a mask laid out unlike the weight
    M.nm_masks_([mask], [torch.randn(8, 16, 3, 3)], 1, 4, [1])
    assert bool((M._group_view(mask, 4, 1).sum(-1) == 1).all())


def test_layers_without_controller_use_loaded_masks():
    """validate/export build the model and load a checkpoint without a controller: the forward must use the
    loaded mask even though no cache was ever written by a mask kernel."""
    model, recipe = _tiny("vit", "ste")
    layer = sparsity.masked_modules(model)[0][1]
    layer.weight_mask.copy_(M.nm_mask(layer.weight, 2, 4))
    x = torch.randn(3, layer.in_features)
    assert torch.allclose(layer(x), F.linear(x, layer.weight * layer.weight_mask, layer.bias))
    assert isinstance(layer, nn.Linear)


def test_bench_masks_reports_which_kernel_and_equal_masks(monkeypatch):
    from sparsity import native
    from sparsity.bench_train import bench_masks

    monkeypatch.delenv(NB.COMPILED_MASKS_ENV, raising=False)
    result = bench_masks("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10},
                         patterns=((2, 4), (1, 8)), iters=1)
    assert result["settings"]["native_kernel"] == native.status()
    assert result["settings"]["rank_kernel"] == "eager"  # CPU default: what the native kernel leaves is eager
    assert [r["pattern"] for r in result["rows"]] == ["2:4", "1:8"]
    assert all(r["equal"] and r["layers"] > 0 and r["rank_ms"] > 0 for r in result["rows"])
    assert "eager_rank_ms" not in result["rows"][0]


def test_bench_masks_times_the_eager_rank_against_the_compiled_one(compiled_masks, monkeypatch):
    from sparsity.bench_train import bench_masks

    monkeypatch.setattr(NB, "_rank_keep_", _EAGER_RANK)  # the A/B runs it on purpose
    result = bench_masks("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10},
                         patterns=((2, 4),), iters=1)
    assert result["settings"]["rank_kernel"] == "compiled"
    row = result["rows"][0]
    assert row["equal"] and row["rank_ms"] > 0 and row["eager_rank_ms"] > 0
    assert os.environ[NB.COMPILED_MASKS_ENV] == "1"  # the A/B leaves the switch alone


def test_bench_masks_has_no_compiled_column_when_the_native_kernel_takes_everything(monkeypatch):
    """Float32 on CPU one native call ranks every tensor: the compiled/eager switch changes nothing, so there is
    nothing to A/B (the column used to time the same native call twice)."""
    from sparsity import native
    from sparsity.bench_train import bench_masks

    if native.kernel() is None:
        pytest.skip(f"no native kernel here: {native.status()}")
    monkeypatch.setenv(NB.COMPILED_MASKS_ENV, "1")
    monkeypatch.setattr(NB, "_compiled", {})  # the process-wide cache, empty for this test
    result = bench_masks("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10},
                         patterns=((2, 4),), iters=1)
    row = result["rows"][0]
    assert row["equal"] and "eager_rank_ms" not in row and "compiled_rank_ms" not in row
    assert not NB._compiled  # nothing was compiled


def _vit_controller(recipe: dict):
    """A tiny ViT (seed 0) sparsified by ``recipe`` with its controller (100 steps)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                              num_classes=10)
    recipe = sparsity.recipe_from_dict(recipe)
    sparsity.sparsify_(model, recipe)
    return model, sparsity.SparsityController(model, recipe, total_steps=100)


@pytest.mark.parametrize("method", ["ste", "mdgf"])
def test_replayed_mask_step_equals_planned_one_and_follows_replaced_weights(method, monkeypatch):
    """After the first step the controller replays its native kernel calls with no per-layer planning; every
    replayed step must equal a freshly planned one (masks, forward weights, MDGF's moving beta), including rows
    left dense (k, v of a qkv where only q is sparse, at another pattern than ff), and a weight whose memory is
    replaced must be planned again rather than computed into the old buffers."""
    from sparsity import native
    from sparsity.methods import nm as nm_mod

    recipe = {"method": method, "decay": {"type": "linear", "coef": 0.1},
              "rules": [{"target": ["ff"], "n": 2, "m": 4}, {"target": ["q"], "n": 1, "m": 8}]}
    (model_a, ctl_a), (model_b, ctl_b) = _vit_controller(recipe), _vit_controller(recipe)
    planned = []
    real = nm_mod.nm_masks_
    monkeypatch.setattr(nm_mod, "nm_masks_", lambda *a, **k: planned.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        with torch.no_grad():  # an optimizer-like in-place update, the same for both models
            for pa, pb in zip(model_a.parameters(), model_b.parameters()):
                delta = torch.randn(pa.shape, generator=gen) * 0.05
                pa.add_(delta)
                pb.add_(delta)
        if step == 3:  # new memory for one weight (what model.to() or param.data = ... do)
            layer_a = ctl_a.layers[0][1]
            layer_a.weight.data = layer_a.weight.data.clone()
        before = len(planned)
        ctl_a.step(step)
        planned_a = len(planned) - before
        ctl_b.method._plan, ctl_b.method._workspace = None, {}  # B plans every step, nm_masks_ included
        ctl_b.step(step)
        if native.kernel() is not None:
            assert ctl_a.method._plan is not None
            assert planned_a == (2 if step in (0, 3) else 0), step  # two patterns: ff 2:4 and q 1:8
        if method == "mdgf" and step > 0:
            assert 0 < ctl_a.method.beta < 1
        for (fqn, la), (_, lb) in zip(ctl_a.layers, ctl_b.layers):
            assert torch.equal(la.weight_mask, lb.weight_mask), (step, fqn)
            assert torch.equal(la.sparse_weight(), lb.sparse_weight()), (step, fqn)
        qkv = next(lay for f, lay in ctl_a.layers if f.endswith("attn.qkv"))
        d = qkv.weight.shape[0] // 3
        assert qkv.weight_mask[d:].all() and torch.equal(qkv.sparse_weight()[d:], qkv.weight[d:])  # k, v dense
        assert torch.equal(qkv.weight_mask[:d], sparsity.nm_mask(qkv.weight[:d], 1, 8, dim=1))
        beta = ctl_a.method.beta if method == "mdgf" else 0.0
        for fqn, layer in ctl_a.layers:  # ff at 2:4 against the formula, independently of either controller
            if "mlp" in fqn:
                w = layer.weight.detach()
                e = sparsity.nm_mask(w, 2, 4, dim=1)
                assert torch.equal(layer.weight_mask, e), (step, fqn)
                assert torch.equal(layer.sparse_weight().detach(), torch.lerp(w * beta, w, e.float())), (step, fqn)


def test_replayed_supermask_step_equals_planned_one_and_follows_replaced_tensors(monkeypatch):
    """Supermask replays its two prepared kernel calls (tile selection, expansion) once planned: every replayed step
    equals a freshly planned one while the ramp moves the kept-tile counts, q/k/v rows outside the targets stay
    dense, and replaced weight or score memory makes it plan again."""
    from sparsity import native

    recipe = {"method": "supermask", "ramp": {"start_fraction": 0.0, "end_fraction": 0.05},
              "rules": [{"target": ["ff"], "sparsity": 0.5, "tile": 8}, {"target": ["q"], "sparsity": 0.75, "tile": 4}]}
    (model_a, ctl_a), (model_b, ctl_b) = _vit_controller(recipe), _vit_controller(recipe)
    planned = []
    real = native.TileExpand.__init__
    monkeypatch.setattr(native.TileExpand, "__init__", lambda self, units: planned.append(1) or real(self, units))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    for step in range(7):
        with torch.no_grad():
            for pa, pb in zip(model_a.parameters(), model_b.parameters()):
                delta = torch.randn(pa.shape, generator=gen) * 0.05
                pa.add_(delta)
                pb.add_(delta)
        if step == 3:
            layer = ctl_a.layers[0][1]
            layer.weight.data = layer.weight.data.clone()
        if step == 5:
            layer = ctl_a.layers[1][1]
            setattr(layer, layer.score_names[0], torch.nn.Parameter(getattr(layer, layer.score_names[0]).clone()))
        before = len(planned)
        ctl_a.step(step + 1)  # the ramp starts at 0 at step 0
        planned_a = len(planned) - before
        ctl_b.method._plan = None
        ctl_b.step(step + 1)
        if native.kernel() is not None:
            assert ctl_a.method._plan is not None
            assert planned_a == (1 if step in (0, 3, 5) else 0), step
        for (fqn, la), (_, lb) in zip(ctl_a.layers, ctl_b.layers):
            assert torch.equal(la.weight_mask, lb.weight_mask), (step, fqn)
            assert torch.equal(la.sparse_weight(), lb.sparse_weight()), (step, fqn)
        assert 0 < ctl_a.method.ramp <= 1
        qkv = next(lay for f, lay in ctl_a.layers if f.endswith("attn.qkv"))
        d = qkv.weight.shape[0] // 3
        assert qkv.weight_mask[d:].all() and torch.equal(qkv.sparse_weight()[d:], qkv.weight[d:])
        kept = qkv.weight_mask[:d].float().mean().item()
        assert kept == pytest.approx(1 - 0.75 * ctl_a.method.ramp, abs=0.02)
        assert torch.equal(model_a(x), model_b(x))


@pytest.mark.parametrize("recipe", [
    {"method": "oneshot", "rules": [{"target": "linear", "n": 2, "m": 4}]},
    {"method": "gmp", "init_sparsity": 0.5, "final_sparsity": 0.5, "rules": [{"target": "linear", "sparsity": 0.5}]},
    {"method": "ste", "finetune_fraction": 0.5, "rules": [{"target": "linear", "n": 2, "m": 4}]},
], ids=["oneshot", "gmp", "ste-finetune"])
def test_a_frozen_mask_skips_the_forward_product_only_while_the_weights_are_zeroed(recipe):
    """Right after the controller zeroed the pruned weights, W is W * E bit for bit: the frozen-mask forward uses W
    itself (no weight-sized product) and the gradient is still g * E; once the weight moves (an optimizer step,
    momentum reviving a pruned weight) or in a copy (the EMA), the product runs again."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    rec = sparsity.recipe_from_dict(recipe)
    sparsity.sparsify_(model, rec)
    layer = model[0]
    ctl = sparsity.SparsityController(model, rec, total_steps=10)
    with torch.no_grad():
        layer.weight.add_(1.0)  # dense weights everywhere: the controller must zero the pruned ones
    ctl.step(8)  # frozen: oneshot from its first step, gmp between updates, ste in its fine-tune
    assert layer.pruned_are_zero()
    w_tilde = layer.sparse_weight()
    assert "ZeroedWeight" in type(w_tilde.grad_fn).__name__ and w_tilde.data_ptr() == layer.weight.data_ptr()
    x, c = torch.randn(5, 32), torch.randn(5, 16)
    out = model(x)
    factor = layer.weight_mask.float()
    assert torch.equal(out, F.linear(x, layer.weight.detach() * factor, layer.bias))
    (out * c).sum().backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.pruned_are_zero = lambda: False  # the product path on the same weights
    assert "FrozenWeight" in type(layer.sparse_weight().grad_fn).__name__
    (model(x) * c).sum().backward()
    assert torch.equal(grad, layer.weight.grad) and not grad[~layer.weight_mask].any()  # g * E, bit for bit
    del layer.pruned_are_zero
    pruned = (~layer.weight_mask).nonzero()[0].tolist()
    with torch.no_grad():
        layer.weight[tuple(pruned)] = 5.0  # momentum revived a pruned weight after the zeroing
    assert not layer.pruned_are_zero()
    assert "FrozenWeight" in type(layer.sparse_weight().grad_fn).__name__
    assert torch.equal(model(x), F.linear(x, layer.weight.detach() * factor, layer.bias))  # the product ignores it
    ctl.step(9)
    ema = copy.deepcopy(model)
    assert layer.pruned_are_zero() and not ema[0].pruned_are_zero()  # a copy's tensors are other tensors
    model.eval()
    assert not layer.pruned_are_zero()  # eval forwards multiply
    model.train()
    # torch's fused optimizers write the parameters without moving their version counters: the step hook moves them
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    before = layer.weight._version
    model(x).square().sum().backward()
    opt.step()
    assert layer.weight._version == before + 1 and not layer.pruned_are_zero()


@pytest.mark.parametrize("method", ["ste", "supermask"])
def test_a_fused_optimizer_step_stales_the_precomputed_forward_weight(method):
    """torch's fused optimizers write the parameters without moving their version counters: the forward weight the
    mask step precomputed must not outlive an optimizer step (an eval right after the last step, without a mask
    step, once used the weights of before that step). A post-step hook moves the counters of the optimizer's own
    parameters, and only those: another model's optimizer step leaves this model's caches fresh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    rule = {"target": "linear", "sparsity": 0.5, "tile": 8} if method == "supermask" else \
        {"target": "linear", "n": 2, "m": 4}
    rec = sparsity.recipe_from_dict({"method": method, "rules": [rule]})
    sparsity.sparsify_(model, rec)
    ctl = sparsity.SparsityController(model, rec, total_steps=10)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    x = torch.randn(4, 64)
    ctl.step(0)
    layer = model[0]
    other = nn.Linear(3, 3)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5, fused=True)
    other(torch.randn(2, 3)).sum().backward()
    other_opt.step()  # another model's step (the training benchmark keeps several)
    assert layer.fresh_masked_weight() is not None
    before = layer.weight._version
    model(x).square().sum().backward()
    opt.step()
    assert layer.weight._version == before + 1  # moved by the hook, not by the fused kernel
    model.eval()
    assert layer.fresh_masked_weight() is None
    with torch.no_grad():
        assert torch.allclose(model(x), F.linear(x, layer.weight * layer.weight_mask, layer.bias), atol=1e-6)
