"""``gmp``: gradual magnitude pruning (Zhu & Gupta), unstructured or by tiles, the baseline every method beats.

DESIGN.md section 4: forward W~ = W * E, gradient g * E. The sparsity of every slice follows the cubic curve
``s_t = s_f + (s_0 - s_f)(1 - progress)^3`` (:func:`sparsity.schedules.cubic_sparsity`) from ``init_sparsity`` at
``start_fraction`` of training to its final sparsity at ``end_fraction``; the mask is the magnitude mask at
``s_t`` (:func:`~sparsity.masks.unstructured_mask`, or :func:`~sparsity.masks.block_mask` with ``tile``),
recomputed every ``update_interval`` steps inside that window and at its end. As in the reference GMP, pruned
weights are set to zero after every step, so momentum or weight decay cannot revive them and a weight once pruned
stays pruned (the masks are nested).

``metrics()`` also reports the RMS weight change of each layer type since the previous call (``rmsi_linear``,
``rmsi_conv``; the USD seeds' RMSI), from a snapshot of the selected weights kept for that purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers import MaskedMixin, SliceSpec
from ..masks import block_mask, unstructured_mask
from ..recipe import Recipe, RecipeError, Rule
from ..schedules import cubic_sparsity
from . import SparsityMethod, frozen_masked_weight, register_method

__all__ = ["GMPConfig", "GMPMethod", "WeightChangeRMS", "WeightChangeReference", "check_phase_keys"]


def _unit(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v}"


def _sparsity(v: float | None) -> str | None:
    return None if v is None or 0.0 <= v < 1.0 else f"must be in [0, 1) (fraction of zeros), got {v}"


def _positive(v: int | None) -> str | None:
    return None if v is None or v >= 1 else f"must be >= 1, got {v}"


@dataclass(frozen=True)
class GMPConfig:
    """Options of ``gmp``; a rule's ``sparsity``/``tile`` override ``final_sparsity``/``tile`` for its layers."""

    init_sparsity: float = field(default=0.0, metadata={"check": _sparsity})
    final_sparsity: float | None = field(default=None, metadata={"check": _sparsity})
    start_fraction: float = field(default=0.0, metadata={"check": _unit})
    end_fraction: float = field(default=0.75, metadata={"check": _unit})
    update_interval: int = field(default=100, metadata={"check": _positive})
    tile: int | None = field(default=None, metadata={"check": _positive})


def check_phase_keys(recipe: Recipe, method: str, hint: str) -> None:
    """Methods with their own schedule reject the N:M family's phase keys instead of silently ignoring them."""
    where = recipe.source or "the recipe"
    for key in ("dense_fraction", "finetune_fraction"):
        if getattr(recipe, key):
            raise RecipeError(f"'sparsity.{key}' in {where} does not apply to method '{method}'; {hint}")


