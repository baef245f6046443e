"""Pure mask math: tensors and ints in, bool tensors out. No module state, no device assumptions.

Conventions (DESIGN.md section 3): N:M keeps ``n`` of every ``m``; ``sparsity`` is the fraction of zeros;
masks are ``torch.bool``.
"""

from __future__ import annotations

import math

import torch

from .nm_batch import _group_view, check_nm, nm_masks_

__all__ = [
    "nm_mask",
    "nm_masks_",
    "linear_nm_mask",
    "conv_nm_mask",
    "weight_nm_mask",
    "is_nm",
    "weight_is_nm",
    "unstructured_mask",
    "tile_mask",
    "tiles_kept",
    "expand_tiles",
    "expand_tiles_",
    "check_nm",
]


def nm_mask(w: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries along ``dim``.

    Exactly ``n`` entries per group are kept (ties broken by position, lower index first; NaN counts as the
    largest magnitude).

    Args:
        w: weight of any shape; ``w.shape[dim]`` must be divisible by ``m``.
        n: entries kept per group.
        m: group size.
        dim: dimension the groups run along.

    Returns:
        bool mask with the shape of ``w``.
    """
    check_nm(n, m)
    mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    nm_masks_([mask], [w], n, m, [dim])
    return mask


def linear_nm_mask(w: torch.Tensor, n: int, m: int, sparse_dim: str = "row") -> torch.Tensor:
    """N:M mask of a Linear weight (out, in). ``row`` groups along the input dim, ``col`` along the output dim."""
    if sparse_dim not in ("row", "col"):
        raise ValueError(f"sparse_dim must be 'row' or 'col', got {sparse_dim!r}")
    return nm_mask(w, n, m, dim=-1 if sparse_dim == "row" else 0)


def conv_nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask of a Conv2d weight (O, I/g, kh, kw): groups run along input channels, never across taps.

    The weight is viewed as (O, kh, kw, I/g) as sparse tensor cores and apex ASP do.
    """
    return nm_mask(w, n, m, dim=1)


def weight_nm_mask(w: torch.Tensor, n: int, m: int, sparse_dim: str = "row") -> torch.Tensor:
    """N:M mask for a Linear (2-D) or Conv (4-D) weight with the project's grouping conventions."""
    if w.dim() == 4:
        return conv_nm_mask(w, n, m) if sparse_dim == "row" else nm_mask(w, n, m, dim=0)
    return linear_nm_mask(w, n, m, sparse_dim)


def grouped_dim(w: torch.Tensor, sparse_dim: str = "row") -> int:
    """The dimension N:M groups run along for this weight."""
    if sparse_dim == "col":
        return 0
    return 1 if w.dim() == 4 else w.dim() - 1


def is_nm(w: torch.Tensor, n: int, m: int, dim: int = -1) -> bool:
    """True if every group of ``m`` along ``dim`` has at most ``n`` nonzeros (bool tensors: True counts)."""
    check_nm(n, m)
    if w.shape[dim % w.dim()] % m:
        return False
    nz = w if w.dtype == torch.bool else w != 0
    groups = _group_view(nz, m, dim)
    return bool((groups.sum(dim=-1) <= n).all())


def weight_is_nm(w: torch.Tensor, n: int, m: int, sparse_dim: str = "row") -> bool:
    """:func:`is_nm` with the grouping conventions of :func:`weight_nm_mask`."""
    return is_nm(w, n, m, dim=grouped_dim(w, sparse_dim))


def unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * numel)`` largest ``|w|`` over the whole tensor."""
    numel = w.numel()
    keep = tiles_kept(numel, sparsity)  # the same count rule, per weight instead of per tile
    mask = torch.zeros(numel, dtype=torch.bool, device=w.device)
    if keep > 0:
        idx = w.detach().abs().flatten().topk(keep, sorted=False).indices
        mask.index_fill_(0, idx, True)  # a scalar fill: `mask[idx] = True` copies True host-to-device (a sync)
    return mask.view_as(w)


def _tile_view(x: torch.Tensor, tile: int) -> torch.Tensor:
    """2-D view of a weight for tiling: Linear (out, in) as is; Conv (O, I, kh, kw) as (O, I*kh*kw)."""
    return x.reshape(x.shape[0], -1)


def expand_tiles(tile_keep: torch.Tensor, shape: torch.Size | tuple[int, ...], tile: int) -> torch.Tensor:
    """Expand a (ceil(rows/tile), ceil(cols/tile)) tile mask to an element mask of ``shape``."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    full = tile_keep.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:rows, :cols]
    return full.reshape(shape)


