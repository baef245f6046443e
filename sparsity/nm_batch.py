"""Batched N:M ranking: the fast implementations behind :func:`sparsity.masks.nm_mask` and the training step.

:func:`nm_masks_` computes the masks of many tensors at once, in place: the native C kernel for float32 on CPU
(:mod:`sparsity.native`), else a batched rank by elementwise duels (``_rank_keep_``) or, opted in, one compiled
kernel per tensor (``_rank_store``); a stable sort past :data:`RANK_MAX_M`. Every path gives the same masks:
exactly ``n`` of every ``m`` by magnitude, ties to the lower index, NaN above inf (docs/performance.md has the
measurements behind each choice). :mod:`sparsity.masks` re-exports the public names.
"""

from __future__ import annotations

import logging
import math
import os
import types

import torch

from . import native

__all__ = ["check_nm", "nm_masks_", "rank_kernel_status", "COMPILED_MASKS_ENV", "RANK_MAX_M"]


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``1 <= n <= m`` are ints."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"N:M pattern: {name} must be an integer, got {v!r}")
    if m < 1:
        raise ValueError(f"N:M pattern: m must be >= 1, got m={m}")
    if n < 1 or n > m:
        raise ValueError(f"N:M pattern: n must be in 1..m (keep n of every m), got {n}:{m}")


#: Largest M for which N:M masks rank by pairwise comparison (m(m-1)/2 elementwise compares per group, batched
#: over layers, no sort, no host sync); larger M uses a stable sort. See docs/performance.md for the measurement.
RANK_MAX_M = 16
#: Elements per batched rank computation on CPU: the scratch (12 bytes per element, ~6 MB) stays cache-resident.
RANK_CHUNK = 1 << 19
#: The same on a GPU, where every op is a kernel launch: few large chunks (ViT-B's 78 M masked weights in 5, about
#: 250 launches; CPU-sized chunks made it about 3 200, some 30 ms of launch time per step). Scratch: ~200 MB.
RANK_CHUNK_GPU = 1 << 24
#: Blocks whose group positions are runs of at least this many elements (3x3 convs: 9) are ranked in place;
#: shorter runs (Linear, 1x1 convs: 1) are gathered into a planar layout first (measured: docs/performance.md).
NATURAL_MIN_T = 8
#: ``SPARSITY_COMPILED_MASKS=1``: rank the tensors the native kernel does not take (all of them on a GPU) by one
#: compiled kernel per tensor (``torch.compile``: Triton on CUDA), which reads the weight once and writes the mask
#: and the factor, instead of the eager duels' memory traffic (about 25 weight-sized passes for 2:4). It takes
#: what the eager rank would (m <= 16, outputs laid out like the weight). Off by default: the masks are the same
#: (tested bit for bit) but its speed is not measured on a GPU yet, and inductor's CPU code for it is 10x slower
#: than the eager ops (docs/performance.md). ``benchmark.py --bench masks --device cuda`` times both.
COMPILED_MASKS_ENV = "SPARSITY_COMPILED_MASKS"

_log = logging.getLogger(__name__)

_BITS = {
    torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16,
}
_SIGN_OFF = {torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF, torch.int16: 0x7FFF}


