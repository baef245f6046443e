"""``gumbel``: learned N:M masks, one categorical choice per group of M over the C(M, N) patterns with N kept.

DESIGN.md section 4 (the 2:4 masking paper for conv nets). Groups run along the input dim like every other
method: a Linear (out, in) groups along ``in`` (``sparse_dim: col``: along ``out``); a Conv2d (O, I/g, kh, kw) is
viewed as (O, kh, kw, I/g) and groups run along input channels, never across kernel taps. Each masked unit owns a
parameter ``weight_logits`` (``weight_logits_<label>`` for the q/k/v thirds of a fused qkv) of shape
``(*other dims, groups, K)`` with K = C(M, N) and P the (K, M) bool table of patterns in lexicographic order.

=========  ==================================================================================================
sample     y = softmax((logits + G) / tau), G ~ Gumbel(0, 1) i.i.d.; z = one_hot(argmax y) (hard), with the
           straight-through estimator: forward uses z, backward the gradient of y
forward    W~ = W * P[z]  (training); W * P[argmax logits] in eval mode (deterministic, no noise)
grad W     g * P[z] for ``trainable: all``; nothing for ``mask`` and ``none`` (``requires_grad`` False)
grad S     dL/dlogits through y: dL/dy = (g * W per group) @ P^T, then softmax's Jacobian divided by tau
mask       ``weight_mask`` always holds the argmax pattern of the current logits (what eval, report and export
           use); ``finalize()`` fixes it
=========  ==================================================================================================

The Gumbel noise of step k is a function of (``noise_seed``, k, layer, unit), not of the global RNG: the same step
gives the same sample after a resume and metrics/eval never perturb training's RNG. On CPU it is a counter-based
stream (:func:`counter_noise`), which the native kernels (``csrc/gumbel.c``) compute in registers; on CUDA it comes
from a device generator seeded with that seed.
Patterns per group are limited to ``MAX_PATTERNS`` (70 = C(8, 4)); 2:4 has 6, 1:8 has 8, 2:8 has 28.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .. import native
from ..layers import MaskedMixin, SliceSpec, frozen_weight
from ..masks import grouped_dim
from ..recipe import Recipe, RecipeError, parse_dataclass
from ..schedules import DENSE, FINETUNE, SPARSE, linear_ramp, phase_at
from . import SparsityMethod, fill_missing_slice_params, register_method, slice_param_name

__all__ = ["MAX_PATTERNS", "TauAnneal", "GumbelConfig", "GumbelMethod", "nm_patterns", "gumbel_weight", "tau_at"]

_log = logging.getLogger(__name__)

#: the largest C(M, N) accepted: logits cost K/M floats per weight (70/8 = 8.75x the weight for 4:8).
MAX_PATTERNS = 70


@dataclass(frozen=True)
class TauAnneal:
    """Temperature annealed from ``start`` to ``end`` over the sparse window (``linear`` or ``exp`` = geometric)."""

    start: float = 1.0
    end: float = 1.0
    schedule: Literal["linear", "exp"] = "linear"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"tau.{name} must be > 0, got {getattr(self, name)}")


def _check_tau(v: Any) -> str | None:
    if isinstance(v, dict):
        try:
            parse_dataclass(TauAnneal, v, "tau")
        except RecipeError as e:
            return f"is not a valid annealing schedule ({e}); write e.g. tau: {{start: 4.0, end: 0.5}}"
        return None
    return None if v > 0 else f"must be > 0, got {v}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


@dataclass(frozen=True)
class GumbelConfig:
    """Options of ``gumbel``. ``tau`` is a number (fixed, reference 1.0) or ``{start, end, schedule}``."""

    tau: float | dict = field(default=1.0, metadata={"check": _check_tau})
    init: Literal["uniform", "magnitude"] = "uniform"
    init_scale: float = field(default=3.0, metadata={"check": _positive})
    trainable: Literal["all", "mask", "none"] = "all"
    ignore_grouped: bool = True
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tau, dict):
            object.__setattr__(self, "tau", parse_dataclass(TauAnneal, self.tau, "sparsity.tau"))


_PATTERNS: dict[tuple[int, int, str], torch.Tensor] = {}


def nm_patterns(n: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(C(m, n), m) bool table: every way to keep ``n`` of ``m``, in lexicographic order of kept positions."""
    key = (n, m, str(device))
    if key not in _PATTERNS:
        table = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
        for k, kept in enumerate(itertools.combinations(range(m), n)):
            table[k, list(kept)] = True
        _PATTERNS[key] = table.to(device)
    return _PATTERNS[key]


