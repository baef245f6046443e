"""``usd``: unstructured, then structured, dynamic search of a per-layer N:M scheme (DESIGN.md section 4).

Every selected unit (a layer, or one q/k/v third of a fused qkv) starts at N = M (``m``, default 16). Let t be the
optimizer step and ``T_s`` the end of the search window (total steps minus ``finetune_epochs`` epochs).

* Unstructured target: ``s_u(t) = alpha * target * t / (unstructured_fraction * T_s)``, i.e. it reaches
  ``alpha_target_sparsity x target_sparsity`` at the end of the unstructured phase (``unstructured_fraction`` of
  the search window) and keeps rising at the same rate afterwards, capped at ``1 - 1/(2M)``.
* Every ``update_interval`` steps each unit turns ``s_u`` into its own budget: ERK densities (``erk: true``,
  RigL's Erdos-Renyi-Kernel allocation over the selected units), the uniform ``1 - s_u`` (``erk: false``) or the
  fixed ``1 - erk_value`` for every unit. The unit's unstructured threshold ``tau`` keeps that fraction of its
  largest ``|W|``; per group of M (input dim for Linear, input channels for Conv, as N:M) it counts the survivors
  ``|W| >= tau``. When at least 75 % of the groups have fewer survivors than N, N steps down to the next allowed
  value (M, then the powers of two below M).
* Step-downs are applied most-ready unit first, and only while they bring the scheme's sparsity
  ``1 - sum(N/M * numel) / sum(numel)`` closer to ``target_sparsity`` (a step of size d is taken iff
  d < 2 * gap). The search stops when the scheme reaches the target, when no single step could bring it closer,
  or at ``T_s``. The scheme is then fixed: masks are taken once more, frozen, pruned weights zeroed every step
  (the fine-tune), and ``scheme.yaml`` is written (at once if ``output_dir`` is set, else at ``on_train_end``).

Forward ``W~ = W * E`` with E the top-N-of-M magnitude mask (recomputed at every update during the search); the
gradient reaching W is ``g * E + penalty * f * W * (1 - U)`` where U = ``|W| >= tau`` is the unit's unstructured
mask, so the penalty pulls the weights below the threshold (the next to go when N steps down) toward zero. The
factor ``f = (r + phi) / 2`` mixes ``r``, the share of the unit's density still above its final budget
(``clamp((N/M - d*) / (1 - d*), 0, 1)``, d* the budget at ``target_sparsity``), and ``phi``, the unit's FLOPs
relative to the largest unit (weights x output positions, measured by a forward hook; parameter counts until the
first forward). No penalty after the search (``with_weight_penalty: false`` turns it off altogether).

``scheme: path`` skips the search: every unit takes its N:M from the file (``{fqn: {n, m, density}}``, fused-qkv
thirds as ``fqn[q]``), masks are taken by magnitude at the first step and frozen.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import native
from ..checkpoint import write_atomic
from ..layers import MaskedMixin, SliceSpec, current_loss_divisor, current_loss_scale, masked_product
from ..masks import grouped_dim, weight_nm_mask
from ..recipe import Recipe, RecipeError, Rule, dump_yaml, yaml_value
from . import SparsityMethod, frozen_masked_weight, register_method
from .gmp import WeightChangeReference, WeightChangeRMS, check_phase_keys

__all__ = ["USDConfig", "USDMethod", "erk_densities", "allowed_n", "load_scheme", "write_scheme"]

_logger = logging.getLogger(__name__)

#: a unit steps N down when at least this share of its groups has fewer survivors than N
READY_SHARE = 0.75


def _fraction_open(v: float | None) -> str | None:
    return None if v is None or 0.0 < v < 1.0 else f"must be in (0, 1), got {v}"


def _erk_value(v: float | None) -> str | None:
    return None if v is None or v == -1 or 0.0 < v < 1.0 else f"must be in (0, 1), or -1/null for ERK, got {v}"


def _ge(lo: float):
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


@dataclass(frozen=True)
class USDConfig:
    """Options of ``usd`` (names follow the reference's flags: ``--M``, ``--iter_update_erk``, ``--epoch_rfap``)."""

    m: int = field(default=16, metadata={"check": _ge(2)})
    target_sparsity: float | None = field(default=None, metadata={"check": _fraction_open})
    update_interval: int = field(default=100, metadata={"check": _ge(1)})
    erk: bool = True
    erk_value: float | None = field(default=None, metadata={"check": _erk_value})
    alpha_target_sparsity: float = field(default=1.0, metadata={"check": lambda v: None if v > 0 else
                                                                 f"must be > 0, got {v}"})
    unstructured_fraction: float = field(default=0.5, metadata={"check": lambda v: None if 0 < v <= 1 else
                                                                 f"must be in (0, 1], got {v}"})
    penalty: float = field(default=2e-4, metadata={"check": _ge(0.0)})
    with_weight_penalty: bool = True
    finetune_epochs: int = field(default=10, metadata={"check": _ge(0)})
    scheme: str | None = None


# ---- pure helpers -------------------------------------------------------------------------------------------------
def allowed_n(m: int) -> list[int]:
    """N values a unit may take, largest first: M, then the powers of two below M."""
    return [m] + [2**k for k in range(m.bit_length() - 1, -1, -1) if 2**k < m]


def next_n(n: int, m: int) -> int:
    """The allowed value below ``n`` (``n`` itself at 1)."""
    lower = [v for v in allowed_n(m) if v < n]
    return lower[0] if lower else n


def erk_densities(shapes: list[tuple[int, ...]], density: float) -> list[float]:
    """RigL's Erdos-Renyi-Kernel allocation: density_l proportional to sum(shape_l) / prod(shape_l), capped at 1,
    scaled so that the parameter-weighted mean density equals ``density``."""
    numel = [math.prod(s) for s in shapes]
    if density >= 1.0:
        return [1.0] * len(shapes)
    raw = [sum(s) / n for s, n in zip(shapes, numel)]
    dense: set[int] = set()
    while True:
        budget = density * sum(numel) - sum(numel[i] for i in dense)
        denom = sum(raw[i] * numel[i] for i in range(len(shapes)) if i not in dense)
        eps = max(budget, 0.0) / denom if denom > 0 else 0.0
        grow = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not grow:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= grow


def _threshold(a: torch.Tensor, density: float) -> torch.Tensor:
    """The ``|w|`` value the top ``round(density * numel)`` entries of ``a = |w|`` reach (0-d tensor)."""
    k = int(round(density * a.numel()))
    if k >= a.numel():
        return torch.zeros((), dtype=a.dtype, device=a.device)
    if k <= 0:
        return torch.full((), float("inf"), dtype=a.dtype, device=a.device)
    return a.flatten().kthvalue(a.numel() - k + 1).values


def _scheme_path(recipe: Recipe) -> Path:
    p = Path(recipe.options.scheme)
    if not p.is_absolute() and recipe.source:
        near = Path(recipe.source).parent / p
        if near.is_file():
            return near
    return p


def load_scheme(path: str | os.PathLike, where: str = "") -> dict[str, tuple[int, int]]:
    """Read a ``scheme.yaml`` (``layers: {fqn: {n, m, density}}``, or that mapping alone) into ``{key: (n, m)}``."""
    path = Path(path)
    ctx = f" (sparsity.scheme{' in ' + where if where else ''})"
    if not path.is_file():
        raise RecipeError(f"scheme file {path}{ctx} does not exist; give the scheme.yaml a usd search wrote")
    try:
        data = yaml_value(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"scheme file {path}{ctx} is not valid YAML: {e}") from None
    layers = data.get("layers", data) if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise RecipeError(f"scheme file {path}{ctx} must map layer names to {{n, m}} (under 'layers:')")
    out: dict[str, tuple[int, int]] = {}
    for key, v in layers.items():
        n, m = (v.get("n"), v.get("m")) if isinstance(v, dict) else (None, None)
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (n, m)) and 1 <= n <= m
        if not ok:
            raise RecipeError(f"scheme file {path}{ctx}: entry {key!r} must be {{n: <int>, m: <int>}} with "
                              f"1 <= n <= m, got {v!r}")
        out[str(key)] = (n, m)
    return out