def _group_view(x: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """View (no copy) of ``x`` with ``dim`` moved last and split into groups of ``m``: (..., size // m, m)."""
    dim = dim % x.dim()
    size = x.shape[dim]
    if size % m:
        raise ValueError(f"dimension {dim} of size {size} is not divisible by m={m}")
    return x.movedim(dim, -1).unflatten(-1, (size // m, m))


def _block_view(x: torch.Tensor, m: int, dim: int) -> torch.Tensor | None:
    """(A, m, T) view of ``x`` in memory order with the groups of ``m`` along ``dim`` in the middle, or None.

    A Linear weight (out, in) grouped along ``in`` is (out * in / m, m, 1); a Conv2d weight (O, I, kh, kw) grouped
    along I is (O * I / m, m, kh * kw), or (O * kh * kw * I / m, m, 1) when channels-last. Every position of a
    group is then a run of T contiguous elements, which is what lets the rank kernel work without gathers.
    """
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    moved = x.permute(order)
    if not moved.is_contiguous():
        return None
    pos = order.index(dim % x.dim())
    shape = moved.shape
    return moved.view(math.prod(shape[:pos]) * (shape[pos] // m), m, math.prod(shape[pos + 1:]))


def _magnitude_key_(keys: torch.Tensor) -> None:
    """In place: weight bits -> ``|w|`` as integer bits (sign bit cleared). Same order as ``|w|``, total, NaN above
    inf (as ``topk``/``argmax`` rank it), and integer compares are exact for subnormals and signed zeros."""
    if keys.dtype in _SIGN_OFF:
        keys.bitwise_and_(_SIGN_OFF[keys.dtype])
    else:
        keys.abs_()


def _magnitude_key(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_magnitude_key_` of ``w``, written to ``out`` when given (laid out like ``w``: no copy through a
    temporary)."""
    bits = _BITS.get(w.dtype)
    if bits is None:
        return torch.abs(w, out=out)
    return torch.bitwise_and(w.view(bits), _SIGN_OFF[bits], out=out)


def _buffer(workspace: dict | None, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor of at least ``numel`` elements, reused across calls through ``workspace``."""
    if workspace is None:
        return torch.empty(numel, dtype=dtype, device=device)
    key = (name, dtype, device)
    buf = workspace.get(key)
    if buf is None or buf.numel() < numel:
        buf = workspace[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _rank_keep_(units: list[tuple], n: int, m: int, workspace: dict | None) -> None:
    """Top-n-of-m by ranks for a batch of (mask, factor or None, weight) blocks, (A, m, T) views, in place.

    Position ``i`` of a group beats ``j > i`` unless ``key[j] > key[i]`` (the lower index wins ties), and it is
    kept iff it wins at least ``m - n`` of its ``m - 1`` duels: exactly ``n`` per group. ``score[i]`` starts at
    ``n - 1 - i`` and moves by one per duel, so kept means ``score >= 0``. The duel of positions ``i`` and
    ``i + k`` is one elementwise op over the whole batch for every ``k``; every op reads and writes one dtype
    (CPU kernels vectorize only those). Blocks with long runs (T >= :data:`NATURAL_MIN_T`, e.g. 3x3 convs) are
    ranked in their own layout; short runs (Linear, 1x1) are first gathered planar, ``keys[i]`` = position ``i``
    of every group, so that the duels run over contiguous memory.
    """
    w0 = units[0][2]
    key_dtype = _BITS.get(w0.dtype, w0.dtype)
    natural = w0.shape[2] >= NATURAL_MIN_T
    total = sum(u[2].numel() for u in units)
    keys = _buffer(workspace, "key", total, key_dtype, w0.device)
    score = _buffer(workspace, "score", total, key_dtype, w0.device)
    duel = _buffer(workspace, "duel", total, key_dtype, w0.device)
    views, off = [], 0
    for _, _, w in units:  # natural: the same (A, m, T) layout; planar: (m, A * T), positions outermost
        size = w.numel()
        if natural:
            views.append(slice(off, off + size))
        else:
            views.append((off // m, off // m + size // m))
        off += size
    if natural:
        t = w0.shape[2]
        keys_b, score_b = keys.view(-1, m, t), score.view(-1, m, t)
        for (_, _, w), sl in zip(units, views):
            _magnitude_key(w, out=keys[sl].view(w.shape))
        init = _init_pattern(workspace, n, m, t, keys_b.shape[0], key_dtype, w0.device)
        score_b.copy_(init)
        for k in range(1, m):
            won = duel[:keys_b.shape[0] * (m - k) * t].view(-1, m - k, t)
            torch.gt(keys_b[:, k:], keys_b[:, :m - k], out=won)  # 1 where position i + k beats position i
            score_b[:, k:].add_(won)
            score_b[:, :m - k].sub_(won)
    else:
        keys_p, score_p = keys.view(m, -1), score.view(m, -1)
        for (_, _, w), (g0, g1) in zip(units, views):  # the key written straight into the planar layout
            _magnitude_key(w, out=keys_p[:, g0:g1].view(m, w.shape[0], w.shape[2]).transpose(0, 1))
        for i in range(m):
            score_p[i].fill_(n - 1 - i)
        cols = keys_p.shape[1]
        for k in range(1, m):
            won = duel[:(m - k) * cols].view(m - k, cols)
            torch.gt(keys_p[k:], keys_p[:m - k], out=won)
            score_p[k:].add_(won)
            score_p[:m - k].sub_(won)
    torch.ge(score, 0, out=score)  # 1 = kept
    for (mask, factor, w), view in zip(units, views):
        if natural:
            src = score[view].view(w.shape)
        else:
            g0, g1 = view
            src = score.view(m, -1)[:, g0:g1].view(m, w.shape[0], w.shape[2]).transpose(0, 1)
        if factor is not None:
            factor.copy_(src)
            mask.copy_(factor)  # float -> bool in the same layout: the cheap conversion
        else:
            mask.view(torch.uint8).copy_(src)  # bool written through uint8: the vectorized path


def _rank_store(mask: torch.Tensor, factor: torch.Tensor | None, w: torch.Tensor, n: int, m: int) -> None:
    """The rule of :func:`_rank_keep_` for one (A, m, T) block, written for the compiler: position ``i`` is kept
    iff fewer than ``n`` positions beat it (``j < i`` beats it on an equal key, ``j > i`` only on a larger one).
    The loops unroll at trace time (``m`` is static), so the compiled kernel keeps every count in registers:
    one read of ``w``, one write of ``mask`` and ``factor``, no scratch."""
    keys = _magnitude_key(w)
    pos = [keys[:, i] for i in range(m)]
    for i in range(m):
        # j < i beats i unless i is strictly larger: every duel has one winner, even for unordered (NaN) abs keys
        beaten = sum((~(pos[i] > pos[j]) if j < i else (pos[j] > pos[i])).to(torch.int32) for j in range(m) if j != i)
        keep = beaten < n
        mask[:, i].copy_(keep)
        if factor is not None:
            factor[:, i].copy_(keep)


_compiled: dict = {}  # per block kind: its compiled _rank_store
_compile_failed: str | None = None  # why the compiled rank failed, once it has: eager ops for the rest of the process


def _compiled_masks_wanted(compiled: bool | None = None) -> bool:
    """``compiled`` as given, or (None) what :data:`COMPILED_MASKS_ENV` says; never after compiling failed."""
    if compiled is None:
        compiled = os.environ.get(COMPILED_MASKS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return compiled and _compile_failed is None


def rank_kernel_status() -> str:
    """How :func:`nm_masks_` ranks the tensors the native kernel does not take: ``compiled``, ``eager``, or
    ``eager (compiling failed: ...)``."""
    if _compile_failed is not None:
        return f"eager (compiling failed: {_compile_failed})"
    return "compiled" if _compiled_masks_wanted() else "eager"


def _compiled_rank(kind: tuple):
    """The compiled :func:`_rank_store` for one kind of block (m, dtype, device, runs of 1 or longer, with or
    without a factor). Each kind gets a code object of its own: the compiler's recompile limit counts graphs per
    code object, and one run's kinds (patterns, layouts) must not crowd each other out into a failure."""
    fn = _compiled.get(kind)
    if fn is None:
        code = _rank_store.__code__.replace(co_name=f"_rank_store_{len(_compiled)}")
        fresh = types.FunctionType(code, _rank_store.__globals__, code.co_name)
        fn = _compiled[kind] = torch.compile(fresh, dynamic=True, fullgraph=True)
    return fn


def _rank_compiled_(units: list[tuple], n: int, m: int) -> bool:
    """:func:`_rank_keep_` of ``units`` by one compiled kernel per block; False (and eager ops from then on, with
    one warning) when this torch cannot compile it, e.g. no Triton for the GPU. Running out of memory is not a
    compiler failure: that step ranks with the eager ops (in chunks, less scratch) and the next one tries again."""
    global _compile_failed
    try:
        with torch.no_grad():  # grad mode is part of what a compiled graph is specialized on
            for mask, factor, w in units:
                kind = (m, w.dtype, w.device.type, w.shape[2] == 1, factor is None)
                _compiled_rank(kind)(mask, factor, w, n, m)
    except torch.OutOfMemoryError:
        _log.debug("N:M masks: out of memory in the compiled rank kernel; eager ops for this step")
        return False
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager ops give the same masks
        _compile_failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        _log.warning("N:M masks: the compiled rank kernel failed (%s); using eager ops from now on (unset %s to "
                     "skip trying)", _compile_failed, COMPILED_MASKS_ENV)
        return False
    return True


def _init_pattern(workspace: dict | None, n: int, m: int, t: int, rows: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(rows, m, t) tensor holding ``n - 1 - i`` at position ``i``: the starting score of the natural layout."""
    key = ("init", n, m, t, dtype, device)
    cached = workspace.get(key) if workspace is not None else None
    if cached is None or cached.shape[0] < rows:
        start = (n - 1 - torch.arange(m, device=device, dtype=dtype)).view(1, m, 1)
        cached = start.expand(max(rows, 1), m, t).contiguous()
        if workspace is not None:
            workspace[key] = cached
    return cached[:rows]


def _sort_keep_(mask: torch.Tensor, factor: torch.Tensor | None, groups: torch.Tensor, n: int) -> None:
    """Large M: the first maximum (n = 1) or a stable descending sort (lower index first among ties)."""
    keys = groups.view(_BITS.get(groups.dtype, groups.dtype)).clone()
    _magnitude_key_(keys)
    if n == 1:
        idx = keys.argmax(dim=-1, keepdim=True)
    else:
        idx = keys.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(-1, idx, True)
    mask.copy_(keep)
    if factor is not None:
        factor.copy_(keep)


def _native_blocks(mask, factor, out, w, m: int, dim: int) -> tuple | None:
    """(mask, factor, out, weight) as (A, m, T) block views for the native kernel, or None where it cannot take
    them (no kernel for this dtype/device/m, or an output laid out unlike the weight)."""
    wb = _block_view(w, m, dim) if m <= RANK_MAX_M else None
    if wb is None or not native.supports(wb):
        return None
    views = []
    for t in (mask, factor, out):
        b = None if t is None else _block_view(t, m, dim)
        if t is not None and (b is None or b.shape != wb.shape or (t is not mask and t.dtype != w.dtype)):
            return None
        views.append(b)
    return (*views, wb)


def nm_masks_(
    masks: list[torch.Tensor],
    weights: list[torch.Tensor],
    n: int,
    m: int,
    dims: list[int],
    workspace: dict | None = None,
    factors: list[torch.Tensor | None] | None = None,
    masked: list[torch.Tensor | None] | None = None,
    beta: float = 0.0,
    compiled: bool | None = None,
) -> native.NativeBatch | None:
    """In place, for every i: ``masks[i] = nm_mask(weights[i], n, m, dims[i])``, batched over all tensors.

    For ``m <= RANK_MAX_M`` one rank computation covers every tensor of a dtype and device (in chunks of
    :data:`RANK_CHUNK` elements on CPU, cache-sized, and :data:`RANK_CHUNK_GPU` elsewhere): a fixed handful of
    elementwise ops per chunk whatever the number of layers, no sort, no host synchronisation (or, opted in by
    :data:`COMPILED_MASKS_ENV`, one compiled kernel per tensor). Float32 CPU tensors go to the native kernel.
    Semantics are those of :func:`nm_mask`.

    Args:
        masks: bool tensors shaped like ``weights`` (views such as row slices of a layer's mask are fine).
        weights: the tensors ranked by magnitude.
        n, m: keep ``n`` of every ``m``.
        dims: the dimension the groups run along, per tensor.
        workspace: a dict the caller keeps between calls: scratch buffers are reused from it (no reallocation).
        factors: optional floating tensors shaped like ``weights`` (or None entries) that receive the same mask
            as 0/1, e.g. the masked layer's forward multiplier (:meth:`MaskedMixin.mask_factor`).
        masked: optional tensors shaped like ``weights`` (or None entries) that receive the forward weight
            ``w * (mask + beta * (1 - mask))``: ``w * mask`` for the default ``beta = 0``, MDGF's decayed weight
            otherwise. Float32 on CPU with m in {2, 4, 8} they come out of the same pass as the mask
            (:mod:`sparsity.native`).
        beta: the factor of the pruned weights in ``masked``.
        compiled: rank what the native kernel does not take with the compiled kernel (True) or the eager ops
            (False); None: as :data:`COMPILED_MASKS_ENV` says.

    Returns:
        The :class:`~sparsity.native.NativeBatch` that computed everything when one native kernel call did (its
        ``run(beta)`` repeats this call for the same tensors, with no planning), else None.
    """
    check_nm(n, m)
    factors = list(factors) if factors is not None else [None] * len(masks)
    masked = list(masked) if masked is not None else [None] * len(masks)
    if n == m:
        for mask, factor, out, w in zip(masks, factors, masked, weights):
            mask.fill_(True)
            if factor is not None:
                factor.fill_(1)
            if out is not None:
                out.copy_(w)
        return None
    beta = float(beta)
    batches: dict[tuple, list] = {}
    fused: list[tuple] = []  # units for the native kernel (float32 on CPU): one pass each
    product: list[tuple] = []  # (out, w, mask) whose w * mask the torch path still owes
    for mask, w, dim, factor, out in zip(masks, weights, dims, factors, masked):
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool with the weight's shape {tuple(w.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        w = w.detach()
        _group_view(w, m, dim)  # validates divisibility with a clear message
        blocks = _native_blocks(mask, factor, out, w, m, dim)
        if blocks is not None:
            fused.append(blocks)
            continue
        if out is not None:
            product.append((out, w, mask))
        wb = None if m > RANK_MAX_M else _block_view(w, m, dim)
        if wb is None and m <= RANK_MAX_M:  # exotic strides: rank a contiguous copy
            wb = _block_view(w.contiguous(), m, dim)
        # past RANK_MAX_M, or 1:16+ on short runs of contiguous groups (argmax beats 15 duels): sort instead
        if m > RANK_MAX_M or (n == 1 and m >= 16 and wb.shape[2] < NATURAL_MIN_T):
            _sort_keep_(_group_view(mask, m, dim), None if factor is None else _group_view(factor, m, dim),
                        _group_view(w, m, dim), n)
            continue
        mb = _block_view(mask, m, dim)
        fb = None if factor is None else _block_view(factor, m, dim)
        if mb is None or mb.shape != wb.shape or (factor is not None and (fb is None or fb.shape != wb.shape)):
            # outputs laid out unlike the weight: rank into a contiguous mask, then copy back
            tmp = torch.empty(w.shape, dtype=torch.bool, device=w.device)
            _rank_keep_([(_block_view(tmp, m, dim), None, _block_view(w.contiguous(), m, dim))], n, m, workspace)
            mask.copy_(tmp)
            if factor is not None:
                factor.copy_(tmp)
            continue
        run = wb.shape[2] if wb.shape[2] >= NATURAL_MIN_T else 0  # natural-layout chunks share one run length
        batches.setdefault((wb.dtype, wb.device, run), []).append((mb, fb, wb))
    batch = native.NativeBatch(fused, n, m) if fused and native.kernel() is not None else None
    whole = batch is not None and not batches and not product  # every tensor goes to the kernel
    if fused and (batch is None or not batch.run(beta)):  # no kernel (no compiler, SPARSITY_NATIVE=0): torch ops
        whole = False
        for mb, fb, ob, wb in fused:
            run = wb.shape[2] if wb.shape[2] >= NATURAL_MIN_T else 0
            batches.setdefault((wb.dtype, wb.device, run), []).append((mb, fb, wb))
            if ob is not None:
                product.append((ob, wb, mb))
    want_compiled = _compiled_masks_wanted(compiled)
    for (_, device, _), units in batches.items():
        if want_compiled and _rank_compiled_(units, n, m):
            continue
        limit = RANK_CHUNK if device.type == "cpu" else RANK_CHUNK_GPU
        chunk, count = [], 0
        for mask_block, factor_block, w_block in units:
            rows = max(1, limit // (m * w_block.shape[2]))  # split big layers: chunks stay cache-resident
            for start in range(0, w_block.shape[0], rows):
                piece = (mask_block[start:start + rows], None if factor_block is None else
                         factor_block[start:start + rows], w_block[start:start + rows])
                if chunk and count + piece[2].numel() > limit:
                    _rank_keep_(chunk, n, m, workspace)
                    chunk, count = [], 0
                chunk.append(piece)
                count += piece[2].numel()
        if chunk:
            _rank_keep_(chunk, n, m, workspace)
    for out, w, mask in product:
        if beta:
            torch.where(mask, w, w * beta, out=out)
        else:  # 0/1 in the weight's dtype, then times w: both vectorized same-dtype kernels
            out.copy_(mask.view(torch.uint8))
            out.mul_(w)
    return batch if whole else None