class WeightChangeRMS:
    """RMS of the weight change per layer type (``linear``/``conv``) since the previous call (RMSI)."""

    def __init__(self, layers: list[tuple[str, MaskedMixin]]) -> None:
        self.layers = layers
        self.snapshot = {fqn: layer.weight.detach().clone() for fqn, layer in layers}

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        sq: dict[str, float] = {}
        count: dict[str, int] = {}
        for fqn, layer in self.layers:
            kind = "linear" if isinstance(layer, nn.Linear) else "conv"
            w = layer.weight.detach()
            prev = self.snapshot.get(fqn)
            if prev is not None and prev.shape == w.shape:
                sq[kind] = sq.get(kind, 0.0) + float((w.float() - prev.float()).pow(2).sum())
                count[kind] = count.get(kind, 0) + w.numel()
            self.snapshot[fqn] = w.clone()
        return {f"rmsi_{k}": round(math.sqrt(sq[k] / count[k]), 8) for k in sorted(sq) if count[k]}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Compare the next call against ``snapshot`` (the weights a checkpoint saved from :attr:`snapshot`)."""
        for fqn, w in self.snapshot.items():
            if fqn in snapshot and snapshot[fqn].shape == w.shape:
                w.copy_(snapshot[fqn])


class WeightChangeReference:
    """For methods that report :class:`WeightChangeRMS` as ``self._rms``: its snapshot is the metric reference."""

    _rms: WeightChangeRMS

    def metric_reference(self) -> dict[str, torch.Tensor]:
        return self._rms.snapshot

    def set_metric_reference(self, ref: dict[str, torch.Tensor]) -> None:
        self._rms.restore(ref)


@register_method("gmp")
class GMPMethod(WeightChangeReference, SparsityMethod):
    """Cubic-schedule magnitude pruning, unstructured or by ``tile`` x ``tile`` blocks."""

    Config = GMPConfig
    needs = "any"

    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        o = recipe.options
        where = recipe.source or "the recipe"
        check_phase_keys(recipe, "gmp", "use start_fraction and end_fraction")
        if o.end_fraction <= o.start_fraction:
            raise RecipeError(f"'sparsity.end_fraction' ({o.end_fraction}) in {where} must be greater than "
                              f"start_fraction ({o.start_fraction}): the cubic ramp needs a window")
        for i, rule in enumerate(recipe.rules):
            if rule.skip:
                continue
            if rule.n is not None:
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}) in {where} gives n/m, but gmp prunes "
                    f"unstructured or by tiles: use sparsity: <fraction of zeros> (and tile: <size>) instead")
            final = rule.sparsity if rule.sparsity is not None else o.final_sparsity
            if final is None:
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}) in {where} has no sparsity: set "
                    f"'sparsity.final_sparsity' (e.g. 0.9) or 'sparsity' on the rule")
            if final < o.init_sparsity:
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}) in {where}: final sparsity {final} is below "
                    f"init_sparsity {o.init_sparsity}; gmp only prunes more over time")

    @classmethod
    def slice_spec(cls, recipe: Recipe, rule: Rule, label: str, start: int, stop: int, module: nn.Module) -> SliceSpec:
        o = recipe.options
        label = label if label != "all" else rule.describe()
        final = rule.sparsity if rule.sparsity is not None else o.final_sparsity
        tile = rule.tile if rule.tile is not None else o.tile
        return SliceSpec(label, start, stop, None, None, rule.sparse_dim or recipe.sparse_dim, final, tile)

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        layer.weight_fn = frozen_masked_weight

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        o = self.recipe.options
        self.start = int(round(o.start_fraction * self.total_steps))
        self.end = max(int(round(o.end_fraction * self.total_steps)), self.start)
        self.last_update: int | None = None
        self.t = 0  # the step the masks are for
        self.current = 0.0  # parameter-weighted target sparsity of the masks in force
        self._rms = WeightChangeRMS(self.layers)

    def sparsity_at(self, global_step: int, final: float) -> float:
        """Target sparsity of a slice whose final sparsity is ``final``, at ``global_step``."""
        return cubic_sparsity(global_step, self.start, self.end, self.recipe.options.init_sparsity, final)

    def _due(self, t: int) -> bool:
        if self.last_update is None:
            return True
        if self.last_update == t or not self.start <= t <= self.end:
            return False
        return (t - self.start) % self.recipe.options.update_interval == 0 or t == self.end

    @torch.no_grad()
    def _compute_masks(self, t: int) -> None:
        zeros = total = 0.0
        for _, layer in self.layers:
            w = layer.weight
            for s in layer.slices:
                part = w[s.start:s.stop]
                sp = self.sparsity_at(t, s.sparsity)
                layer.weight_mask[s.start:s.stop] = block_mask(part, sp, s.tile) if s.tile else \
                    unstructured_mask(part, sp)
                zeros += sp * part.numel()
                total += part.numel()
        self.current = zeros / total if total else 0.0
        self.last_update = t

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        self.t = global_step
        if self._due(global_step):
            self.zero_pruned()  # first: the ranking must not see what momentum revived since the last step
            self._compute_masks(global_step)
        self.zero_pruned()  # pruned weights stay exactly zero

    def finetune_start(self) -> int:
        """The ramp's end: the masks are fixed from there on."""
        return self.end

    @torch.no_grad()
    def finalize(self) -> None:
        """Prune to the final sparsity if training stopped before ``end_fraction``; masks stay fixed (the
        controller zeroes the pruned weights)."""
        if self.last_update is None or self.last_update < self.end:
            self.zero_pruned()
            self._compute_masks(self.end)
        self.t = max(self.t, self.end)

    def metrics(self) -> dict[str, Any]:
        t = self.t
        phase = "finetune" if t >= self.end else "ramp" if t >= self.start or self.current > 0 else "dense"
        out: dict[str, Any] = {"phase": phase, "target_sparsity": round(self.current, 6)}
        out.update(self._rms())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last_update": self.last_update, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = state.get("last_update")
        self.current = float(state.get("current", 0.0))
