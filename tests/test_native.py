"""The native CPU mask kernel (sparsity/csrc/nm_rank.c) against the torch implementation, bit for bit, and the
precomputed forward weight it writes (W * E, MDGF's W * (E + beta (1 - E))) against the multiply-in-forward path."""

import shutil

import pytest
import timm
import torch

import sparsity
from sparsity import masks as M
from sparsity import native
from sparsity.bench_train import builtin_recipe
from sparsity.methods.gumbel import nm_patterns as gumbel_patterns

needs_kernel = pytest.mark.skipif(native.status() != "loaded", reason=f"native kernel: {native.status()}")


@pytest.fixture
def torch_only(monkeypatch):
    """Run nm_masks_ as if no C compiler were there."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", "disabled for this test")


def _expand(units: list[tuple]) -> bool:
    """Supermask's tile expansion run once for ``units`` of (weight, mask, masked, keep, tile)."""
    return native.TileExpand(units).run()


def _topk(units: list[tuple]) -> bool:
    """The native tile selection run once for ``units`` of (scores, keep, count); False where it does not apply."""
    call = native.TileTopk.create([u[:2] for u in units])
    return call is not None and call.run(native.counts_array(u[2] for u in units))


def test_kernel_builds_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.status() == "loaded"


def _cases(gen):
    """(weight, dim) pairs: Linear, 3x3 conv (T = 9), 1x1 conv, 5x5 conv (runtime T), channels-last, grouped along
    dim 0, values with many ties / signed zeros / NaN / inf / subnormals."""
    base = [((96, 64), 1), ((48, 32, 3, 3), 1), ((64, 16, 1, 1), 1), ((16, 32, 5, 5), 1), ((64, 48), 0)]
    out = []
    for shape, dim in base:
        out.append((torch.randn(shape, generator=gen), dim))
        tied = torch.randint(-2, 3, shape, generator=gen).float()
        flat = tied.view(-1)
        flat[::11] = float("nan")
        flat[5::13] = float("inf")
        flat[7::17] = -0.0
        flat[3::19] = 1e-42  # subnormal
        out.append((tied, dim))
    out.append((torch.randn(32, 64, 3, 3, generator=gen).to(memory_format=torch.channels_last), 1))
    return out


def _run(ws, dims, n, m, beta):
    masks = [torch.zeros(w.shape, dtype=torch.bool) for w in ws]
    factors = [torch.full_like(w, 5.0) for w in ws]
    outs = [torch.full_like(w, 7.0) for w in ws]
    M.nm_masks_(masks, ws, n, m, dims, factors=factors, masked=outs, beta=beta)
    return masks, factors, outs


def _same(a, b):
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@needs_kernel
@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (7, 8)])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.7])
def test_native_equals_torch_path_bit_for_bit(n, m, beta, monkeypatch):
    gen = torch.Generator().manual_seed(m * 10 + n)
    cases = [(w, d) for w, d in _cases(gen) if w.shape[d] % m == 0]
    ws, dims = [w for w, _ in cases], [d for _, d in cases]
    got = _run(ws, dims, n, m, beta)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", "off")
    want = _run(ws, dims, n, m, beta)
    for kind, g, w in zip(("mask", "factor", "masked"), got, want):
        for a, b, x in zip(g, w, ws):
            assert _same(a, b), (kind, tuple(x.shape), n, m, beta)
    for mask, out, w in zip(got[0], got[2], ws):  # the forward weight: w where kept, beta * w where pruned
        expect = torch.where(mask, w, w * beta) if beta else w * mask
        assert _same(out, expect)


@needs_kernel
def test_native_writes_bump_version_counters():
    w = torch.randn(64, 64)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    out = torch.empty(64, 64)
    before = (mask._version, out._version)
    M.nm_masks_([mask], [w], 2, 4, [1], masked=[out])
    assert mask._version > before[0] and out._version > before[1]  # caches keyed on versions see the write


