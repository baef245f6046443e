"""The compressed export format's per-weight codec: a masked layer's weight as row segments, each stored as N:M
values + positions, BSR components, a bitmap or dense values (see :mod:`sparsity.export` for the file format).
Decoding is bit-exact to ``weight * weight_mask``."""

from __future__ import annotations

import math
from typing import Any

import torch

from .layers import SliceSpec
from .masks import grouped_dim

__all__ = ["encode_weight", "decode_weight"]


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    flat = ((bits.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
    return flat[: math.prod(shape)].view(shape)


def _bitmap_pays(mask: torch.Tensor, element_size: int) -> bool:
    """Kept values + 1 bit per weight smaller than the dense values?"""
    return int(mask.sum()) * element_size + (mask.numel() + 7) // 8 < mask.numel() * element_size


def _encode_nm(w: torch.Tensor, mask: torch.Tensor, n: int, m: int, dim: int) -> tuple[dict | None, bool]:
    """Kept values and in-group positions (..., L/m, n), or None if some group keeps more than ``n``; and
    whether the positions imply the mask (every group keeps exactly ``n``)."""
    wg = w.movedim(dim, -1)
    mg = mask.movedim(dim, -1)
    if wg.shape[-1] % m:
        return None, False
    wg = wg.reshape(*wg.shape[:-1], -1, m)
    mg = mg.reshape(*mg.shape[:-1], -1, m)
    kept = mg.sum(-1)
    if int(kept.max()) > n:
        return None, False
    # kept positions first (ascending), then pruned fillers (value 0) where a group keeps fewer than n
    key = mg.to(torch.int32) * (2 * m) + (m - 1 - torch.arange(m, dtype=torch.int32))
    idx = key.topk(n, dim=-1).indices.sort(dim=-1).values
    values = (wg * mg).gather(-1, idx)
    parts = {"values": values.contiguous(), "indices": idx.to(torch.uint8 if m <= 256 else torch.int32).contiguous()}
    return parts, bool((kept == n).all())


def _decode_nm(parts: dict[str, torch.Tensor], shape: list[int], m: int, dim: int, dtype) -> tuple:
    values, idx = parts["values"], parts["indices"].long()
    grouped = values.new_zeros(*values.shape[:-1], m).scatter_(-1, idx, values)
    moved = shape[:dim] + shape[dim + 1:] + [shape[dim]]
    w = grouped.reshape(moved).movedim(-1, dim).to(dtype)
    mask = torch.zeros(grouped.shape, dtype=torch.bool).scatter_(-1, idx, True).reshape(moved).movedim(-1, dim)
    return w.contiguous(), mask.contiguous()


def _encode_bsr(w: torch.Tensor, mask: torch.Tensor, tile: int) -> tuple[dict | None, bool]:
    """BSR components of the 2-D view (rows, prod(rest)) keeping every tile with any True, or None if not
    tileable; and whether the kept tiles imply the mask (it is whole tiles)."""
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    if rows % tile or cols % tile:
        return None, False
    rb, cb = rows // tile, cols // tile
    blocks = (w * mask).reshape(rb, tile, cb, tile).transpose(1, 2)  # (rb, cb, t, t)
    tiles = mask.reshape(rb, tile, cb, tile).transpose(1, 2).flatten(2)  # (rb, cb, t*t)
    keep = tiles.any(-1)  # (rb, cb)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    parts = {
        "crow_indices": crow.to(torch.int32),
        "col_indices": keep.nonzero()[:, 1].to(torch.int32).contiguous(),
        "values": blocks[keep].contiguous(),
    }
    return parts, torch.equal(tiles.all(-1), keep)


def _decode_bsr(parts: dict[str, torch.Tensor], shape: list[int], tile: int, dtype) -> tuple:
    rows, cols = shape[0], math.prod(shape[1:])
    rb, cb = rows // tile, cols // tile
    counts = parts["crow_indices"].long().diff()
    row_of = torch.repeat_interleave(torch.arange(rb), counts)
    keep = torch.zeros(rb, cb, dtype=torch.bool)
    keep[row_of, parts["col_indices"].long()] = True
    blocks = parts["values"].new_zeros(rb, cb, tile, tile)
    blocks[keep] = parts["values"]  # keep.nonzero() is row-major, the order the values were written in
    w = blocks.transpose(1, 2).reshape(shape).to(dtype)
    mask = keep.repeat_interleave(tile, 0).repeat_interleave(tile, 1).reshape(shape)
    return w.contiguous(), mask


def _segments(layer) -> list[tuple[int, int, SliceSpec | None]]:
    """Row segments covering the weight: each slice, and the dense gaps between them (spec None)."""
    out, row = [], 0
    for s in sorted(layer.slices, key=lambda s: s.start):
        if s.start > row:
            out.append((row, s.start, None))
        out.append((s.start, s.stop, s))
        row = s.stop
    if row < layer.weight.shape[0]:
        out.append((row, layer.weight.shape[0], None))
    return out


@torch.no_grad()
def encode_weight(layer, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Compress one masked layer's weight: (tensors under ``key@i.*`` names, JSON layout entry)."""
    w = layer.weight.detach().cpu()
    mask = layer.weight_mask.detach().cpu()
    tensors: dict[str, torch.Tensor] = {}
    segments = []
    for i, (start, stop, spec) in enumerate(_segments(layer)):
        ws, ms = w[start:stop], mask[start:stop]
        seg: dict[str, Any] = {"start": start, "stop": stop, "format": "dense"}
        parts, implied = None, False
        if spec is not None and spec.n is not None:
            dim = grouped_dim(ws, spec.sparse_dim)
            parts, implied = _encode_nm(ws, ms, spec.n, spec.m, dim)
            if parts is not None:
                seg.update(format="nm", n=spec.n, m=spec.m, dim=dim)
            else:
                seg["note"] = f"mask is not {spec.n}:{spec.m}"
        elif spec is not None and spec.tile:
            parts, implied = _encode_bsr(ws, ms, spec.tile)
            if parts is not None:
                seg.update(format="bsr", tile=spec.tile)
            else:
                seg["note"] = f"shape {list(ws.shape)} is not divisible by tile {spec.tile}"
        if parts is None:
            all_kept = bool(ms.all())
            if not all_kept and _bitmap_pays(ms, ws.element_size()):
                parts, implied = {"values": ws[ms].contiguous(), "mask_bits": _pack_bits(ms)}, True
                seg["format"] = "bitmap"
            else:
                parts, implied = {"dense": (ws * ms).contiguous()}, all_kept
        if not implied:  # the layout alone does not give the mask back: keep its bits
            parts["mask_bits"] = _pack_bits(ms)
            seg["mask_bits"] = True
        for name, t in parts.items():
            tensors[f"{key}@{i}.{name}"] = t
        seg["bytes"] = sum(t.numel() * t.element_size() for t in parts.values())
        segments.append(seg)
    entry = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."), "segments": segments}
    return tensors, entry


def decode_weight(tensors: dict[str, torch.Tensor], key: str, entry: dict[str, Any]) -> tuple:
    """Inverse of :func:`encode_weight`: (weight, bool mask), bit-exact to ``weight * weight_mask``."""
    shape, dtype = entry["shape"], getattr(torch, entry["dtype"])
    bounds = [(seg["start"], seg["stop"]) for seg in entry["segments"]]
    edges = [0] + [b for bound in bounds for b in bound] + [shape[0]]
    if not bounds or any(edges[j] != edges[j + 1] for j in range(0, len(edges), 2)) or \
            any(a >= b for a, b in bounds):  # every row written once, in order: no row left uninitialized
        raise ValueError(f"segments {bounds} do not cover rows 0 to {shape[0]} in order")
    w = torch.empty(shape, dtype=dtype)
    mask = torch.empty(shape, dtype=torch.bool)
    for i, seg in enumerate(entry["segments"]):
        def part(name, i=i):
            return tensors[f"{key}@{i}.{name}"]

        seg_shape = [seg["stop"] - seg["start"]] + shape[1:]
        if seg["format"] == "nm":
            ws, ms = _decode_nm({"values": part("values"), "indices": part("indices")}, seg_shape, seg["m"],
                                seg["dim"], dtype)
        elif seg["format"] == "bsr":
            ws, ms = _decode_bsr({k: part(k) for k in ("crow_indices", "col_indices", "values")}, seg_shape,
                                 seg["tile"], dtype)
        elif seg["format"] == "bitmap":
            ms = _unpack_bits(part("mask_bits"), seg_shape)
            ws = torch.zeros(seg_shape, dtype=dtype)
            ws[ms] = part("values")
        else:
            ws, ms = part("dense"), torch.ones(seg_shape, dtype=torch.bool)
        if seg.get("mask_bits"):
            ms = _unpack_bits(part("mask_bits"), seg_shape)
        w[seg["start"]:seg["stop"]] = ws
        mask[seg["start"]:seg["stop"]] = ms
    return w, mask
