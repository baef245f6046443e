"""Magnitude N:M methods: ``dense``, ``ste``, ``srste``, ``mdgf``, with SDGF structure decay and phases.

DESIGN.md section 4, with E the top-N-of-M mask of |W|, g = dL/dW~, t = steps since the sparse phase began:

=======  ============================  ==========================================================
method   forward W~                    gradient reaching W
=======  ============================  ==========================================================
ste      W * E                         g
srste    W * E                         g + lambda * (1 - E) * W
mdgf     W * (E + beta_t * (1 - E))    g (``mdgf_grad: ste``) or g * (E + beta_t (1 - E)) (``exact``)
frozen   W * E                         g * E   (fine-tune with ``finetune_mask: frozen``)
=======  ============================  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from .. import native
from ..layers import MaskedMixin, current_loss_divisor, current_loss_scale, frozen_weight, uncovered_rows
from ..masks import grouped_dim, nm_masks_
from ..recipe import Recipe, RecipeError
from ..schedules import DENSE, SPARSE, Phase, ladder_pattern, mdgf_beta, phase_at, sdgf_ladder
from . import KernelPlan, SparsityMethod, register_method

__all__ = ["Decay", "NMConfig", "NMMethod", "OptimizerMasks", "nm_weight", "srste_decayed_grad"]


class OptimizerMasks(NamedTuple):
    """A mask step handed to the optimizer (:meth:`NMMethod.optimizer_masks`): the prepared kernel ``batches``
    (:class:`~sparsity.native.NativeBatch`) to run with each unit's AdamW step, the forward weight's ``beta``,
    the masked layers' ``weights`` (each covered exactly by the batches' units) and ``finish()``, called once
    the kernels ran."""

    batches: list
    beta: float
    weights: list[torch.Tensor]
    finish: Callable[[], None]


@dataclass(frozen=True)
class Decay:
    """MDGF decay of the pruned weights' factor beta_t: ``step`` (0), ``linear`` or ``exp`` with ``coef``."""

    type: Literal["step", "linear", "exp"] = "exp"
    coef: float = field(default=2e-4, metadata={"check": lambda v: None if math.isfinite(v) and v > 0 else
                                                 f"must be a finite number above 0, got {v}"})