def tau_at(tau: float | TauAnneal, global_step: int, sparse_start: int, finetune_start: int) -> float:
    """Temperature at ``global_step``: fixed, or annealed over the sparse window ``[sparse_start, finetune_start)``."""
    if not isinstance(tau, TauAnneal):
        return float(tau)
    if tau.schedule == "linear":
        return linear_ramp(global_step, sparse_start, finetune_start, tau.start, tau.end)
    progress = linear_ramp(global_step, sparse_start, finetune_start, 0.0, 1.0)
    return tau.start * (tau.end / tau.start) ** progress


def _grouped(w: torch.Tensor, spec: SliceSpec) -> tuple[torch.Tensor, int]:
    """View a unit's weight as (..., groups, M) and return it with the grouped dim of the weight."""
    dim = grouped_dim(w, spec.sparse_dim)
    moved = w.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // spec.m, spec.m), dim


def _ungroup(e: torch.Tensor, w_shape: torch.Size, dim: int) -> torch.Tensor:
    moved_shape = list(w_shape)
    moved_shape.append(moved_shape.pop(dim))
    return e.reshape(moved_shape).movedim(-1, dim)


def _init_logits(w: torch.Tensor, spec: SliceSpec, how: str, scale: float) -> torch.Tensor:
    groups, _ = _grouped(w.detach(), spec)
    k = math.comb(spec.m, spec.n)
    if how == "uniform":  # the reference: every pattern equally likely
        return torch.zeros(*groups.shape[:-1], k, dtype=w.dtype, device=w.device)
    # ours: logits proportional to the magnitude each pattern keeps, scaled so an average pattern scores ~scale
    mag = groups.abs().float()
    kept = mag @ nm_patterns(spec.n, spec.m, w.device).float().t()  # (..., groups, K)
    norm = spec.n * mag.mean().clamp_min(1e-12)
    return (scale * kept / norm).to(w.dtype)


def _pattern_rows(idx: torch.Tensor, spec: SliceSpec, dtype: torch.dtype) -> torch.Tensor:
    """(..., groups, M) rows of the pattern table for the pattern indices ``idx`` (one gather, no bool ops)."""
    table = _typed_patterns(spec.n, spec.m, idx.device, dtype)
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, spec.m)


_TYPED: dict[tuple, torch.Tensor] = {}


