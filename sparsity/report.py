"""Per-layer sparsity report: pattern, density, conformance and acceleration eligibility."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import MaskedMixin, masked_modules
from .masks import tile_scores, tiles_kept, weight_is_nm

__all__ = ["sparsity_report", "format_report", "overall_sparsity", "accel_eligibility", "target_problem"]


def accel_eligibility(layer: MaskedMixin) -> str:
    """Whether a commodity sparse kernel could run this layer, device aside (the pre-flight of
    :func:`sparsity.accelerate.plan_acceleration`, which adds the device checks): 2:4 semi-structured in bf16 for
    N:M layers, BSR for block-sparse ones. 1:8 and beyond have no faster kernel: at best they run as 2:4."""
    from .accelerate import layer_backend, pattern_problem

    if not layer.slices:
        return "no: dense"
    backend = layer_backend(layer)
    problem, note = pattern_problem(layer, backend, torch.bfloat16, None)
    if problem:
        return f"no: {problem}"
    return ("2:4 semi-structured (CUDA sm80+, fp16/bf16)" if backend == "semi_structured" else "BSR (CUDA)") + \
        (f"; {note}" if note else "")


@torch.no_grad()
def _conforms(layer: MaskedMixin, w: torch.Tensor) -> bool | None:
    result = None
    for s in layer.slices:
        part = w[s.start:s.stop]
        if s.n is not None:
            ok = weight_is_nm(part, s.n, s.m, s.sparse_dim)
        elif s.sparsity is not None and s.tile:  # whole tiles: no more tiles hold a nonzero than the method keeps
            used = tile_scores((part != 0).float(), s.tile) > 0  # any nonzero (NaN too) uses its tile
            ok = int(used.sum()) <= tiles_kept(used.numel(), s.sparsity)
        elif s.sparsity is not None:
            nz = float((part != 0).float().mean())
            ok = nz <= 1.0 - s.sparsity + 1.0 / max(math.sqrt(part.numel()), 1.0)
        else:
            continue
        result = ok if result is None else (result and ok)
    return result


@torch.no_grad()
def target_problem(model: nn.Module) -> str | None:
    """Why the model, as evaluated (eval mode), is not yet the sparse model its recipe asks for, or None if it is.

    The weight every masked layer's eval forward uses must satisfy each slice's final pattern: not while a dense
    warm-up runs (all-True masks), a GMP ramp is below its final sparsity, an SDGF ladder is at 4:8 on its way to
    1:8, or MDGF's ``beta`` still lets pruned weights through. The trainer ranks only such epochs for
    ``model_best.pth.tar``.
    """
    was = {id(m): m.training for m in model.modules()}
    model.eval()
    try:
        for fqn, layer in masked_modules(model):
            w = layer.sparse_weight().detach()
            if _conforms(layer, w) is False:
                pattern = layer.slices[0].pattern() if len(layer.slices) == 1 else layer.pattern_label()
                density = float((w != 0).float().mean())
                if _conforms(layer, layer.weight_mask) and torch.any(w[~layer.weight_mask] != 0):
                    # the mask is at the pattern but pruned weights still reach the forward (MDGF's decay)
                    beta = getattr(layer, "sparse_beta_value", None)
                    return (f"{fqn}'s mask is at {pattern} but its pruned weights still reach the forward"
                            + (f" (beta {beta:.3g})" if beta else "") + f", density {density:.3f}")
                return f"{fqn} is not at {pattern} yet (density {density:.3f})"
    finally:
        for m in model.modules():
            m.training = was[id(m)]
    return None


@torch.no_grad()
def sparsity_report(model: nn.Module) -> list[dict]:
    """One row per masked (or skipped) layer.

    Columns: ``fqn``, ``shape``, ``method``, ``pattern``, ``density`` (nonzero fraction of the weight the forward
    uses), ``conforms`` (that weight satisfies every slice's pattern; None for dense), ``accel``, ``note``.
    """
    rows = []
    for fqn, layer in masked_modules(model):
        w = layer.sparse_weight().detach()
        rows.append({
            "fqn": fqn,
            "shape": list(layer.weight.shape),
            "method": layer.method,
            "pattern": layer.pattern_label(),
            "density": round(float((w != 0).float().mean()), 6),
            "conforms": _conforms(layer, w),
            "accel": accel_eligibility(layer),
            "note": "",
        })
    for fqn, why in getattr(model, "sparsity_skipped", {}).items():
        mod = model.get_submodule(fqn)
        if isinstance(mod, MaskedMixin):  # partly skipped (e.g. one qkv third): note it on the masked row
            for row in rows:
                if row["fqn"] == fqn:
                    row["note"] = f"partly skipped: {why}"
            continue
        rows.append({
            "fqn": fqn, "shape": list(mod.weight.shape), "method": "skipped", "pattern": "dense",
            "density": round(float((mod.weight != 0).float().mean()), 6), "conforms": None,
            "accel": "no: dense", "note": why,
        })
    return rows


@torch.no_grad()
def overall_sparsity(model: nn.Module, selected_only: bool = True) -> float:
    """Fraction of zeros in the forward weights of the masked layers (or of all Linear/Conv2d weights)."""
    zeros = total = 0
    if selected_only:
        for _, layer in masked_modules(model):
            w = layer.sparse_weight()
            zeros += int((w == 0).sum())
            total += w.numel()
    else:
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                w = mod.sparse_weight() if isinstance(mod, MaskedMixin) else mod.weight
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / total if total else 0.0


def format_report(rows: list[dict], max_rows: int | None = None) -> str:
    """A fixed-width text table of :func:`sparsity_report` rows (for logs and CLIs)."""
    if not rows:
        return "(no sparsified layers)"
    shown = rows if max_rows is None else rows[:max_rows]
    w = max(len(r["fqn"]) for r in shown)
    pw = max([22] + [len(r["pattern"]) for r in shown])  # a qkv's three tile patterns run past 22 characters
    lines = [f"{'layer':<{w}}  {'shape':<18} {'pattern':<{pw}} {'density':>7}  conforms  accel / note"]
    for r in shown:
        conf = {True: "yes", False: "NO", None: "-"}[r["conforms"]]
        extra = r["note"] or r["accel"]
        shape = str(r["shape"])
        lines.append(f"{r['fqn']:<{w}}  {shape:<18} {r['pattern']:<{pw}} {r['density']:>7.3f}  {conf:<8}  {extra}")
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more layers")
    return "\n".join(lines)