def _check_structure_decay(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v in ("none", "sparsify", "fine", "densify") else (
            f"must be none|sparsify|fine|densify or a list of [n, m] pairs, got {v!r}")
    if isinstance(v, tuple) and v and all(
        isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        for p in v
    ):
        for a, b in v:
            if not 1 <= a <= b:
                return f"pattern {a}:{b} is not valid (need 1 <= n <= m)"
        return None
    return f"must be none|sparsify|fine|densify or a list of [n, m] pairs, got {v!r}"


@dataclass(frozen=True)
class NMConfig:
    """Options of the magnitude N:M family (``ste``, ``srste``, ``mdgf``)."""

    srste_lambda: float = 2e-4
    decay: Decay = Decay()
    mdgf_grad: Literal["ste", "exact"] = "ste"
    structure_decay: str | tuple[tuple[int, int], ...] = field(
        default="none", metadata={"check": _check_structure_decay}
    )


class _NMWeight(torch.autograd.Function):
    """Forward W * (E + beta (1 - E)); backward per mode (see module docstring).

    ``factor`` is E as 0/1 in the weight's dtype (:meth:`MaskedMixin.mask_factor`): same-dtype products are the
    vectorized ones. Kept weights pass bit-exactly (W * 1, g + lambda * W * 0), as with a bool mask.
    """

    @staticmethod
    def forward(ctx, weight, factor, beta, mode: str, lam: float):
        ctx.mode, ctx.lam = mode, lam
        if mode == "srste":
            ctx.save_for_backward(weight, factor)
        elif mode == "mdgf_exact":
            ctx.save_for_backward(factor, beta)
        if mode in ("mdgf", "mdgf_exact"):
            # lerp is exact at both ends: W where E = 1, beta * W where E = 0
            return torch.lerp(weight * beta, weight, factor)
        return weight * factor

    @staticmethod
    def backward(ctx, grad):
        mode = ctx.mode
        if mode == "srste":
            weight, factor = ctx.saved_tensors
            scale = current_loss_scale(grad)  # fp16 AMP: the decay is scaled like the loss gradient
            pruned = 1 - factor if scale is None else (1 - factor).mul_(scale)  # in place: no second temporary
            return (torch.addcmul(grad, weight, pruned, value=ctx.lam / current_loss_divisor()),
                    None, None, None, None)
        if mode == "mdgf_exact":
            factor, beta = ctx.saved_tensors
            return torch.lerp(grad * beta, grad, factor), None, None, None, None
        return grad, None, None, None, None  # straight-through: g untouched, no op


class _NMFromMasked(torch.autograd.Function):
    """The same functions as :class:`_NMWeight` for ``ste``/``srste``/``mdgf`` (STE gradient), from the forward
    weight the mask kernel already wrote (:meth:`MaskedMixin.fresh_masked_weight`: ``W * E``, or for MDGF
    ``W * (E + beta (1 - E))``): the forward computes nothing.

    The output aliases that buffer (``detach()`` shares its version counter), so a backward after the buffer was
    rewritten fails loudly instead of using new values. SR-STE's ``W - W * E`` is exactly ``W * (1 - E)``: kept
    weights still pass bit-exactly.
    """

    @staticmethod
    def forward(ctx, weight, masked, mask, mode: str, lam: float):
        ctx.mode, ctx.lam = mode, lam
        if mode == "srste":
            ctx.save_for_backward(weight, masked, mask)
        return masked.detach()

    @staticmethod
    def backward(ctx, grad):
        if ctx.mode == "srste":
            weight, masked, mask = ctx.saved_tensors
            scale = current_loss_scale(grad)  # fp16 AMP: the decay is scaled like the loss gradient
            lam = ctx.lam / current_loss_divisor()  # accumulation: the decay enters each optimizer step once
            if scale is None:
                return srste_decayed_grad(grad, weight, mask, lam, masked), None, None, None, None
            pruned = torch.sub(weight, masked)  # W * (1 - E), exactly; addcmul rounds as the factor path does
            return torch.addcmul(grad, pruned, scale, value=lam), None, None, None, None
        return grad, None, None, None, None


def srste_decayed_grad(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, lam: float,
                       masked: torch.Tensor | None = None) -> torch.Tensor:
    """``g + lam * (W - W * E)``: SR-STE's gradient, in one native pass over g, W and the 1-byte mask on CPU
    float32, else two torch passes with the same roundings (``masked``: W * E when already at hand)."""
    out = native.srste_grad_native(grad, weight, mask, lam)
    if out is None:  # not float32 contiguous CPU tensors, or no kernel
        pruned = torch.sub(weight, weight * mask if masked is None else masked)  # W * (1 - E), exactly
        out = torch.addcmul(grad, pruned, pruned.new_ones(()), value=lam)
    return out


#: modes whose forward can start from the precomputed W * E
_FROM_MASKED = ("ste", "srste", "mdgf")


def nm_weight(layer: MaskedMixin) -> torch.Tensor:
    """``weight_fn`` of the N:M family: reads the layer's ``sparse_mode``, ``sparse_beta`` and ``srste_lambda``."""
    mode = layer.sparse_mode
    if mode == "dense":
        return layer.weight
    if mode == "frozen":
        return frozen_weight(layer)  # W * E, gradient g * E
    if mode in _FROM_MASKED:
        masked = layer.fresh_masked_weight(layer.sparse_beta_value if mode == "mdgf" else 0.0)
        if masked is not None:
            return _NMFromMasked.apply(layer.weight, masked, layer.weight_mask, mode, layer.srste_lambda)
    return _NMWeight.apply(layer.weight, layer.mask_factor(), layer.sparse_beta, mode, layer.srste_lambda)


def _sparse_beta(recipe: Recipe, phase: Phase) -> float:
    """The pruned weights' factor in the forward during the sparse phase: MDGF's decayed beta_t, else 0."""
    if recipe.method != "mdgf" or phase.name != SPARSE:
        return 0.0
    return mdgf_beta(phase.t, recipe.options.decay.type, recipe.options.decay.coef)


@register_method("dense")
class DenseMethod(SparsityMethod):
    """No sparsity: ``sparsify_`` changes nothing. The baseline every comparison needs."""

    swaps_layers = False
    needs = "any"


@register_method("ste", "srste", "mdgf")
class NMMethod(SparsityMethod):
    """Top-N-of-M magnitude masks recomputed every ``mask_interval`` steps, with phases and SDGF ladders."""

    Config = NMConfig

    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        super().validate(recipe)
        sd = recipe.options.structure_decay
        for i, rule in enumerate(recipe.rules):
            if rule.skip or rule.n is None:
                continue
            if isinstance(sd, tuple) and tuple(sd[-1]) != (rule.n, rule.m):
                raise RecipeError(
                    f"sparsity.structure_decay in {recipe.source or 'the recipe'} ends at {sd[-1][0]}:{sd[-1][1]} "
                    f"but rules[{i}] targets {rule.n}:{rule.m}; an explicit ladder must end at every rule's pattern"
                )

    @classmethod
    def checkpoint_note(cls, recipe: Recipe, global_step: int, total_steps: int) -> str | None:
        if recipe.method != "mdgf":
            return None
        phase = phase_at(global_step, max(total_steps, 1), recipe.dense_fraction, recipe.finetune_fraction)
        beta = _sparse_beta(recipe, phase)
        if beta <= 0.0:
            return None
        return (f"saved mid-run by mdgf at step {global_step} of {total_steps}, where the forward still weighted the "
                f"pruned weights by beta {beta:.3g}; this model has them removed (beta 0, as at the end of the run and "
                "in an export), so its top-1 differs from that epoch's summary.csv row")

    @classmethod
    def ladder(cls, recipe: Recipe, n: int, m: int) -> list[tuple[int, int]]:
        return sdgf_ladder(n, m, recipe.options.structure_decay)

    @classmethod
    def required_multiple(cls, recipe: Recipe, spec) -> int:
        import math

        return math.lcm(*(b for _, b in cls.ladder(recipe, spec.n, spec.m)))

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        layer.register_buffer("sparse_beta", torch.zeros((), dtype=layer.weight.dtype,
                                                         device=layer.weight.device), persistent=False)
        layer.sparse_beta_value = 0.0  # the same as a float: which precomputed forward weight is current
        # W * E until the controller says otherwise: the same function as the dense layer while the mask is all
        # True, and the sparse model as soon as a checkpoint's masks are loaded (validate/export need no controller).
        layer.sparse_mode = "ste"
        layer.srste_lambda = float(recipe.options.srste_lambda)
        layer.weight_fn = nm_weight

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        r = self.recipe
        self._ladders = {
            fqn: [self.ladder(r, s.n, s.m) for s in layer.slices] for fqn, layer in self.layers
        }
        self._lengths = sorted({len(lad) for lads in self._ladders.values() for lad in lads})
        self.last_update: int | None = None  # step of the last mask computation
        self.frame: tuple[int, ...] | None = None  # ladder frames (per ladder length) the masks were computed for
        self._phase: Phase | None = None
        self.frozen = False
        self.beta = 0.0
        self.phase = DENSE
        self.patterns: dict[str, str] = {}
        self._workspace: dict = {}  # scratch of the batched mask kernel, reused every step
        self._beta_set: float | None = None  # value last written to the layers' sparse_beta buffers
        self._run_cache: dict[tuple, tuple] = {}  # (fqn, ladder frame) -> (runs of one pattern each, dense rows)
        self._plan: KernelPlan | None = None  # the last all-native _compute_masks, replayed while nothing moved
        self._batches: list[native.NativeBatch] = []  # its kernel calls
        self.decay_in_optimizer = False  # srste: the optimizer adds the decay term (move_decay_to_optimizer)

    # ---- per-step logic -------------------------------------------------------------------------------------
    def _mode(self) -> str:
        if self.name == "srste":  # straight-through where the optimizer adds the decay (move_decay_to_optimizer)
            return "ste" if self.decay_in_optimizer else "srste"
        if self.name == "mdgf":
            return "mdgf_exact" if self.recipe.options.mdgf_grad == "exact" else "mdgf"
        return "ste"

    def _runs(self, fqn: str, layer: MaskedMixin, phase: Phase | None) -> list[tuple[int, int, str, int, int]]:
        """(n, m, sparse_dim, start, stop) row runs of a layer: adjacent slices with the same pattern merge, so a
        fused qkv whose thirds share N:M is one call on the whole weight (row slices are independent groups)."""
        runs: list[list] = []
        for spec, lad in sorted(zip(layer.slices, self._ladders[fqn]), key=lambda p: p[0].start):
            n, m = lad[-1] if phase is None else ladder_pattern(lad, phase)
            last = runs[-1] if runs else None
            if (last is not None and last[:3] == [n, m, spec.sparse_dim] and last[4] == spec.start
                    and (spec.sparse_dim == "row" or (spec.start - last[3]) % m == 0)):
                last[4] = spec.stop
            else:
                runs.append([n, m, spec.sparse_dim, spec.start, spec.stop])
        return [tuple(r) for r in runs]

    @torch.no_grad()
    def _compute_masks(self, phase: Phase | None, beta: float = 0.0, precompute: bool = True) -> None:
        """Masks for the patterns in force at ``phase`` (None: the target patterns), in place: one batched
        :func:`nm_masks_` call per distinct N:M over all layers, scratch reused from ``self._workspace``.
        ``precompute``: the forward reads the precomputed ``W * (E + beta (1 - E))`` (``_FROM_MASKED`` modes);
        otherwise (frozen, mdgf_exact) it multiplies by the 0/1 factor, which the pass then writes instead.

        When the last call was done wholly by native kernel calls, and the same frame, ``precompute`` and tensors
        come back (every step of a run), those calls are replayed as they are: no per-layer planning in the step.
        """
        frame = None if phase is None else self._frames(phase)
        key = (frame, precompute)
        if self._plan is not None and self._plan.replay(key, KernelPlan.guard(self.layers), beta):
            return
        self._plan, self._batches = None, []
        calls: dict[tuple[int, int], tuple[list, list, list, list, list]] = {}
        dense_copies = []  # (out, w) row ranges no pattern covers: they stay dense
        kinds = []  # per layer: True = precomputed forward weight, False = 0/1 factor
        for fqn, layer in self.layers:
            w, mask = layer.weight, layer.weight_mask
            # CPU float32 with the native kernel: the forward weight itself comes out of the mask pass and the
            # forward multiplies nothing; elsewhere (CUDA, no compiler) the pass writes the 0/1 factor, as a
            # compiled forward wants, and the forward multiplies
            layer_fast = (precompute and w.device.type == "cpu" and w.dtype == torch.float32
                          and native.kernel() is not None)  # device first: a GPU run never builds the C kernel
            kinds.append(layer_fast)
            out = layer.masked_weight_out() if layer_fast else None
            factor = None if layer_fast else layer.mask_factor()
            cached = self._run_cache.get((fqn, frame))
            if cached is None:  # the runs depend on the phase only through its ladder frame
                spans = ((s.start, s.stop) for s in layer.slices)
                cached = self._run_cache[(fqn, frame)] = (self._runs(fqn, layer, phase),
                                                         uncovered_rows(spans, w.shape[0]))
            runs, dense_rows = cached
            for n, m, sparse_dim, start, stop in runs:
                masks, weights, dims, outs, factors = calls.setdefault((n, m), ([], [], [], [], []))
                masks.append(mask[start:stop])
                weights.append(w[start:stop])
                dims.append(grouped_dim(w, sparse_dim))
                outs.append(None if out is None else out[start:stop])
                factors.append(None if factor is None else factor[start:stop])
            if out is not None:
                for start, stop in dense_rows:
                    dense_copies.append((out[start:stop], w[start:stop]))
        for out, w in dense_copies:
            out.copy_(w)
        batches = [nm_masks_(masks, weights, n, m, dims, workspace=self._workspace, factors=factors, masked=outs,
                             beta=beta) for (n, m), (masks, weights, dims, outs, factors) in calls.items()]
        self._masks_written(kinds, beta)
        if all(batch is not None for batch in batches):
            self._batches = batches
            self._plan = KernelPlan(key, KernelPlan.guard(self.layers), lambda b: all(x.run(b) for x in batches),
                                    dense_copies, lambda b: self._masks_written(kinds, b))

    def _masks_written(self, kinds: list[bool], beta: float) -> None:
        for (_, layer), layer_fast in zip(self.layers, kinds):
            if layer_fast:
                layer.masked_weight_written(beta)
            else:
                layer.mask_factor_written()

    def _frames(self, phase: Phase) -> tuple[int, ...]:
        """Frame index of every ladder length: masks must be recomputed when any of them moves."""
        window = max(phase.finetune_start - phase.sparse_start, 1)
        return tuple(min(phase.t * k // window, k - 1) for k in self._lengths)

    def _decide(self, global_step: int) -> tuple[Phase, tuple[int, ...] | None, str, float, bool]:
        """What :meth:`step` does at ``global_step``: (phase, ladder frame, layer mode, beta, masks due)."""
        r = self.recipe
        phase = phase_at(global_step, self.total_steps, r.dense_fraction, r.finetune_fraction)
        if phase.name == DENSE:
            return phase, None, "dense", 1.0, False
        if phase.name == SPARSE:
            frame = self._frames(phase)
            beta = _sparse_beta(r, phase)
            mode = self._mode()
        else:  # FINETUNE: binary mask at the target pattern, beta = 0
            frame = None
            beta = 0.0
            mode = "frozen" if r.finetune_mask == "frozen" else ("srste" if self.name == "srste" else "ste")
            mode = "ste" if mode == "srste" and self.decay_in_optimizer else mode
        due = (phase.t % r.mask_interval == 0) or self.last_update is None or frame != self.frame
        return phase, frame, mode, beta, due

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        phase, frame, mode, beta, due = self._decide(global_step)
        self.phase = phase.name
        self._phase = phase
        if phase.name == DENSE:
            for _, layer in self.layers:
                layer.sparse_mode = "dense"
            self.beta = 1.0
            return
        self.beta = beta
        if mode == "frozen":
            if not self.frozen:
                self._compute_masks(None, precompute=False)
                self.frozen = True
                self.last_update = global_step
            self.zero_pruned()  # optimizer momentum must not revive pruned weights
        elif due and self.last_update != global_step:
            self._compute_masks(phase if frame is not None else None, self.beta if mode == "mdgf" else 0.0,
                                precompute=mode in _FROM_MASKED)
            self.last_update = global_step
        self.frame = frame
        refill = self.beta != self._beta_set
        for _, layer in self.layers:
            if layer.sparse_mode != mode:
                layer.sparse_mode = mode
            if refill:
                layer.sparse_beta.fill_(self.beta)
                layer.sparse_beta_value = self.beta
        self._beta_set = self.beta

    def move_decay_to_optimizer(self) -> bool:
        """SR-STE: from now on the backward passes g straight through and the optimizer adds the decay term
        ``lambda * (1 - E) * W`` to the gradient (:meth:`optimizer_decay`), inside its own pass over the weights
        when it computes the next masks there: one weight-sized pass less per step. Only for a training loop that
        neither clips nor scales the gradient between backward and step (the decay would be clipped or scaled
        with it); with gradient accumulation it enters once per step instead of a share per micro-batch (the
        same sum, rounded once). Returns whether it applies (``srste`` only)."""
        if self.name != "srste":
            return False
        self.decay_in_optimizer = True
        return True

    def optimizer_decay(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(weight, mask, lambda) of every layer whose last forward owes the optimizer SR-STE's decay term (after
        :meth:`move_decay_to_optimizer` an ``srste`` layer runs as ``ste``); the mask is the one that forward used."""
        if not self.decay_in_optimizer:
            return []
        return [(layer.weight, layer.weight_mask, layer.srste_lambda) for _, layer in self.layers
                if layer.sparse_mode == "ste"]

    def optimizer_masks(self, global_step: int) -> OptimizerMasks | None:
        """The mask computation :meth:`step` will do at ``global_step``, for the optimizer step just before it to
        run in the same pass as its update (:class:`sparsity.optim.MaskedAdamW`), or None: only a replay of the
        prepared kernel calls (same frame, output and memory as the last computation, every row covered) qualifies.
        ``finish()`` after the kernels ran leaves the layers as ``step(global_step)`` would, which then does nothing
        more."""
        phase, frame, mode, beta, due = self._decide(global_step)
        plan = self._plan
        if (phase.name == DENSE or mode not in _FROM_MASKED or not due or self.last_update == global_step
                or plan is None or plan.copies or plan.key != (frame, True)
                or plan.guard_at != KernelPlan.guard(self.layers)):
            return None
        beta_out = beta if mode == "mdgf" else 0.0

        def finish() -> None:
            plan.written(beta_out)
            self.last_update = global_step
            self.step(global_step)

        return OptimizerMasks(self._batches, beta_out, [layer.weight for _, layer in self.layers], finish)

    def sync(self, src: MaskedMixin, dst: MaskedMixin) -> None:
        dst.weight_mask.copy_(src.weight_mask)
        dst.sparse_mode = src.sparse_mode
        dst.sparse_beta.copy_(src.sparse_beta)
        dst.sparse_beta_value = src.sparse_beta_value

    def finalize(self) -> None:
        """Leave a binary mask: masks recomputed from the final weights unless frozen, beta = 0."""
        if not self.frozen:
            with torch.no_grad():
                self._compute_masks(None, precompute=False)  # frozen: the forward multiplies by the factor
        for _, layer in self.layers:
            layer.sparse_mode = "frozen"
            layer.sparse_beta.zero_()
            layer.sparse_beta_value = 0.0
        self._beta_set = 0.0

    def current_patterns(self) -> dict[str, str]:
        """Target label -> N:M in force, e.g. {'all': '4:8', 'q': '2:8'}."""
        out: dict[str, str] = {}
        for fqn, layer in self.layers:
            for spec, lad in zip(layer.slices, self._ladders[fqn]):
                if self.phase == DENSE:
                    pat = "dense"
                else:
                    n, m = lad[-1] if self._phase is None else ladder_pattern(lad, self._phase)
                    pat = f"{n}:{m}"
                out.setdefault(spec.label, pat)
        return out

    def metrics(self) -> dict[str, Any]:
        pats = self.current_patterns()
        return {
            "phase": self.phase,
            "beta": round(self.beta, 6),
            "pattern": " ".join(f"{k}={v}" for k, v in sorted(pats.items())),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"last_update": self.last_update, "frame": None if self.frame is None else list(self.frame),
                "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = state.get("last_update")
        frame = state.get("frame")
        self.frame = None if frame is None else tuple(frame)
        self.frozen = bool(state.get("frozen", False))