@needs_kernel
def test_kept_plan_follows_new_tensors():
    """A workspace reused between calls must not write new tensors through the old ones' memory."""
    ws = {}
    w1, w2 = torch.randn(32, 32), torch.randn(32, 32)
    m1 = torch.zeros(32, 32, dtype=torch.bool)
    M.nm_masks_([m1], [w1], 2, 4, [1], workspace=ws)
    m2 = torch.zeros(32, 32, dtype=torch.bool)
    M.nm_masks_([m2], [w2], 2, 4, [1], workspace=ws)
    assert torch.equal(m1, M.nm_mask(w1, 2, 4)) and torch.equal(m2, M.nm_mask(w2, 2, 4))


@needs_kernel
def test_thread_count_changes_nothing():
    """Work is split over as many threads as it fills (64k elements each): every count gives the same bytes."""
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(256, 128, 3, 3, generator=gen), torch.randn(384, 96, generator=gen)]  # 331 776 elements
    dims = [1, 1]
    before = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 7, 16):
            torch.set_num_threads(t)
            results.append(_run(ws, dims, 2, 4, 0.3))
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        for g, w in zip(got, results[0]):
            assert all(torch.equal(a, b) for a, b in zip(g, w))
    assert all(bool((M._group_view(mk, 4, 1).sum(-1) == 2).all()) for mk in results[0][0])


def test_torch_fallback_gives_the_same_masks(torch_only):
    w = torch.randint(-2, 3, (16, 32, 3, 3)).float()
    out = torch.empty_like(w)
    mask = torch.empty(w.shape, dtype=torch.bool)
    M.nm_masks_([mask], [w], 2, 4, [1], masked=[out], beta=0.25)
    g = M._group_view(mask, 4, 1)
    assert bool((g.sum(-1) == 2).all())
    assert torch.equal(out, torch.where(mask, w, w * 0.25))


