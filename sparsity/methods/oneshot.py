"""``oneshot``: N:M mask computed once from a (trained) dense model, optionally after channel permutation, then frozen.

DESIGN.md section 4: forward W~ = W * E, gradient g * E, and pruned weights stay exactly zero. At the first
``step`` of a fresh run (the engine calls ``ctl.step(start_step)`` before it builds the optimizer and the EMA copy)
the method optionally permutes channels (:mod:`sparsity.permute`, exact producer -> consumer pairs only), then
takes the top-N of every M by magnitude per slice. Every later ``step`` multiplies the weights by the mask again,
so weight decay and optimizer momentum cannot revive a pruned weight. The state dict records that the mask (and
the permutation) are done, so a resumed run neither permutes again nor recomputes the mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layers import MaskedMixin
from ..masks import weight_nm_mask
from ..recipe import Recipe
from . import SparsityMethod, frozen_masked_weight, register_method
from .gmp import check_phase_keys

__all__ = ["OneshotConfig", "OneshotMethod"]

_logger = logging.getLogger(__name__)


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be >= 0 seconds, got {v}"


@dataclass(frozen=True)
class OneshotConfig:
    """``permute``: search input-channel permutations before pruning; ``permute_time_limit``: seconds per layer."""

    permute: bool = False
    permute_time_limit: float = field(default=10.0, metadata={"check": _non_negative})


@register_method("oneshot")
class OneshotMethod(SparsityMethod):
    """Magnitude N:M mask taken once (after an optional channel permutation) and frozen."""

    Config = OneshotConfig

    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        super().validate(recipe)
        check_phase_keys(recipe, "oneshot", "the mask is taken at the first step and kept to the end")

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        layer.weight_fn = frozen_masked_weight

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.done = False  # mask computed (and weights permuted) already
        self.permuted = False
        self.permute_report: list[dict] = []

    @torch.no_grad()
    def _compute_masks(self) -> None:
        for _, layer in self.layers:
            w = layer.weight
            for s in layer.slices:
                layer.weight_mask[s.start:s.stop] = weight_nm_mask(w[s.start:s.stop], s.n, s.m, s.sparse_dim)

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        if not self.done:
            if self.recipe.options.permute:
                if global_step == 0:
                    self._permute()
                else:  # a resumed run whose state was not loaded yet: never permute weights mid-training
                    _logger.warning("oneshot: mask first computed at step %d, not 0: channel permutation skipped "
                                    "(it only runs on a fresh start, before the optimizer exists)", global_step)
            self._compute_masks()
            self.done = True
        self.zero_pruned()  # optimizer momentum and weight decay must not revive pruned weights

    def _permute(self) -> None:
        from ..permute import permute_model_

        fqns = {fqn for fqn, _ in self.layers}
        self.permute_report = permute_model_(self.model, time_limit=self.recipe.options.permute_time_limit, only=fqns)
        self.permuted = True

    @torch.no_grad()
    def finalize(self) -> None:
        if not self.done:  # never stepped: take the mask now (no permutation this late)
            self._compute_masks()
            self.done = True

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": "frozen" if self.done else "dense"}
        if self.recipe.options.permute:
            done = [r for r in self.permute_report if r["kept_before"] is not None]
            out["permuted_layers"] = sum(r["status"] == "permuted" for r in done)
            lost = sum(r["total"] - r["kept_before"] for r in done)
            won = sum(r["kept_after"] - r["kept_before"] for r in done)
            out["permute_recovered"] = round(won / lost, 6) if lost > 0 else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "permuted": self.permuted,
                "permute_report": [{k: v for k, v in r.items()} for r in self.permute_report]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))
        self.permuted = bool(state.get("permuted", False))
        self.permute_report = list(state.get("permute_report", []))