def write_scheme(path: str | os.PathLike, layers: dict[str, tuple[int, int]], extra: dict | None = None) -> Path:
    """Write ``scheme.yaml`` atomically: ``{**extra, 'layers': {key: {n, m, density}}}``."""
    path = Path(path)
    doc = dict(extra or {})
    doc["layers"] = {k: {"n": n, "m": m, "density": round(n / m, 6)} for k, (n, m) in layers.items()}
    write_atomic(path, lambda f: dump_yaml(doc, f, sort_keys=False, default_flow_style=None), mode="w")
    return path


# ---- forward / backward -------------------------------------------------------------------------------------------
class _USDWeight(torch.autograd.Function):
    """Forward W * E; backward g * E + coef * W * (|W| < tau) (coef, tau per output row; E as the 0/1 factor, or on
    CPU the bool mask, in one native pass with the same values)."""

    @staticmethod
    def forward(ctx, weight, mask, coef, tau, bool_mask):
        ctx.save_for_backward(weight, mask, coef, tau, bool_mask)
        return masked_product(weight, mask, bool_mask)

    @staticmethod
    def backward(ctx, grad):
        weight, mask, coef, tau, bool_mask = ctx.saved_tensors
        scale = current_loss_scale(grad)  # fp16 AMP: the penalty is scaled like the loss gradient
        if scale is not None:
            coef = coef * scale  # per row: no weight-sized pass for the scale
        if current_loss_divisor() != 1:  # accumulation: the penalty enters each optimizer step once
            coef = coef / current_loss_divisor()
        out = native.usd_grad_native(grad, weight, bool_mask, coef, tau)
        if out is None:  # not float32 contiguous CPU tensors, or no kernel: six torch passes, the same values
            out = grad * mask + coef * weight * (weight.abs() < tau)
        return out, None, None, None, None