def test_failed_build_falls_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("SPARSITY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.kernel() is None
    assert native.status().startswith("unavailable (no C compiler")
    w = torch.randn(8, 16)
    assert bool((M._group_view(M.nm_mask(w, 2, 4), 4, 1).sum(-1) == 2).all())


def test_env_var_disables_the_kernel(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("SPARSITY_NATIVE", "0")
    assert native.kernel() is None and native.status() == "disabled by SPARSITY_NATIVE=0"


def _tiny_resnet(method, **opts):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    recipe = builtin_recipe(method, model)
    recipe = sparsity.recipe_from_dict({**recipe.to_dict(), **opts})
    sparsity.sparsify_(model, recipe)
    return model, recipe


@pytest.mark.parametrize("method", ["ste", "srste", "mdgf"])
def test_precomputed_forward_weight_equals_multiplying_in_forward(method):
    """The forward from the kernel's W * E (or MDGF's decayed weight) and the one that multiplies by the mask
    factor give the same logits and the same weight gradients, bit for bit; after an optimizer step the cache is
    stale and the forward falls back by itself."""
    opts = {"decay": {"type": "exp", "coef": 0.02}} if method == "mdgf" else {}
    model, recipe = _tiny_resnet(method, **opts)
    ctl = sparsity.SparsityController(model, recipe, total_steps=1000)
    x = torch.randn(2, 3, 32, 32)
    ctl.step(40)  # mdgf: beta = exp(-0.8) = 0.45, pruned weights still flow
    layers = [layer for _, layer in ctl.layers]
    assert all(layer.fresh_masked_weight(getattr(layer, "sparse_beta_value", 0.0)) is not None for layer in layers)

    def grads():
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        return out.detach(), [layer.weight.grad.clone() for layer in layers]

    cached_out, cached_grads = grads()
    for layer in layers:  # forget the precomputed weights: the forward multiplies W by the mask factor
        layer.__dict__["_masked_cache"] = None
    plain_out, plain_grads = grads()
    assert torch.equal(cached_out, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(cached_grads, plain_grads))
    ctl.step(41)
    with torch.no_grad():
        layers[0].weight.add_(1.0)  # an optimizer step bumps the version: the precomputed weight is stale
    assert layers[0].fresh_masked_weight(layers[0].sparse_beta_value) is None
    assert layers[1].fresh_masked_weight(layers[1].sparse_beta_value) is not None


def test_backward_after_the_buffer_was_rewritten_fails_loudly():
    model, recipe = _tiny_resnet("ste")
    ctl = sparsity.SparsityController(model, recipe, total_steps=1000)
    ctl.step(0)
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    with torch.no_grad():
        for _, layer in ctl.layers:
            layer.weight.add_(0.01)
    ctl.step(1)  # rewrites the buffers the pending graph still reads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_kernel
def test_supermask_backward_after_the_next_mask_step_fails_loudly():
    """The tile masks are reused buffers, rewritten by every mask step: a pending backward must not silently take
    the new ones, even where nothing downstream saved the forward weight (here: the weight is only used by a
    matmul whose other input needs no gradient, so only the saved keep masks can tell)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    recipe = sparsity.recipe_from_dict({"method": "supermask", "rules": [{"target": "linear", "sparsity": 0.5,
                                                                          "tile": 4}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(0)
    layer = model[0]
    w_tilde = layer.sparse_weight()  # W * T(S) from the precomputed buffer
    assert layer.fresh_masked_weight() is not None
    loss = (w_tilde * torch.randn(w_tilde.shape)).sum()  # mul saves its other input, not w_tilde
    with torch.no_grad():
        getattr(layer, layer.score_names[0]).add_(torch.randn(getattr(layer, layer.score_names[0]).shape))
    ctl.step(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_copies_drop_the_caches():
    import copy

    model, recipe = _tiny_resnet("ste")
    ctl = sparsity.SparsityController(model, recipe, total_steps=1000)
    ctl.step(0)
    twin = copy.deepcopy(model)
    layer = dict(sparsity.masked_modules(twin))["layer1.0.conv1"]
    assert layer._masked_cache is None and layer._mask_factor is None
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(twin(x), model(x))


@needs_kernel
def test_portable_build_gives_the_same_results(monkeypatch, tmp_path):
    """The build without -fopenmp (compilers without OpenMP: pthreads) and without the AVX-512 paths
    (-DNM_NO_STREAMING: the plain C loops every other CPU runs) gives the same masks, forward weights, supermask
    gradients and gumbel samples, masks and gradients."""
    import ctypes

    monkeypatch.setenv("SPARSITY_CACHE_DIR", str(tmp_path))
    lib = ctypes.CDLL(str(native._compile(native._compiler(), [*native._FLAGS, "-DNM_NO_STREAMING"])))
    for name in ("nm_keep", "tile_expand", "tile_backward", "srste_grad", "tile_topk", "gumbel_forward",
                 "gumbel_backward", "gumbel_argmax_mask", "gumbel_noise_range", "usd_grad", "mask_mul",
                 "mask_mul_inplace", "nm_keep_adamw"):
        getattr(lib, name).argtypes = getattr(native.kernel(), name).argtypes
        getattr(lib, name).restype = ctypes.c_int
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(512, 256, 3, 3, generator=gen)  # big enough for two threads
    ws, dims = [w, torch.randn(96, 64, generator=gen)], [1, 1]
    want = _run(ws, dims, 2, 4, 0.3)
    rows, cols, tile = 37, 45, 8
    w2, g2 = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    keep = torch.rand(5, 6, generator=gen) > 0.5

    def tiles():
        mask, out, gw, gs = (torch.empty(rows, cols, dtype=torch.bool), torch.empty(rows, cols),
                             torch.empty(rows, cols), torch.empty(5, 6))
        assert _expand([(w2, mask, out, keep, tile)])
        assert native.tile_backward_native([(g2, w2, keep, gw, gs, tile)])
        return mask, out, gw, gs

    want_tiles = tiles()
    gw, mw = torch.randn(w.shape, generator=gen), torch.rand(w.shape, generator=gen) > 0.5
    want_srste = native.srste_grad_native(gw, w, mw, 2e-4)
    per_row = torch.rand(w.shape[0], 1, 1, 1, generator=gen)

    def masked_products():
        inplace = gw.clone()
        assert native.mask_mul_native_(inplace, mw)
        return native.mask_mul_native(w, mw), inplace, native.usd_grad_native(gw, w, mw, per_row, per_row * 2)

    want_products = masked_products()
    scores = [torch.randn(64, 72, generator=gen), torch.randint(0, 3, (9, 9), generator=gen).float()]

    def selected():
        keeps = [torch.empty(sc.shape, dtype=torch.bool) for sc in scores]
        assert _topk([(sc, k, sc.numel() // 3) for sc, k in zip(scores, keeps)])
        return keeps

    want_selected = selected()
    gl_w, gl_g = torch.randn(64, 136, 3, 3, generator=gen), torch.randn(64, 136, 3, 3, generator=gen)
    gl_logits = torch.randn(64, 3, 3, 34, 6, generator=gen)  # 34 groups a row: vectors of 16 and a tail

    def gumbel():
        unit = native.GumbelUnit.create(gl_w, gl_logits, 1, gumbel_patterns(2, 4))  # on the library in force
        assert unit.lib is native.kernel()
        out, s = unit.forward(gl_w, gl_logits, 17, 0.7)
        mask = torch.empty(gl_w.shape, dtype=torch.bool)
        assert unit.argmax_mask(gl_logits, mask)
        return (out, s, mask, *unit.backward(gl_w, s, gl_g, 0.7, want_w=True))

    want_gumbel = gumbel()
    ad_g, ad_keep = torch.randn(w.shape, generator=gen), torch.rand(w.shape, generator=gen) > 0.5

    def adamw():  # the optimizer's AdamW + SR-STE decay + masks pass (scalar path: fmaf, as the vectors)
        from sparsity.optim import _adamw_scalars

        wa, m1, m2 = w.clone(), torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 1e-3, \
            torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) * 1e-6
        keep, out = ad_keep.clone(), torch.empty(w.shape)
        batch = native.NativeBatch([(keep.view(-1, 4, 9), None, out.view(-1, 4, 9), wa.view(-1, 4, 9))], 2, 4)
        steps = (native.AdamWStep * 1)()
        steps[0].g, steps[0].m, steps[0].v = ad_g.data_ptr(), m1.data_ptr(), m2.data_ptr()
        group = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.05, "eps": 1e-8, "fused": True}
        (steps[0].wdmul, steps[0].c1, steps[0].beta2, steps[0].c2, steps[0].bc2_sqrt, steps[0].eps,
         steps[0].neg_step) = _adamw_scalars(group, 7.0)
        steps[0].lam = 2e-4
        assert batch.run_adamw(0.0, steps, [])
        return wa, m1, m2, keep, out

    want_adamw = adamw()
    monkeypatch.setattr(native, "_lib", lib)
    assert torch.get_num_threads() == 2  # conftest
    got = _run(ws, dims, 2, 4, 0.3)
    for g, w_ in zip(got, want):
        assert all(_same(a, b) for a, b in zip(g, w_))
    assert all(torch.equal(a, b) for a, b in zip(tiles(), want_tiles))
    assert torch.equal(native.srste_grad_native(gw, w, mw, 2e-4), want_srste)
    assert all(torch.equal(a, b) for a, b in zip(masked_products(), want_products))
    assert all(torch.equal(a, b) for a, b in zip(selected(), want_selected))
    assert all(torch.equal(a, b) for a, b in zip(gumbel(), want_gumbel))
    assert all(torch.equal(a, b) for a, b in zip(adamw(), want_adamw))


@needs_kernel
@pytest.mark.parametrize("rows,cols,tile", [(16, 24, 8), (13, 30, 4), (7, 5, 8), (32, 9, 1)])
def test_tile_kernels_equal_torch_formulas(rows, cols, tile):
    gen = torch.Generator().manual_seed(rows * cols + tile)
    w, g = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    keep = torch.rand(-(-rows // tile), -(-cols // tile), generator=gen) > 0.5
    mask, out = torch.empty(rows, cols, dtype=torch.bool), torch.empty(rows, cols)
    assert _expand([(w, mask, out, keep, tile)])
    factor = M.expand_tiles(keep, (rows, cols), tile)
    assert torch.equal(mask, factor) and torch.equal(out, w * factor)
    gw, gs = torch.empty(rows, cols), torch.empty(keep.shape)
    assert native.tile_backward_native([(g, w, keep, gw, gs, tile)])
    from sparsity.methods.supermask import tile_sum

    assert torch.equal(gw, g * factor)
    assert torch.allclose(gs, tile_sum(g * w, tile), rtol=1e-5, atol=1e-6)  # summation order differs


@needs_kernel
def test_tile_kernels_split_by_elements_and_give_the_same_bytes_on_every_thread_count():
    """Units of very different widths (a narrow early layer, a wide late one, a 1-row unit and a partial last tile
    row) are shared out by element count; every tile row is done by one thread, so all counts give the same bytes
    (the score sums included) and every element is written."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(8, 0, 8), (64, 72, 8), (13, 30, 4), (0, 16, 4), (1, 40, 8), (256, 1152, 8), (5, 0, 4), (9, 9, 8)]
    units = [(torch.randn(r, c, generator=gen), torch.randn(r, c, generator=gen),
              torch.rand(-(-r // t), -(-c // t), generator=gen) > 0.5, t) for r, c, t in shapes]

    def run():
        expanded, backward = [], []
        for w, _g, keep, _t in units:
            expanded.append((torch.ones(w.shape, dtype=torch.bool), torch.full(w.shape, float("nan"))))
            backward.append((torch.full(w.shape, float("nan")), torch.full(keep.shape, float("nan"))))
        assert _expand([(w, mk, out, keep, t) for (w, _, keep, t), (mk, out) in zip(units, expanded)])
        assert native.tile_backward_native([(g, w, keep, gw, gs, t)
                                            for (w, g, keep, t), (gw, gs) in zip(units, backward)])
        return [x for pair in expanded + backward for x in pair]

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 7, 16):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))
    from sparsity.methods.supermask import tile_sum

    got = results[0]
    for i, (w, g, keep, t) in enumerate(units):
        mask, out, gw, gs = got[2 * i], got[2 * i + 1], got[2 * len(units) + 2 * i], got[2 * len(units) + 2 * i + 1]
        factor = M.expand_tiles(keep, w.shape, t)
        assert torch.equal(mask, factor) and torch.equal(out, w * factor) and torch.equal(gw, g * factor)
        if w.numel():  # empty units have empty score gradients
            assert torch.allclose(gs, tile_sum(g * w, t), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_tile_selection_kernel_equals_tile_mask_on_every_thread_count():
    """One native call selects the tiles of every unit: the same bools as tile_mask (ties to the lower index, NaN
    as +inf, -0 as +0), exactly round((1 - s) * n) per unit, for all-keep/none-keep units too."""
    gen = torch.Generator().manual_seed(11)
    ties = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("nan"), -0.0, 0.0, 3.0, -1.0, float("-inf"), float("inf")])
    ties[3] = -ties[5].abs()  # a NaN with the sign bit set ranks as +inf too
    assert ties[3].view(torch.int32) < 0
    units = [(torch.randn(48, 576, generator=gen), 0.5), (torch.randint(0, 3, (40, 33), generator=gen).float(), 0.7),
             (ties, 0.6), (ties.flip(0).contiguous(), 0.25), (torch.randn(7, generator=gen), 0.0),
             (torch.randn(5, 3, generator=gen), 1.0), (torch.zeros(9, 9), 0.5), (torch.randn(1, generator=gen), 0.5)]
    want = [M.tile_mask(sc, sp) for sc, sp in units]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            keeps = [torch.empty(sc.shape, dtype=torch.bool) for sc, _ in units]
            assert _topk([(sc, k, M.tiles_kept(sc.numel(), sp)) for (sc, sp), k in zip(units, keeps)])
            for (sc, sp), got, ref in zip(units, keeps, want):
                assert torch.equal(got, ref), (tuple(sc.shape), sp, threads)
    finally:
        torch.set_num_threads(before)
    assert not _topk([(units[0][0].double(), torch.empty(48, 576, dtype=torch.bool), 5)])


@needs_kernel
def test_supermask_native_step_matches_torch_path(monkeypatch):
    """Supermask with the native tile kernels (W * E precomputed, fused backward) against the torch path, on a
    ViT whose qkv has only q and k targeted (v rows stay dense) and 8x8 tiles with edge tiles."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=72, num_heads=2,
                              num_classes=10)
    recipe = sparsity.recipe_from_dict({"method": "supermask", "rules": [
        {"target": ["ff"], "sparsity": 0.5, "tile": 8}, {"target": ["q", "k"], "sparsity": 0.6, "tile": 8}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    x = torch.randn(2, 3, 32, 32)

    def run():
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        params = [p for n, p in model.named_parameters() if p.grad is not None and ("weight" in n)]
        return out.detach(), [p.grad.clone() for p in params]

    ctl.step(0)
    assert any(getattr(layer, "_tile_keep", None) is not None and layer.fresh_masked_weight() is not None
               for _, layer in ctl.layers)
    masks = [layer.weight_mask.clone() for _, layer in ctl.layers]
    out_n, grads_n = run()
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", "off")
    for _, layer in ctl.layers:
        layer.__dict__["_masked_cache"] = None
    ctl.method._compute_masks(1.0)
    assert all(torch.equal(a, layer.weight_mask) for a, (_, layer) in zip(masks, ctl.layers))
    out_t, grads_t = run()
    assert torch.equal(out_n, out_t)
    assert len(grads_n) == len(grads_t)
    for a, b in zip(grads_n, grads_t):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ste", "mdgf"])
def test_precomputed_weight_keeps_untargeted_rows_dense(method):
    """A fused qkv with only q and k targeted: the precomputed forward weight must carry v's rows unchanged."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2,
                              num_classes=10)
    recipe = sparsity.recipe_from_dict({"method": method, "rules": [{"target": ["q", "k"], "n": 2, "m": 4}],
                                        **({"decay": {"type": "exp", "coef": 0.05}} if method == "mdgf" else {})})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(3)
    layer = dict(sparsity.masked_modules(model))["blocks.0.attn.qkv"]
    got = layer.sparse_weight().detach().clone()
    assert layer.fresh_masked_weight(layer.sparse_beta_value) is not None
    layer.__dict__["_masked_cache"] = None
    want = layer.sparse_weight().detach()
    assert torch.equal(got, want)
    assert torch.equal(got[128:], layer.weight.detach()[128:])  # v rows: dense


@needs_kernel
def test_supermask_backward_falls_back_when_the_kernel_goes_away(monkeypatch):
    model, recipe = _tiny_resnet("supermask")
    ctl = sparsity.SparsityController(model, recipe, total_steps=100)
    ctl.step(0)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    out = model(x)  # forward from the kernel's W * E ...
    monkeypatch.setattr(native, "_lib", None)  # ... backward in torch ops
    out.sum().backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(got) == len(want)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, want))