def _typed_patterns(n: int, m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (n, m, str(device), dtype)
    if key not in _TYPED:
        _TYPED[key] = nm_patterns(n, m, device).to(dtype)
    return _TYPED[key]


def _argmax_mask(w: torch.Tensor, logits: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    """Bool mask of the unit's weight from the argmax pattern of its logits."""
    hard = _pattern_rows(logits.detach().argmax(dim=-1), spec, torch.uint8)
    return _ungroup(hard, w.shape, grouped_dim(w, spec.sparse_dim)).view(torch.bool)


def _seed(noise_seed: int, global_step: int, layer_idx: int, unit: int) -> int:
    x = (noise_seed * 1_000_003 + global_step) % (1 << 40)
    return (x * 65_537 + layer_idx * 257 + unit) % (1 << 62)


def _gumbel_noise(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(-log(u)) for the logits of one unit (a new float32 tensor of ``shape``).

    On CPU it is the counter stream of ``seed`` (:func:`counter_noise`): logit number i gets the same value
    whichever code computes it (the native kernels, which compute it in registers, or these torch ops).
    On other devices: ``torch.rand`` from a generator of that device seeded with ``seed``.
    """
    if torch.device(device).type == "cpu":
        return counter_noise(math.prod(shape), seed).view(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    return u.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


_LOG_CONST = [float.fromhex(h) for h in ("0x1.62e3p-1", "0x1.2fefa2p-17", "0x1.555554p-1", "0x1.999c26p-2",
                                         "0x1.23d3dcp-2", "0x1.f13c4cp-3")]  # exact float32 values
_NOISE_CHUNK = 1 << 20


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _log_pos(x: torch.Tensor) -> torch.Tensor:
    """``log`` of positive normal float32 values by the operations ``csrc/gumbel.c``'s ``log_pos`` performs, in the
    same order: the same bits (each op rounds once in both)."""
    ln2_hi, ln2_lo, lg1, lg2, lg3, lg4 = _LOG_CONST
    ix = x.view(torch.int32) + (0x3F800000 - 0x3F3504F3)
    dk = ((ix >> 23) - 0x7F).to(torch.float32)
    f = ((ix & 0x007FFFFF) + 0x3F3504F3).view(torch.float32) - 1.0
    s = f / (f + 2.0)
    z = s * s
    w = z * z
    r = z * (w * lg3 + lg1) + w * (w * lg4 + lg2)
    hfsq = f * 0.5 * f
    return s * (hfsq + r) + dk * ln2_lo - hfsq + f + dk * ln2_hi


def counter_noise(numel: int, seed: int, first: int = 0) -> torch.Tensor:
    """Gumbel noise of logit numbers ``[first, first + numel)`` of ``seed``'s counter stream (float32, CPU).

    h_i = mix64(key + (i + 1) * 0x9E3779B97F4A7C15) with key = mix64(seed) and mix64 SplitMix64's finalizer;
    u_i = ((h_i >> 41) + 0.5) / 2^23, exact and inside (0, 1); G_i = -log(-log(u_i)). The native kernel computes the
    same bits; this torch version (int64 arithmetic wraps like uint64) serves where it is not built.
    """
    native_noise = native.gumbel_noise_native(numel, seed, first)
    if native_noise is not None:
        return native_noise
    key, (gamma, m1, m2) = _signed(native.noise_key(seed)), map(_signed, native.SPLITMIX)
    out = torch.empty(numel, dtype=torch.float32)
    for lo in range(0, numel, _NOISE_CHUNK):
        z = torch.arange(first + lo + 1, first + min(numel, lo + _NOISE_CHUNK) + 1, dtype=torch.int64)
        z = z * gamma + key
        z = (z ^ _lsr(z, 30)) * m1
        z = (z ^ _lsr(z, 27)) * m2
        z = z ^ _lsr(z, 31)
        u = (_lsr(z, 41).to(torch.float32) + 0.5) * 2.0 ** -23
        out[lo:lo + z.numel()] = _log_pos(_log_pos(u).neg_()).neg_()
    return out


class _GumbelHard(torch.autograd.Function):
    """Hard pattern P[argmax s] forward; straight-through softmax gradient to ``s = (logits + G) / tau`` backward.

    The same estimator as ``hard + (soft - soft.detach())`` with ``soft = softmax(s) @ P``, without computing
    the softmax in the forward (it is only needed for the gradient) and without the three full-size temporaries.
    """

    @staticmethod
    def forward(ctx, logits, s, table, tau: float):
        idx = s.argmax(dim=-1, keepdim=True)
        hard = table.index_select(0, idx.reshape(-1)).view(*s.shape[:-1], table.shape[1])
        ctx.save_for_backward(s, idx, table)
        ctx.tau, ctx.logits_dtype = tau, logits.dtype
        return hard

    @staticmethod
    def backward(ctx, grad):
        s, idx, table = ctx.saved_tensors
        p = _softmax_lastdim(s, idx)
        dy = (grad.reshape(-1, table.shape[1]).to(table.dtype) @ table.t()).view(p.shape)  # dL/dy per pattern
        dot = (p * dy).sum(dim=-1, keepdim=True)
        ds = p.mul_(dy.sub_(dot)).div_(ctx.tau)  # softmax Jacobian, then d s / d logits = 1 / tau
        return ds.to(ctx.logits_dtype), None, None, None


def _softmax_lastdim(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``softmax(s, -1)`` given ``idx`` = argmax of ``s``: the same math as :func:`torch.softmax` (shift by the
    row maximum), several times faster on CPU for the few patterns per group (its kernel loops per row)."""
    e = torch.sub(s, s.gather(-1, idx)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


class _GumbelNative(torch.autograd.Function):
    """The sampled forward weight ``W * P[z]`` of one unit on CPU by ``csrc/gumbel.c``: the same noise (counter
    stream), the same ``z`` and the same forward bits as :class:`_GumbelHard` times W, and the same gradients up to
    float rounding, in one pass each way (the forward saves s = (logits + G) / tau for the backward)."""

    @staticmethod
    def forward(ctx, w, logits, unit: native.GumbelUnit, seed: int, tau: float):
        out, s = unit.forward(w, logits, seed, tau)
        ctx.save_for_backward(w, s)
        ctx.unit, ctx.tau = unit, tau
        return out

    @staticmethod
    def backward(ctx, grad):
        w, s = ctx.saved_tensors
        dlogits, dw = ctx.unit.backward(w, s, grad, ctx.tau, want_w=ctx.needs_input_grad[0])
        return dw, dlogits if ctx.needs_input_grad[1] else None, None, None, None


_UNITS: dict[tuple, native.GumbelUnit | None] = {}


def _native_unit(w: torch.Tensor, logits: torch.Tensor, spec: SliceSpec) -> native.GumbelUnit | None:
    """The native kernels for this unit (cached per geometry), or None where they do not apply."""
    if w.device.type != "cpu" or native.kernel() is None:
        return None
    key = (tuple(w.shape), spec.sparse_dim, spec.n, spec.m, w.dtype, logits.dtype, w.is_contiguous(),
           w.is_contiguous(memory_format=torch.channels_last) if w.dim() == 4 else False, logits.is_contiguous())
    if key not in _UNITS:
        _UNITS[key] = native.GumbelUnit.create(w, logits, grouped_dim(w, spec.sparse_dim),
                                               _typed_patterns(spec.n, spec.m, w.device, torch.uint8))
    return _UNITS[key]


def _unit_weight(layer: MaskedMixin, spec: SliceSpec, logits: torch.Tensor, unit: int, sample: bool) -> torch.Tensor:
    """W~ of one unit's rows: W * E, E the hard pattern, its straight-through gradient of the soft one reaching the
    logits."""
    w = layer.weight
    if (spec.start, spec.stop) != (0, w.shape[0]):
        w = w[spec.start:spec.stop]  # a slice's backward writes a zero weight-sized gradient first: only when needed
    tau = layer.gumbel_tau
    if sample:
        kernels = _native_unit(w, logits, spec)
        if kernels is not None:
            return _GumbelNative.apply(w, logits, kernels, layer.gumbel_seed + unit, tau)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 logits keep their precision in s
    with torch.no_grad():
        if sample:  # (G + logits) / tau, in place on the fresh noise tensor
            s = _gumbel_noise(logits.shape, layer.gumbel_seed + unit, logits.device).to(dtype).add_(logits)
            if tau != 1.0:
                s.div_(tau)
        else:
            s = logits.to(dtype) / tau
    if logits.requires_grad and torch.is_grad_enabled():
        hard = _GumbelHard.apply(logits, s, _typed_patterns(spec.n, spec.m, s.device, w.dtype), tau)
    else:
        hard = _pattern_rows(s.argmax(dim=-1), spec, w.dtype)
    return w * _ungroup(hard, w.shape, grouped_dim(w, spec.sparse_dim))


@torch.compiler.disable
def gumbel_weight(layer: MaskedMixin) -> torch.Tensor:
    """``weight_fn`` of ``gumbel``: sampled (training) or argmax (eval, fine-tune, finalized) N:M patterns.

    Runs eagerly under ``torch.compile``: the noise seed and tau change every step, and tracing them would
    recompile the model every step; the rest of the model compiles around this call.
    """
    mode = layer.sparse_mode
    if mode == "dense":
        return layer.weight
    if mode == "frozen" or not layer.training:
        return frozen_weight(layer)  # W * weight_mask (the argmax pattern), gradient g * E
    w = layer.weight
    pieces, row = [], 0
    for unit, (spec, name) in enumerate(zip(layer.slices, layer.logit_names)):
        if spec.start > row:
            pieces.append(w[row:spec.start])  # rows no unit covers stay dense
        pieces.append(_unit_weight(layer, spec, getattr(layer, name), unit, sample=mode == "sample"))
        row = spec.stop
    if row < w.shape[0]:
        pieces.append(w[row:])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _fill_missing_logits(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """Load pre-hook: a stock (dense) state dict has no logits. Keep the current ones, or with ``init: magnitude``
    start them from the incoming weight. Either way a strict load of a dense checkpoint succeeds, and when the
    state dict has no mask either, ``weight_mask`` becomes the argmax pattern of the logits it ends with."""
    magnitude = module.logit_init == "magnitude"
    filled = fill_missing_slice_params(
        module, state_dict, prefix, module.logit_names,
        (lambda rows, spec: _init_logits(rows, spec, "magnitude", module.logit_init_scale)) if magnitude else None)
    if filled and prefix + "weight_mask" not in state_dict:
        mask = module.weight_mask.detach().clone()
        for spec, value in filled:
            mask[spec.start:spec.stop] = _argmax_mask(mask[spec.start:spec.stop], value, spec)
        state_dict[prefix + "weight_mask"] = mask


@register_method("gumbel")
class GumbelMethod(SparsityMethod):
    """Gumbel-softmax over the N:M patterns of every group; see the module docstring for the math."""

    Config = GumbelConfig

    # ---- recipe and surgery hooks ---------------------------------------------------------------------------
    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        super().validate(recipe)
        where = f" in {recipe.source}" if recipe.source else ""
        for i, rule in enumerate(recipe.rules):
            if rule.skip or rule.n is None:
                continue
            k = math.comb(rule.m, rule.n)
            if k > MAX_PATTERNS:
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}){where}: {rule.n}:{rule.m} has C({rule.m},"
                    f"{rule.n}) = {k} patterns per group, but method 'gumbel' learns one logit per pattern and "
                    f"allows at most {MAX_PATTERNS} (e.g. 2:4 has 6, 4:8 has 70); use a smaller M"
                )

    @classmethod
    def layer_problem(cls, recipe: Recipe, module: nn.Module, spec: SliceSpec) -> str | None:
        if recipe.options.ignore_grouped and isinstance(module, nn.Conv2d) and module.groups > 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} conv (groups={module.groups}) kept dense (ignore_grouped: true)"
        return None

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        opts = recipe.options
        layer.slices = tuple(sorted(layer.slices, key=lambda s: s.start))
        names = []
        with torch.no_grad():
            for spec in layer.slices:
                name = slice_param_name("weight_logits", layer, spec)
                w = layer.weight[spec.start:spec.stop]
                logits = nn.Parameter(_init_logits(w, spec, opts.init, opts.init_scale))
                layer.register_parameter(name, logits)
                layer.weight_mask[spec.start:spec.stop] = _argmax_mask(w, logits, spec)
                names.append(name)
        layer.logit_names = tuple(names)
        layer.logit_init = opts.init
        layer.logit_init_scale = opts.init_scale
        layer.sparse_mode = "sample"
        layer.gumbel_tau = tau_at(opts.tau, 0, 0, 1)
        layer.gumbel_seed = _seed(opts.noise_seed, 0, 0, 0)
        layer.weight_fn = gumbel_weight
        if opts.trainable in ("mask", "none"):
            layer.weight.requires_grad_(False)
        if opts.trainable == "none":
            for name in names:
                getattr(layer, name).requires_grad_(False)
        layer.register_load_state_dict_pre_hook(_fill_missing_logits)

    # ---- training-time hooks --------------------------------------------------------------------------------
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frozen = False
        self.phase = DENSE
        r = self.recipe
        first = phase_at(0, self.total_steps, r.dense_fraction, r.finetune_fraction)
        self.tau = tau_at(r.options.tau, 0, first.sparse_start, first.finetune_start)
        self._last_argmax = self._argmax()

    def temperature(self, global_step: int) -> float:
        """tau in force at ``global_step``."""
        r = self.recipe
        phase = phase_at(global_step, self.total_steps, r.dense_fraction, r.finetune_fraction)
        return tau_at(r.options.tau, global_step, phase.sparse_start, phase.finetune_start)

    def _units(self):
        for fqn, layer in self.layers:
            for spec, name in zip(layer.slices, layer.logit_names):
                yield fqn, layer, spec, name

    @torch.no_grad()
    def _argmax(self) -> dict[tuple[str, str], torch.Tensor]:
        return {(fqn, name): getattr(layer, name).argmax(dim=-1).to(torch.uint8)
                for fqn, layer, _, name in self._units()}

    @torch.no_grad()
    def _set_argmax_masks(self) -> None:
        for _, layer, spec, name in self._units():
            w, logits = layer.weight[spec.start:spec.stop], getattr(layer, name)
            kernels = _native_unit(w, logits, spec)
            if kernels is None or not kernels.argmax_mask(logits, layer.weight_mask[spec.start:spec.stop]):
                layer.weight_mask[spec.start:spec.stop] = _argmax_mask(w, logits, spec)

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        r = self.recipe
        phase = phase_at(global_step, self.total_steps, r.dense_fraction, r.finetune_fraction)
        self.phase = phase.name
        self.tau = tau_at(r.options.tau, global_step, phase.sparse_start, phase.finetune_start)
        if phase.name == DENSE:
            for _, layer in self.layers:
                layer.sparse_mode = "dense"
                layer.weight_mask.fill_(True)
            return
        if phase.name == FINETUNE and r.finetune_mask == "frozen":
            if not self.frozen:
                self._set_argmax_masks()
                self.frozen = True
            for _, layer in self.layers:
                layer.sparse_mode = "frozen"
            return
        self._set_argmax_masks()
        mode = "sample" if phase.name == SPARSE else "argmax"  # fine-tune, dynamic: no noise
        for idx, (_, layer) in enumerate(self.layers):
            layer.sparse_mode = mode
            layer.gumbel_tau = self.tau
            layer.gumbel_seed = _seed(r.options.noise_seed, global_step, idx, 0)

    def sync(self, src: MaskedMixin, dst: MaskedMixin) -> None:
        dst.weight_mask.copy_(src.weight_mask)
        dst.sparse_mode = src.sparse_mode
        dst.gumbel_tau = src.gumbel_tau
        dst.gumbel_seed = src.gumbel_seed

    def finalize(self) -> None:
        """The argmax pattern of every group becomes the fixed mask (what export bakes in)."""
        if not self.frozen:
            self._set_argmax_masks()
            self.frozen = True
        for _, layer in self.layers:
            layer.sparse_mode = "frozen"

    @torch.no_grad()
    def _entropy(self) -> tuple[float, float, int]:
        """(sum over groups of the entropy of softmax(logits), the same sum for uniform logits, groups)."""
        ent_sum, uniform_sum, groups = 0.0, 0.0, 0
        for _, layer, _, name in self._units():
            lg = getattr(layer, name).float()
            logp = torch.log_softmax(lg, dim=-1)
            ent_sum += float(-(logp.exp() * logp).sum())
            uniform_sum += lg[..., 0].numel() * math.log(lg.shape[-1])
            groups += lg[..., 0].numel()
        return ent_sum, uniform_sum, groups

    @torch.no_grad()
    def metrics(self) -> dict[str, Any]:
        """``mask_entropy``: mean over all groups of the entropy (nats) of softmax(logits), without tau or noise
        (log C(M,N) when uniform, 0 when certain); ``mask_flip``: fraction of groups whose argmax pattern changed
        since the previous call (since the controller was built, on the first call)."""
        ent_sum, _, groups = self._entropy()
        current = self._argmax()
        changed = sum(int((current[k] != prev).sum()) for k, prev in self._last_argmax.items() if k in current)
        self._last_argmax = current
        return {
            "phase": self.phase,
            "tau": round(self.tau, 6),
            "mask_entropy": round(ent_sum / groups, 6) if groups else 0.0,
            "mask_flip": round(changed / groups, 6) if groups else 0.0,
        }

    def on_train_end(self, output_dir: str | None) -> None:
        """Warn (once, on the process that writes the run) when the logits ended near uniform: their argmax, the
        final masks, is then close to arbitrary and the model's accuracy with them can collapse."""
        if output_dir is None or self.phase == DENSE:
            return
        ent_sum, uniform_sum, _ = self._entropy()
        if not uniform_sum or ent_sum < 0.99 * uniform_sum:
            return
        _log.warning(
            "gumbel: the mask logits ended near uniform (entropy %.1f %% of uniform's): their argmax, the final "
            "masks, is close to arbitrary. Starting from a dense model, use init: magnitude; otherwise train longer "
            "or with a larger lr; and keep a fine-tune phase (finetune_fraction) so the %s fit the final masks",
            100 * ent_sum / uniform_sum, "BatchNorm statistics and other weights" if any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()) else "other weights")

    def metric_reference(self) -> dict[str, torch.Tensor]:
        return {f"{fqn}/{name}": t for (fqn, name), t in self._last_argmax.items()}

    def set_metric_reference(self, ref: dict[str, torch.Tensor]) -> None:
        for (fqn, name), t in self._last_argmax.items():
            saved = ref.get(f"{fqn}/{name}")
            if saved is not None and saved.shape == t.shape:
                t.copy_(saved)

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        return [getattr(layer, name) for _, layer, _, name in self._units() if getattr(layer, name).requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state.get("frozen", False))