def usd_weight(layer: MaskedMixin) -> torch.Tensor:
    """``weight_fn`` of ``usd``: the penalized search form while ``layer.usd_penalize``, else plain W * E / g * E."""
    if layer.usd_penalize:
        return _USDWeight.apply(layer.weight, layer.mask_factor(), layer.usd_coef, layer.usd_tau, layer.weight_mask)
    return frozen_masked_weight(layer)


def _record_positions(mod: nn.Module, inputs, output) -> None:
    """Forward hook: output positions of this layer in the batch (for its FLOPs share)."""
    if isinstance(output, torch.Tensor) and output.dim() >= 1:
        channels = output.shape[1] if isinstance(mod, nn.Conv2d) else output.shape[-1]
        mod.usd_positions = output.numel() // max(int(channels), 1)


def _infer_slices(mod: nn.Module, incompatible_keys) -> None:
    """Load post-hook: after masks are loaded, each slice's n is the largest kept count per group of its mask."""
    new = []
    for s in mod.slices:
        part = mod.weight_mask[s.start:s.stop]
        gdim = grouped_dim(part, s.sparse_dim)
        counts = part.movedim(gdim, -1).reshape(-1, s.m).sum(-1)
        new.append(replace(s, n=max(int(counts.max()), 1)) if counts.numel() else s)
    mod.slices = tuple(new)


@dataclass
class _Unit:
    key: str
    fqn: str
    layer: MaskedMixin
    index: int  # slice index in layer.slices
    start: int
    stop: int
    sparse_dim: str
    numel: int
    shape: tuple[int, ...]