@needs_kernel
@pytest.mark.parametrize("numel", [1, 15, 16, 1000, 3 * 65536 + 7])  # tails, one and several threads
def test_srste_gradient_kernel_equals_the_torch_formula(numel):
    """g + lambda * (1 - E) * W from the one-pass kernel equals the torch ops it replaces (W - W * E, then addcmul)
    bit for bit, non-finite values included (inf, NaN, -0 and subnormals in weights and gradients)."""
    gen = torch.Generator().manual_seed(numel)
    g, w = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen) * 3
    mask = torch.rand(numel, generator=gen) > 0.5
    if numel >= 16:
        w[:4] = torch.tensor([float("inf"), float("nan"), -0.0, 1e-40])
        g[4:8] = torch.tensor([float("-inf"), float("nan"), -0.0, 3e-39])
    lam = 2e-4
    got = native.srste_grad_native(g, w, mask, lam)
    pruned = torch.sub(w, w * mask)
    want = torch.addcmul(g, pruned, pruned.new_ones(()), value=lam)
    assert got is not None and got.data_ptr() not in (g.data_ptr(), w.data_ptr())
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    assert torch.equal(got.view(torch.int32)[~got.isnan()], want.view(torch.int32)[~want.isnan()])  # signs of 0
    kept = mask & w.isfinite()
    torch.testing.assert_close(got[kept], g[kept], rtol=0, atol=0, equal_nan=True)  # kept: g passes untouched


