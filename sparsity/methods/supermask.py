"""``supermask`` (SuperBlock): learned tile scores choose which whole tiles of each weight survive.

DESIGN.md section 4. Each masked unit (a layer, or a q/k/v third of a fused qkv) owns a score per ``tile`` x
``tile`` tile of its 2-D weight view (Linear (out, in) as is; Conv2d (O, I, kh, kw) viewed as (O, I*kh*kw)), a
parameter ``weight_scores`` (``weight_scores_<label>`` for qkv thirds) of shape ceil(rows/tile) x ceil(cols/tile).

=========  ==================================================================================================
mask       T(S): the ``round((1 - s) * num_tiles)`` tiles with the highest scores (DESIGN.md's S >= the
           s-quantile, made an exact count: ``masks.tiles_kept``; ties to the lower index, NaN as the highest),
           expanded to whole tiles; recomputed in
           ``step()`` every ``mask_interval`` steps
forward    W~ = W * T(S)
grad W     g * T(S)  (``fixed_weight: true``: the weight does not train at all, ``requires_grad`` is False)
grad S     straight-through through the threshold: dL/dS_tile = sum over the tile of g * W, i.e. the plain
           STE of the expanded mask (dL/dT = g * W, T treated as the identity of S) summed over each tile
=========  ==================================================================================================

Sparsity and tile come from the rule (``sparsity``, ``tile``) or else from the config by layer kind
(``sparsity_linear``/``tile_linear``, ``sparsity_conv1x1``/``tile_conv1x1``, ``sparsity_conv``/``tile_conv``).
A resolved sparsity of 0 leaves the layer dense (reported as skipped). The sparsity may ramp linearly from 0 to
the target (``ramp: {start_fraction, end_fraction}`` of the total steps); the recipe's dense/fine-tune phases
apply as for every method (fine-tune with ``finetune_mask: frozen`` fixes the mask at the target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..layers import MaskedMixin, SliceSpec, frozen_weight, layer_kind, uncovered_rows
from ..masks import expand_tiles, expand_tiles_, tile_mask, tile_scores, tiles_kept
from ..recipe import Recipe, RecipeError, Rule
from ..schedules import DENSE, FINETUNE, linear_ramp, phase_at
from . import KernelPlan, SparsityMethod, fill_missing_slice_params, register_method, slice_param_name

__all__ = ["Ramp", "SupermaskConfig", "SupermaskMethod", "supermask_weight", "tile_sum"]

KINDS = ("linear", "conv1x1", "conv")


def _sparsity(v: float | None) -> str | None:
    return None if v is None or 0.0 <= v < 1.0 else f"must be in [0, 1), got {v}"


def _tile(v: int) -> str | None:
    return None if v >= 1 else f"must be >= 1, got {v}"


@dataclass(frozen=True)
class Ramp:
    """Sparsity rises linearly from 0 at ``start_fraction`` to the target at ``end_fraction`` of the total steps."""

    start_fraction: float = 0.0
    end_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("start_fraction", "end_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise RecipeError(f"ramp.{name} must be in [0, 1], got {v}")
        if self.start_fraction > self.end_fraction:
            raise RecipeError(
                f"ramp.start_fraction ({self.start_fraction}) must be <= ramp.end_fraction ({self.end_fraction})"
            )


@dataclass(frozen=True)
class SupermaskConfig:
    """Options of ``supermask``. A rule's own ``sparsity``/``tile`` override the per-kind values."""

    sparsity_linear: float | None = field(default=None, metadata={"check": _sparsity})
    tile_linear: int = field(default=1, metadata={"check": _tile})
    sparsity_conv1x1: float | None = field(default=None, metadata={"check": _sparsity})
    tile_conv1x1: int = field(default=1, metadata={"check": _tile})
    sparsity_conv: float | None = field(default=None, metadata={"check": _sparsity})
    tile_conv: int = field(default=1, metadata={"check": _tile})
    skip_first_block: bool = False
    skip_last_layer: bool = False
    ramp: Ramp | None = None
    fixed_weight: bool = False
    score_init: Literal["magnitude", "uniform"] = "magnitude"