def expand_tiles_(out: torch.Tensor, tile_keep: torch.Tensor, tile: int, factor: torch.Tensor | None = None) -> None:
    """In place: ``out = expand_tiles(tile_keep, out.shape, tile)`` (and ``factor`` = the same as 0/1), written
    through broadcast views when the 2-D view divides into whole tiles: no weight-sized temporaries."""
    rows = out.shape[0]
    cols = out.numel() // max(rows, 1)
    if rows % tile or cols % tile or not out.is_contiguous():
        full = expand_tiles(tile_keep, out.shape, tile)
        out.copy_(full)
        if factor is not None:
            factor.copy_(full)
        return
    rt, ct = rows // tile, cols // tile
    src = tile_keep.view(torch.uint8).view(rt, 1, ct, 1).expand(rt, tile, ct, tile)
    if factor is not None and factor.is_contiguous():
        factor.view(rt, tile, ct, tile).copy_(src)
        out.copy_(factor)  # float -> bool, same layout: the cheap conversion
    else:
        out.view(torch.uint8).view(rt, tile, ct, tile).copy_(src)
        if factor is not None:
            factor.copy_(out.view(torch.uint8))


def tile_scores(w: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean ``|w|`` per ``tile`` x ``tile`` tile of the 2-D view (partial edge tiles averaged over what they hold)."""
    w2 = _tile_view(w.detach().abs(), tile).unsqueeze(0).unsqueeze(0).float()
    pooled = torch.nn.functional.avg_pool2d(w2, tile, stride=tile, ceil_mode=True)
    return pooled[0, 0]


def tile_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask over tiles: the :func:`tiles_kept` best-scoring tiles (whole tiles only; ties to the lower index,
    NaN as the highest score).

    DESIGN.md writes the rule as "scores >= the ``sparsity``-quantile"; a quantile fixes no count (numpy's and
    torch's interpolating one keeps ``ceil`` of the share, up to one tile more, and ties keep all of their kind),
    so the count here is the one closest to ``1 - sparsity``: ``round((1 - sparsity) * num_tiles)``, at least one.
    """
    flat = scores.detach().flatten()
    keep = tiles_kept(flat.numel(), sparsity)
    if keep == 0 or keep == flat.numel():
        return torch.full_like(scores, keep > 0, dtype=torch.bool)
    # the keep-th largest value v: keep what is above it and the first (by position) of those equal to it. No
    # host synchronisation (the count of ties stays a tensor); NaN ranks as +inf, -0 equals +0.
    x = torch.nan_to_num(flat, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    v = x.kthvalue(x.numel() - keep + 1).values
    above, equal = x > v, x == v
    mask = above | (equal & (equal.cumsum(0) <= keep - above.sum()))
    return mask.view_as(scores)


def tiles_kept(num_tiles: int, sparsity: float) -> int:
    """How many of ``num_tiles`` tiles (or weights) survive ``sparsity``: ``round((1 - sparsity) * num_tiles)``
    (halves to even), the count closest to ``1 - sparsity``, but at least one while ``sparsity < 1``: the best
    tile is always at or above DESIGN.md's ``sparsity``-quantile, and a small layer (a q third of 4 tiles at 90 %)
    must not be pruned to nothing, which would silence it for good (no tile left to learn its way back)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    keep = int(round((1.0 - sparsity) * num_tiles))
    return max(keep, 1) if sparsity < 1.0 and num_tiles > 0 else keep


def block_mask(w: torch.Tensor, sparsity: float, tile: int) -> torch.Tensor:
    """Magnitude block mask: whole ``tile`` x ``tile`` tiles of the 2-D view kept by mean ``|w|``."""
    return expand_tiles(tile_mask(tile_scores(w, tile), sparsity), w.shape, tile)