def test_srste_gradient_kernel_declines_what_it_does_not_take():
    w = torch.randn(8, 8)
    mask = torch.rand(8, 8) > 0.5
    assert native.srste_grad_native(torch.randn(8, 8).t(), w, mask, 1e-3) is None  # not contiguous
    assert native.srste_grad_native(torch.randn(8, 8, dtype=torch.bfloat16), w, mask, 1e-3) is None
    assert native.srste_grad_native(torch.randn(8, 8), w, mask.float(), 1e-3) is None  # not a bool mask
    assert native.srste_grad_native(torch.randn(4, 16), w, mask, 1e-3) is None  # shapes differ


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (100, 37), (7, 5)])
def test_usd_gradient_kernel_equals_the_torch_formula(shape):
    """USD's search gradient g * E + coef * W * (|W| < tau) (coef and tau per output row) from the one-pass kernel
    equals the torch expression bit for bit, non-finite values and signed zeros included; other tensors decline."""
    gen = torch.Generator().manual_seed(len(shape))
    w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.5
    row = (shape[0],) + (1,) * (len(shape) - 1)
    coef, tau = torch.rand(row, generator=gen), torch.rand(row, generator=gen)
    w.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40])
    g.view(-1)[5:8] = torch.tensor([float("inf"), float("nan"), -0.0])
    got = native.usd_grad_native(g, w, mask, coef, tau)
    want = g * mask.float() + coef * w * (w.abs() < tau)
    assert got is not None and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.view(torch.int32)[~got.isnan()], want.view(torch.int32)[~want.isnan()])
    assert native.usd_grad_native(g.double(), w.double(), mask, coef, tau) is None  # float32 only
    assert native.usd_grad_native(g, w, mask, coef[:1], tau) is None  # one coefficient per row


@needs_kernel
def test_mask_product_kernels_equal_the_float_factor_product():
    """x * E from the 1-byte mask (new tensor, and in place with the version counter bumped) equals x * factor bit
    for bit: -0 for negative pruned values, NaN for non-finite ones."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(70_001, generator=gen)
    mask = torch.rand(70_001, generator=gen) > 0.5
    x[:4] = torch.tensor([float("nan"), float("inf"), -1.0, -0.0])
    mask[:4] = False
    want = x * mask.float()
    got = native.mask_mul_native(x, mask)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.view(torch.int32)[~got.isnan()], want.view(torch.int32)[~want.isnan()])
    y, before = x.clone(), None
    before = y._version
    assert native.mask_mul_native_(y, mask) and y._version > before
    assert torch.equal(y.view(torch.int32)[~y.isnan()], want.view(torch.int32)[~want.isnan()])
    assert native.mask_mul_native(x.double(), mask) is None and not native.mask_mul_native_(x[::2], mask[::2])