@register_method("usd")
class USDMethod(WeightChangeReference, SparsityMethod):
    """Per-unit N:M search (N stepping down from M), then fine-tune with the found scheme fixed."""

    Config = USDConfig
    needs = "any"

    # ---- recipe and surgery hooks ------------------------------------------------------------------------------
    @classmethod
    def check_run_length(cls, recipe: Recipe, epochs: int) -> None:
        o = recipe.options
        if o.scheme is None and o.finetune_epochs >= epochs:
            raise RecipeError(
                f"usd: finetune_epochs={o.finetune_epochs} leaves no epoch for the search in a {epochs}-epoch run; "
                "lower 'sparsity.finetune_epochs' or train longer (--epochs)")

    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        o = recipe.options
        where = recipe.source or "the recipe"
        check_phase_keys(recipe, "usd", "the search length follows target_sparsity and finetune_epochs")
        for i, rule in enumerate(recipe.rules):
            if not rule.skip and (rule.n is not None or rule.sparsity is not None or rule.tile is not None):
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}) in {where} gives n/m/sparsity/tile, but usd "
                    f"searches N per layer: drop them from the rule and set 'sparsity.m' (group size, default 16) "
                    f"and 'sparsity.target_sparsity'")
        if o.scheme is not None:
            load_scheme(_scheme_path(recipe), where)
            return
        if o.target_sparsity is None:
            raise RecipeError(f"'sparsity.target_sparsity' in {where} is required for method 'usd' (e.g. 0.75), "
                              f"or give 'sparsity.scheme: <scheme.yaml>' to train with a found scheme")
        top = 1.0 - 1.0 / o.m
        if o.target_sparsity > top:
            raise RecipeError(f"'sparsity.target_sparsity' {o.target_sparsity} in {where} is above what N:M with "
                              f"m={o.m} can reach (1 - 1/m = {top:.4f}); lower it or raise m")

    @classmethod
    def _scheme_m(cls, recipe: Recipe) -> list[int]:
        return sorted({m for _, m in load_scheme(_scheme_path(recipe)).values()})

    @classmethod
    def slice_spec(cls, recipe: Recipe, rule: Rule, label: str, start: int, stop: int, module: nn.Module) -> SliceSpec:
        m = cls.required_multiple(recipe, None)
        label = label if label != "all" else rule.describe()
        return SliceSpec(label, start, stop, m, m, rule.sparse_dim or recipe.sparse_dim)

    @classmethod
    def required_multiple(cls, recipe: Recipe, spec) -> int:
        if recipe.options.scheme is not None:
            return math.lcm(*cls._scheme_m(recipe))
        return recipe.options.m

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        shape = (layer.weight.shape[0],) + (1,) * (layer.weight.dim() - 1)
        dd = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        layer.register_buffer("usd_coef", torch.zeros(shape, **dd), persistent=False)
        layer.register_buffer("usd_tau", torch.zeros(shape, **dd), persistent=False)
        layer.usd_penalize = False
        layer.weight_fn = usd_weight
        layer.register_forward_hook(_record_positions)
        layer.register_load_state_dict_post_hook(_infer_slices)

    # ---- construction -----------------------------------------------------------------------------------------
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        o = self.recipe.options
        self.units: list[_Unit] = []
        for fqn, layer in self.layers:
            for i, s in enumerate(layer.slices):
                key = fqn if len(layer.slices) == 1 and s.start == 0 and s.stop == layer.weight.shape[0] \
                    else f"{fqn}[{s.label}]"
                w = layer.weight[s.start:s.stop]
                self.units.append(_Unit(key, fqn, layer, i, s.start, s.stop, s.sparse_dim, w.numel(), tuple(w.shape)))
        self.total_numel = sum(u.numel for u in self.units) or 1
        self.m = {u.key: o.m for u in self.units}
        self.n = dict(self.m)
        self.output_dir: str | None = None  # set by the trainer to write scheme.yaml the moment the search stops
        self.scheme_file: str | None = None
        self.done = False  # scheme fixed
        self.frozen = False  # masks taken with the fixed scheme and frozen
        self.last_update: int | None = None
        self.stop_step: int | None = None
        self.stop_reason = ""
        self.s_u = 0.0
        self.tau: dict[str, float] = {}
        self.coef: dict[str, float] = {}
        self.positions: dict[str, int] = {}
        finetune = o.finetune_epochs * self.steps_per_epoch
        self.search_end = self.total_steps - finetune
        if o.scheme is not None:
            self._adopt_scheme(load_scheme(_scheme_path(self.recipe)))
        elif self.search_end < 1:
            raise RecipeError(
                f"usd: finetune_epochs={o.finetune_epochs} ({finetune} steps) leaves no steps for the search in "
                f"{self.total_steps} total steps; lower 'sparsity.finetune_epochs' or train longer")
        else:
            shapes = [u.shape for u in self.units]
            self.budget = self._densities(shapes, o.target_sparsity)
        self._sync_slices()
        self._rms = WeightChangeRMS(self.layers)

    def _adopt_scheme(self, scheme: dict[str, tuple[int, int]]) -> None:
        src = self.recipe.options.scheme
        missing = [u.key for u in self.units if u.key not in scheme]
        if missing:
            raise RecipeError(f"usd scheme {src}: {len(missing)} selected layer(s) are not in the scheme, e.g. "
                              f"{missing[0]!r}; use the rules the scheme was searched with")
        unused = set(scheme) - {u.key for u in self.units}
        if unused:
            _logger.warning("usd scheme %s: %d entries match no selected layer (e.g. %s)", src, len(unused),
                            sorted(unused)[0])
        for u in self.units:
            n, m = scheme[u.key]
            gsize = u.shape[grouped_dim(u.layer.weight, u.sparse_dim)]
            if gsize % m:
                raise RecipeError(f"usd scheme {src}: {u.key} has {gsize} channels along its groups, not divisible "
                                  f"by m={m}")
            self.n[u.key], self.m[u.key] = n, m
        self.done = True
        self.stop_reason = "scheme file"
        self.budget = [self.n[u.key] / self.m[u.key] for u in self.units]

    def _densities(self, shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
        o = self.recipe.options
        if o.erk_value is not None and o.erk_value != -1:
            return [1.0 - o.erk_value] * len(shapes)
        if o.erk:
            return erk_densities(shapes, 1.0 - sparsity)
        return [1.0 - sparsity] * len(shapes)

    # ---- schedule -----------------------------------------------------------------------------------------------
    def unstructured_target(self, global_step: int) -> float:
        """``s_u(t)``: reaches alpha x target at the end of the unstructured phase, then keeps its slope."""
        o = self.recipe.options
        t_u = max(1.0, o.unstructured_fraction * self.search_end)
        cap = 1.0 - 0.5 / o.m
        return min(o.alpha_target_sparsity * o.target_sparsity * global_step / t_u, cap)

    def scheme_sparsity(self, n: dict[str, int] | None = None) -> float:
        n = self.n if n is None else n
        kept = sum(n[u.key] / self.m[u.key] * u.numel for u in self.units)
        return 1.0 - kept / self.total_numel

    def scheme(self) -> dict[str, tuple[int, int]]:
        return {u.key: (self.n[u.key], self.m[u.key]) for u in self.units}

    # ---- per-step logic -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, global_step: int) -> None:
        if not self.done:
            if global_step >= self.search_end:
                self._stop(global_step, "search window ended before the target was reached")
            elif self.last_update != global_step and (
                    self.last_update is None or global_step % self.recipe.options.update_interval == 0):
                self._update(global_step)
        if self.done and not self.frozen:
            self._compute_masks()
            self._sync_slices()
            self.frozen = True
            self._set_penalty(zero=True)
        if self.frozen:
            self.zero_pruned()  # optimizer momentum must not revive pruned weights

    def _update(self, t: int) -> None:
        o = self.recipe.options
        self.s_u = self.unstructured_target(t)
        dens = self._densities([u.shape for u in self.units], self.s_u)
        ready: list[tuple[float, _Unit]] = []
        for u, d in zip(self.units, dens):
            w = u.layer.weight[u.start:u.stop].detach()
            a = w.abs()
            tau = _threshold(a, d)
            self.tau[u.key] = float(tau)
            gdim = grouped_dim(w, u.sparse_dim)
            counts = (a >= tau).movedim(gdim, -1).reshape(-1, self.m[u.key]).sum(-1)
            share = float((counts < self.n[u.key]).float().mean())
            if share >= READY_SHARE and self.n[u.key] > 1:
                ready.append((share, u))
        gap = self._step_down(o.target_sparsity - self.scheme_sparsity(), ready)
        self.last_update = t
        self._compute_masks()
        self._sync_slices()
        if gap <= 1e-12:
            self._stop(t, "target reached")
        elif all(self._step_size(u) >= 2 * gap for u in self.units if self.n[u.key] > 1):
            self._stop(t, "no single step brings the scheme closer to the target")
        else:
            self._set_penalty()

    def _step_down(self, gap: float, ready: list[tuple[float, _Unit]]) -> float:
        """Step ready units down while that brings the scheme closer to the target; returns the remaining gap.

        Steps that stay below the target go first, most-ready unit first; then at most one step past the target,
        the smallest, and only if it lands closer to the target than not stepping (size < 2 * gap).
        """
        todo = [u for _, u in sorted(ready, key=lambda r: (-r[0], -r[1].numel, r[1].key))]
        while todo and gap > 1e-12:
            fits = [u for u in todo if self._step_size(u) <= gap]
            if fits:
                u = fits[0]
            else:
                u = min(todo, key=self._step_size)
                if self._step_size(u) >= 2 * gap:
                    break
            gap -= self._step_size(u)
            self.n[u.key] = next_n(self.n[u.key], self.m[u.key])
            todo.remove(u)
        return gap

    def _step_size(self, u: _Unit) -> float:
        n, m = self.n[u.key], self.m[u.key]
        return (n - next_n(n, m)) / m * u.numel / self.total_numel

    def _stop(self, t: int, reason: str) -> None:
        self.done = True
        self.stop_step = t
        self.stop_reason = reason
        self._sync_slices()
        pats = " ".join(f"{k}={n}:{m}" for k, (n, m) in self.scheme().items())
        _logger.info("usd: search stopped at step %d (%s); scheme sparsity %.4f: %s", t, reason,
                     self.scheme_sparsity(), pats)
        if self.output_dir:
            self.write_scheme(self.output_dir)

    @torch.no_grad()
    def _compute_masks(self) -> None:
        for u in self.units:
            w = u.layer.weight[u.start:u.stop]
            u.layer.weight_mask[u.start:u.stop] = weight_nm_mask(w, self.n[u.key], self.m[u.key], u.sparse_dim)

    def _sync_slices(self) -> None:
        for fqn, layer in self.layers:
            specs = list(layer.slices)
            for u in self.units:
                if u.fqn == fqn:
                    specs[u.index] = replace(specs[u.index], n=self.n[u.key], m=self.m[u.key])
            layer.slices = tuple(specs)

    def _set_penalty(self, zero: bool = False) -> None:
        o = self.recipe.options
        on = o.with_weight_penalty and o.penalty > 0 and not zero
        for fqn, layer in self.layers:
            pos = getattr(layer, "usd_positions", None)
            if pos is not None:
                self.positions[fqn] = int(pos)
        flops = {u.key: u.numel * self.positions.get(u.fqn, 1) for u in self.units}
        top = max(flops.values(), default=1) or 1
        for u, d_star in zip(self.units, self.budget):
            dens = self.n[u.key] / self.m[u.key]
            r = min(max((dens - d_star) / (1.0 - d_star), 0.0), 1.0) if d_star < 1.0 else 0.0
            self.coef[u.key] = o.penalty * 0.5 * (r + flops[u.key] / top) if on else 0.0
        self._apply_penalty_buffers()

    def _apply_penalty_buffers(self) -> None:
        for fqn, layer in self.layers:
            active = False
            for u in self.units:
                if u.fqn != fqn:
                    continue
                layer.usd_coef[u.start:u.stop].fill_(self.coef.get(u.key, 0.0))
                layer.usd_tau[u.start:u.stop].fill_(self.tau.get(u.key, 0.0))
                active = active or self.coef.get(u.key, 0.0) > 0
            layer.usd_penalize = active and not self.done

    # ---- hooks --------------------------------------------------------------------------------------------------
    def sync(self, src: MaskedMixin, dst: MaskedMixin) -> None:
        dst.weight_mask.copy_(src.weight_mask)
        dst.usd_coef.copy_(src.usd_coef)
        dst.usd_tau.copy_(src.usd_tau)
        dst.usd_penalize = src.usd_penalize
        dst.slices = src.slices

    def finalize(self) -> None:
        """Fix the scheme where it stands (if the search never finished) and freeze its masks."""
        if not self.done:
            self._stop(self.last_update or 0, "training ended during the search")
        self.step(self.stop_step or 0)

    def finetune_start(self) -> int:
        return self.search_end

    def metrics(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for k in self.n:
            pat = f"{self.n[k]}:{self.m[k]}"
            counts[pat] = counts.get(pat, 0) + 1
        out: dict[str, Any] = {
            "phase": "finetune" if self.done else "search",
            "unstructured_target": round(self.s_u, 6),
            "scheme_sparsity": round(self.scheme_sparsity(), 6),
            "pattern": " ".join(f"{p}x{c}" for p, c in sorted(counts.items(), key=lambda pc: -pc[1])),
        }
        out.update(self._rms())
        return out

    def write_scheme(self, output_dir: str | os.PathLike) -> Path:
        o = self.recipe.options
        extra = {"method": "usd", "target_sparsity": o.target_sparsity, "sparsity": round(self.scheme_sparsity(), 6),
                 "search_done": self.done, "stop_step": self.stop_step, "stop_reason": self.stop_reason}
        path = write_scheme(Path(output_dir) / "scheme.yaml", self.scheme(), extra)
        self.scheme_file = str(path)
        _logger.info("usd: scheme written to %s", path)
        return path

    def on_train_end(self, output_dir: str | None) -> None:
        """Write the scheme unless this process already wrote it there when the search stopped (it has not
        changed since)."""
        if output_dir and self.scheme_file != str(Path(output_dir) / "scheme.yaml"):
            self.write_scheme(output_dir)

    def state_dict(self) -> dict[str, Any]:
        return {"n": dict(self.n), "m": dict(self.m), "done": self.done, "frozen": self.frozen,
                "last_update": self.last_update, "stop_step": self.stop_step, "stop_reason": self.stop_reason,
                "s_u": self.s_u, "tau": dict(self.tau), "coef": dict(self.coef), "positions": dict(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state.get("n", {})
        unknown = set(n) - set(self.n)
        if unknown:
            raise ValueError(f"usd state names units this model does not select (e.g. {sorted(unknown)[0]!r}); "
                             "resume with the recipe the run started with")
        self.n.update({k: int(v) for k, v in n.items()})
        self.m.update({k: int(v) for k, v in state.get("m", {}).items()})
        self.done = bool(state.get("done", self.done))
        self.frozen = bool(state.get("frozen", False))
        self.last_update = state.get("last_update")
        self.stop_step = state.get("stop_step")
        self.stop_reason = state.get("stop_reason", self.stop_reason)
        self.s_u = float(state.get("s_u", 0.0))
        self.tau = {k: float(v) for k, v in state.get("tau", {}).items()}
        self.coef = {k: float(v) for k, v in state.get("coef", {}).items()}
        self.positions = {k: int(v) for k, v in state.get("positions", {}).items()}
        self._sync_slices()
        self._apply_penalty_buffers()