def tile_sum(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum of ``x`` over every ``tile`` x ``tile`` tile of its 2-D view (edge tiles sum what they hold)."""
    x2 = x.reshape(x.shape[0], -1)
    r, c = x2.shape
    rt, ct = math.ceil(r / tile), math.ceil(c / tile)
    if tile == 1:
        return x2
    if r % tile or c % tile:  # only edge tiles need the zero padding
        x2 = F.pad(x2, (0, ct * tile - c, 0, rt * tile - r))
    # the contiguous inner reduction first: summing a run of `tile` is cheaper than a strided one
    return x2.reshape(rt, tile, ct, tile).sum(dim=3).sum(dim=1)


def _init_scores(w: torch.Tensor, tile: int, how: str) -> torch.Tensor:
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    shape = (math.ceil(rows / tile), math.ceil(cols / tile))
    if how == "magnitude":  # mean |W| per tile: the first mask is the magnitude block mask
        return tile_scores(w, tile).to(w.dtype).reshape(shape)
    scores = torch.empty(shape, dtype=w.dtype, device=w.device)
    nn.init.kaiming_uniform_(scores, a=math.sqrt(5))  # the reference's init
    return scores


class _SupermaskWeight(torch.autograd.Function):
    """Forward W * E (E = weight_mask = expanded T(S)); backward g * E to W, tile sums of g * W to each S.

    ``factor`` is E as 0/1 in the weight's dtype (:meth:`MaskedMixin.mask_factor`): same-dtype products are the
    vectorized ones on CPU.
    """

    @staticmethod
    def forward(ctx, weight, factor, tiles, *scores):
        ctx.tiles = tiles
        ctx.score_dtypes = tuple(s.dtype for s in scores)
        ctx.save_for_backward(weight, factor)
        return weight * factor

    @staticmethod
    def backward(ctx, grad):
        weight, factor = ctx.saved_tensors
        grad_w = grad * factor if ctx.needs_input_grad[0] else None
        grads_s = []
        whole = len(ctx.tiles) > 1 and any(ctx.needs_input_grad[3:])
        gw = grad * weight if whole else None  # one product for every unit of a fused qkv
        for i, (start, stop, tile) in enumerate(ctx.tiles):
            if ctx.needs_input_grad[3 + i]:
                part = gw[start:stop] if gw is not None else grad[start:stop] * weight[start:stop]
                grads_s.append(tile_sum(part, tile).to(ctx.score_dtypes[i]))
            else:
                grads_s.append(None)
        return (grad_w, None, None, *grads_s)


class _SupermaskFromMasked(torch.autograd.Function):
    """The same function as :class:`_SupermaskWeight`, from ``W * E`` written by the mask step (native tile kernel):
    the forward computes nothing and the backward makes g * E and every tile's sum of g * W in one pass.

    ``units`` holds (start, stop, tile, keep) per score, keep being the bool tile mask the step expanded. The output
    aliases the buffer (``detach()`` shares its version counter) and the keep masks are saved: a backward after
    either was rewritten fails loudly.
    """

    @staticmethod
    def forward(ctx, weight, masked, units, *scores):
        ctx.units = units
        ctx.score_dtypes = tuple(s.dtype for s in scores)
        # the keep masks too: the mask step rewrites them in place, and a backward after that must fail loudly
        ctx.save_for_backward(weight, *(u[3] for u in units))
        return masked.detach()

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.saved_tensors[0]
        need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        grad = grad.contiguous()
        grad_w = torch.empty_like(weight) if need_w else None
        grads_s = [torch.empty(keep.shape, dtype=weight.dtype, device=weight.device) if need else None
                   for (*_, keep), need in zip(ctx.units, need_s)]
        units = []
        for (start, stop, tile, keep), gs in zip(ctx.units, grads_s):
            rows = stop - start
            units.append((grad[start:stop].view(rows, -1), weight[start:stop].view(rows, -1), keep,
                          None if grad_w is None else grad_w[start:stop].view(rows, -1), gs, tile))
        if not native.tile_backward_native(units):  # kernel gone since the forward: the same math in torch ops
            for i, (start, stop, tile, keep) in enumerate(ctx.units):
                factor = expand_tiles(keep, weight[start:stop].shape, tile).to(weight.dtype)
                if grad_w is not None:
                    grad_w[start:stop] = grad[start:stop] * factor
                if grads_s[i] is not None:
                    grads_s[i] = tile_sum(grad[start:stop] * weight[start:stop], tile)
        if grad_w is not None:
            for start, stop in uncovered_rows((u[:2] for u in ctx.units), weight.shape[0]):  # dense rows
                grad_w[start:stop] = grad[start:stop]
        grads_s = [None if g is None else g.to(dt) for g, dt in zip(grads_s, ctx.score_dtypes)]
        return (grad_w, None, None, *grads_s)


def supermask_weight(layer: MaskedMixin) -> torch.Tensor:
    """``weight_fn`` of ``supermask``: W * T(S) with the straight-through score gradient (frozen: W * E only)."""
    if layer.sparse_mode == "frozen":
        return frozen_weight(layer)
    scores = [getattr(layer, name) for name in layer.score_names]
    units = getattr(layer, "_tile_keep", None)
    masked = layer.fresh_masked_weight() if units is not None else None
    if masked is not None:
        return _SupermaskFromMasked.apply(layer.weight, masked, units, *scores)
    return _SupermaskWeight.apply(layer.weight, layer.mask_factor(), layer.score_tiles, *scores)


def _fill_missing_scores(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """Load pre-hook: a stock (dense) state dict has no scores. Keep the current ones, or with
    ``score_init: magnitude`` start them from the incoming weight so the loaded model starts at its magnitude
    block mask. Either way a strict load of a dense checkpoint succeeds."""
    magnitude = module.score_init == "magnitude"
    fill_missing_slice_params(module, state_dict, prefix, module.score_names,
                              (lambda rows, spec: _init_scores(rows, spec.tile, "magnitude")) if magnitude else None)


@register_method("supermask")
class SupermaskMethod(SparsityMethod):
    """Learned tile scores, top tiles kept (SuperBlock); see the module docstring for the math."""

    Config = SupermaskConfig
    needs = "any"

    # ---- recipe and surgery hooks ---------------------------------------------------------------------------
    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        opts = recipe.options
        where = f" in {recipe.source}" if recipe.source else ""
        any_default = any(getattr(opts, f"sparsity_{k}") is not None for k in KINDS)
        for i, rule in enumerate(recipe.rules):
            if rule.skip:
                continue
            if rule.n is not None:
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}){where} gives n/m, but method 'supermask' "
                    "learns block masks from 'sparsity' and 'tile'; remove n and m"
                )
            if rule.sparsity is None and not any_default:
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}){where} has no sparsity for method "
                    "'supermask': give the rule a 'sparsity' (e.g. sparsity: 0.9) or set sparsity_linear / "
                    "sparsity_conv1x1 / sparsity_conv"
                )

    @classmethod
    def slice_spec(cls, recipe: Recipe, rule: Rule, label: str, start: int, stop: int, module: nn.Module) -> SliceSpec:
        opts = recipe.options
        kind = layer_kind(module)
        sp = rule.sparsity if rule.sparsity is not None else getattr(opts, f"sparsity_{kind}")
        tile = rule.tile if rule.tile is not None else getattr(opts, f"tile_{kind}")
        if sp is None:
            where = f" in {recipe.source}" if recipe.source else ""
            raise RecipeError(
                f"sparsity rule (target {rule.describe()}){where} selects {kind} layers but neither the rule's "
                f"'sparsity' nor 'sparsity_{kind}' is set for method 'supermask'; set one, or exclude those layers"
            )
        label = label if label != "all" else rule.describe()
        return SliceSpec(label, start, stop, None, None, rule.sparse_dim or recipe.sparse_dim, float(sp), int(tile))

    @classmethod
    def skip_reason(cls, recipe: Recipe, fqn: str, tags: set[str]) -> str | None:
        opts = recipe.options
        if opts.skip_first_block and "first_block" in tags:
            return "first block kept dense (skip_first_block: true)"
        if opts.skip_last_layer and "last_layer" in tags:
            return "last layer kept dense (skip_last_layer: true)"
        return None

    @classmethod
    def layer_problem(cls, recipe: Recipe, module: nn.Module, spec: SliceSpec) -> str | None:
        if not spec.sparsity:
            return f"sparsity 0 for {layer_kind(module)} layers: left dense"
        return None

    @classmethod
    def shape_problem(cls, recipe: Recipe, module: nn.Module, spec: SliceSpec) -> str | None:
        """A unit too small for its tiles at its sparsity (tile 1000 on a 384x96 weight: one tile, which any
        sparsity below 1 keeps) would train dense while its report said it conforms."""
        if not spec.tile or not spec.sparsity:
            return None
        rows, cols = spec.stop - spec.start, math.prod(module.weight.shape[1:])
        n_tiles = math.ceil(rows / spec.tile) * math.ceil(cols / spec.tile)
        if tiles_kept(n_tiles, spec.sparsity) >= n_tiles:
            return (f"tile {spec.tile} cuts the {rows}x{cols} weight into {n_tiles} tile(s), all of which sparsity "
                    f"{spec.sparsity:g} keeps; use a smaller tile")
        return None

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        opts = recipe.options
        names = []
        with torch.no_grad():
            for spec in layer.slices:
                name = slice_param_name("weight_scores", layer, spec)
                scores = _init_scores(layer.weight[spec.start:spec.stop].detach(), spec.tile, opts.score_init)
                layer.register_parameter(name, nn.Parameter(scores))
                names.append(name)
        layer.score_names = tuple(names)
        layer.score_tiles = tuple((s.start, s.stop, s.tile) for s in layer.slices)
        layer.score_init = opts.score_init
        layer.sparse_mode = "learn"
        layer.weight_fn = supermask_weight
        if opts.fixed_weight:
            layer.weight.requires_grad_(False)
        layer.register_load_state_dict_pre_hook(_fill_missing_scores)

    # ---- training-time hooks --------------------------------------------------------------------------------
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_update: int | None = None
        self.frozen = False
        self.phase = DENSE
        self.ramp = 0.0  # fraction of each unit's target sparsity in force
        self._keep_buffers: list[torch.Tensor] | None = None  # the native selection's output, one per unit
        self._counts: tuple[float, Any] | None = None  # (fraction, tiles kept per unit as the kernel takes them)
        self._plan: KernelPlan | None = None  # the last all-native _compute_masks, replayed while nothing moved

    def ramp_at(self, global_step: int) -> tuple[str, int, float]:
        """(phase name, steps since the sparse phase began, fraction of the target sparsity in force)."""
        r = self.recipe
        phase = phase_at(global_step, self.total_steps, r.dense_fraction, r.finetune_fraction)
        if phase.name == DENSE:
            return phase.name, phase.t, 0.0
        ramp = r.options.ramp
        if phase.name == FINETUNE or ramp is None:
            return phase.name, phase.t, 1.0
        start = int(round(ramp.start_fraction * self.total_steps))
        end = int(round(ramp.end_fraction * self.total_steps))
        return phase.name, phase.t, linear_ramp(global_step, start, end, 0.0, 1.0)

    def sparsity_at(self, global_step: int) -> dict[str, float]:
        """Sparsity in force per unit label at ``global_step``."""
        _, _, f = self.ramp_at(global_step)
        return {s.label: s.sparsity * f for _, layer in self.layers for s in layer.slices}

    @torch.no_grad()
    def _compute_masks(self, fraction: float) -> None:
        """T(S) of every unit, written in place into ``weight_mask``, and with it either ``W * E`` for the forward
        (float32 on CPU: one native pass for all layers) or the layer's float mask factor.

        When the last call ran wholly on the native kernels and the same tensors come back (every step of a run),
        its two prepared kernel calls are replayed: no per-layer planning in the step."""
        if self._plan is not None and self._plan.replay(None, self._tensor_guard(), self._kept_counts(fraction)):
            return
        self._plan = None
        select = self._select_call()
        if select is not None and select.run(self._kept_counts(fraction)):
            all_keeps = iter(select.keeps)
        else:
            select = None
            all_keeps = iter([tile_mask(getattr(layer, name), spec.sparsity * fraction)
                              for _, layer in self.layers for spec, name in zip(layer.slices, layer.score_names)])
        units, fused, plain, copies = [], [], [], []
        for _, layer in self.layers:
            keeps = [next(all_keeps) for _ in layer.slices]
            w, mask = layer.weight.detach(), layer.weight_mask
            out = layer.masked_weight_out() if native.tile_supports(w, mask) else None  # same layout as w
            if out is None:
                plain.append((layer, keeps))
                continue
            keeps = [k.contiguous() for k in keeps]
            for spec, keep in zip(layer.slices, keeps):
                rows = spec.stop - spec.start
                units.append((w[spec.start:spec.stop].view(rows, -1), mask[spec.start:spec.stop].view(rows, -1),
                              out[spec.start:spec.stop].view(rows, -1), keep, spec.tile))
            copies += [(out[a:b], w[a:b]) for a, b in uncovered_rows(((s.start, s.stop) for s in layer.slices),
                                                                      w.shape[0])]  # dense rows
            fused.append((layer, keeps, out))
        expand = native.TileExpand(units) if units else None
        if expand is not None and not expand.run():
            plain, fused, expand = plain + [(layer, keeps) for layer, keeps, _ in fused], [], None
        for out, w in copies if fused else ():
            out.copy_(w)
        for layer, keeps, _ in fused:
            layer.__dict__["_tile_keep"] = tuple((s.start, s.stop, s.tile, k) for s, k in zip(layer.slices, keeps))
            layer.masked_weight_written()
        for layer, keeps in plain:
            mask, factor = layer.weight_mask, layer.mask_factor()
            for spec, keep in zip(layer.slices, keeps):
                expand_tiles_(mask[spec.start:spec.stop], keep, spec.tile, factor[spec.start:spec.stop])
            layer.mask_factor_written()
        if select is not None and expand is not None and not plain:
            layers = [layer for layer, _, _ in fused]
            self._plan = KernelPlan(None, self._tensor_guard(), lambda counts: select.run(counts) and expand.run(),
                                    copies, lambda _: [layer.masked_weight_written() for layer in layers])

    def _select_call(self) -> native.TileTopk | None:
        """The native tile selection over every unit, writing into keep buffers owned by the method (reused every
        step; the backward saves them, so one run after the next mask step fails loudly), or None where it does
        not apply."""
        scores = [getattr(layer, name).detach() for _, layer in self.layers for name in layer.score_names]
        if not all(s.dtype == torch.float32 for s in scores) or not native.tile_supports(*scores):
            return None  # the torch path (GPU, other dtypes): no buffers to allocate
        keeps = self._keep_buffers
        if keeps is None or [(k.shape, k.device) for k in keeps] != [(s.shape, s.device) for s in scores]:
            keeps = self._keep_buffers = [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in scores]
        return native.TileTopk.create(list(zip(scores, keeps)))

    def _kept_counts(self, fraction: float):
        """Tiles kept per unit (layers, then slices, in order) at ``fraction`` of each unit's target sparsity, as
        :meth:`native.TileTopk.run` takes them (built again only when the fraction moves: a ramp)."""
        if self._counts is None or self._counts[0] != fraction:
            self._counts = (fraction, native.counts_array(
                tiles_kept(getattr(layer, name).numel(), spec.sparsity * fraction)
                for _, layer in self.layers for spec, name in zip(layer.slices, layer.score_names)))
        return self._counts[1]

    def _tensor_guard(self) -> tuple:
        """:meth:`KernelPlan.guard` with the score tensors too."""
        return KernelPlan.guard(self.layers, lambda lay: tuple(getattr(lay, n).data_ptr() for n in lay.score_names))

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        r = self.recipe
        name, t, f = self.ramp_at(global_step)
        self.phase, self.ramp = name, f
        if name == FINETUNE and r.finetune_mask == "frozen":
            if not self.frozen:
                self._compute_masks(1.0)
                self.frozen = True
                self.last_update = global_step
            for _, layer in self.layers:
                layer.sparse_mode = "frozen"
            return
        due = self.last_update is None or t % r.mask_interval == 0
        if due and self.last_update != global_step:
            self._compute_masks(f)
            self.last_update = global_step
        for _, layer in self.layers:
            layer.sparse_mode = "learn"

    def sync(self, src: MaskedMixin, dst: MaskedMixin) -> None:
        dst.weight_mask.copy_(src.weight_mask)
        dst.sparse_mode = src.sparse_mode

    def finalize(self) -> None:
        """Bake T(S) at the target sparsity (unless already frozen) into ``weight_mask``; scores stop mattering."""
        if not self.frozen:
            self._compute_masks(1.0)
            self.frozen = True
        for _, layer in self.layers:
            layer.sparse_mode = "frozen"
        self.ramp = 1.0

    def metrics(self) -> dict[str, Any]:
        return {"phase": self.phase, "ramp": round(self.ramp, 6)}

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        return [getattr(layer, n) for _, layer in self.layers for n in layer.score_names
                if getattr(layer, n).requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {"last_update": self.last_update, "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = state.get("last_update")
        self.frozen = bool(state.get("frozen", False))
