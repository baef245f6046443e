"""Masked layers: subclasses of ``nn.Linear`` / ``nn.Conv2d`` that keep timm's parameter names.

Each keeps ``weight`` and ``bias`` (always used) and adds a persistent bool ``weight_mask`` buffer, so a stock
timm checkpoint loads into a sparsified model and the state dict stays stock plus masks. How the mask enters the
forward (straight-through, SR-STE, MDGF, learned scores, ...) is the method's ``weight_fn(layer)``; the forward
itself is one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import native

__all__ = [
    "SliceSpec", "MaskedMixin", "MaskedLinear", "MaskedConv2d", "masked_modules", "MASKED_TYPES", "frozen_weight",
    "uncovered_rows", "loss_scale", "current_loss_scale", "current_loss_divisor", "layer_kind", "to_channels_last",
]


@dataclass(frozen=True)
class SliceSpec:
    """A row slice ``[start, stop)`` of the weight's output dim with its own pattern.

    ``label`` is ``all`` for a whole layer or ``q``/``k``/``v`` for the thirds of a fused qkv. ``n``/``m`` hold
    the N:M pattern (None for block/unstructured methods, which read ``sparsity``/``tile``).
    """

    label: str
    start: int
    stop: int
    n: int | None = None
    m: int | None = None
    sparse_dim: str = "row"
    sparsity: float | None = None
    tile: int | None = None

    def pattern(self) -> str:
        if self.n is not None:
            return f"{self.n}:{self.m}"
        if self.sparsity is not None:
            return f"{self.sparsity:.0%}" + (f" tile {self.tile}" if self.tile else "")
        return "dense"


def _dense_weight(layer: MaskedMixin) -> torch.Tensor:
    return layer.weight


class MaskedMixin:
    """Shared state of masked layers. ``slices`` say which rows carry which pattern; rows outside every slice
    stay dense (their mask is all True)."""

    weight: nn.Parameter
    weight_mask: torch.Tensor

    def _init_sparse(self) -> None:
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.slices: tuple[SliceSpec, ...] = ()
        self.method: str = "dense"
        self.weight_fn: Callable[[MaskedMixin], torch.Tensor] = _dense_weight
        self._mask_factor: tuple[tuple, torch.Tensor] | None = None
        self._masked_cache: tuple[tuple | None, torch.Tensor] | None = None  # (weight/mask key, W * E)

    def _factor_key(self) -> tuple | None:
        mask, w = self.weight_mask, self.weight
        try:
            version = mask._version
        except RuntimeError:  # inference tensors keep no version counter
            return None
        return (id(mask), mask.data_ptr(), version, mask.shape, mask.stride(), w.dtype, w.device)

    def mask_factor(self) -> torch.Tensor:
        """``weight_mask`` as 0/1 in the weight's dtype: what the forward multiplies by.

        CPU kernels vectorize only same-dtype products (W * E with a bool E is about 20x slower than with a float
        E), so the float copy is cached and rebuilt only when the mask changes (its version counter moves: any
        in-place write, ``load_state_dict``, ``copy_``) or is replaced. Costs one weight-sized tensor per layer.
        """
        mask, w = self.weight_mask, self.weight
        if torch.compiler.is_compiling():
            return mask.to(w.dtype)  # the compiler fuses the conversion into the product
        key = self._factor_key()
        if key is None:
            return mask.to(w.dtype)
        cached = getattr(self, "_mask_factor", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        factor = cached[1] if cached is not None and cached[0][3:] == key[3:] else torch.empty_like(mask, dtype=w.dtype)
        factor.copy_(mask.view(torch.uint8))  # uint8 -> float is the vectorized conversion; bool -> float is not
        self._mask_factor = (key, factor)
        return factor

    def mask_factor_written(self) -> None:
        """Declare the factor :meth:`mask_factor` returned equal to ``weight_mask`` again, after a mask kernel
        wrote both (the next forward then does not rebuild it)."""
        cached = getattr(self, "_mask_factor", None)
        key = self._factor_key()
        if cached is not None and key is not None and cached[0][3:] == key[3:]:
            self._mask_factor = (key, cached[1])

    def _weight_key(self) -> tuple | None:
        """What a cache of values computed from the weight and mask is valid for: the same tensors, their version
        counters unmoved (torch's fused optimizers write parameters without moving them: a post-step hook on every
        optimizer moves those of its parameters)."""
        w, mask = self.weight, self.weight_mask
        try:
            return (id(w), w.data_ptr(), w._version, id(mask), mask.data_ptr(), mask._version)
        except RuntimeError:  # inference tensors keep no version counter
            return None

    def masked_weight_out(self) -> torch.Tensor:
        """A weight-shaped buffer (same strides) for a mask kernel to write ``W * E`` into, kept per layer; call
        :meth:`masked_weight_written` once it holds ``W * E`` of the current weight and mask."""
        w = self.weight
        cached = getattr(self, "_masked_cache", None)
        buf = None if cached is None else cached[1]
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device \
                or buf.stride() != w.stride():
            buf = torch.empty_like(w.detach(), memory_format=torch.preserve_format)
        self.__dict__["_masked_cache"] = (None, buf)  # plain attribute: skip nn.Module.__setattr__ (every step)
        return buf

    def masked_weight_written(self, beta: float = 0.0) -> None:
        """Declare the buffer of :meth:`masked_weight_out` equal to ``W * (E + beta (1 - E))`` (``W * E`` for
        beta 0) for the weight and mask as they are now (:meth:`_weight_key`: any in-place update or optimizer step
        stales it)."""
        cached = getattr(self, "_masked_cache", None)
        if cached is not None:
            key = self._weight_key()
            self.__dict__["_masked_cache"] = (None if key is None else (*key, float(beta)), cached[1])

    def fresh_masked_weight(self, beta: float = 0.0) -> torch.Tensor | None:
        """The forward weight precomputed by the mask kernel for this ``beta`` if the weight and mask have not
        changed since (the forward then multiplies nothing), else None. Always None while compiling: the
        compiler fuses the product itself. "Changed" is read from :meth:`_weight_key` (writes through ``param.data``
        bypass it)."""
        if torch.compiler.is_compiling():  # first: the compiler must not trace (and guard on) the cache key
            return None
        cached = getattr(self, "_masked_cache", None)
        if cached is None or cached[0] is None:
            return None
        key = self._weight_key()
        return cached[1] if key is not None and cached[0] == (*key, float(beta)) else None

    def memory_key(self) -> tuple:
        """Where this layer's weight, mask, precomputed forward weight and 0/1 factor live (data pointers): what a
        prepared kernel call over them relies on. ``model.to()``, a dtype change or ``param.data = ...`` move it."""
        cached, factor = getattr(self, "_masked_cache", None), getattr(self, "_mask_factor", None)
        return (self.weight.data_ptr(), self.weight_mask.data_ptr(), None if cached is None else cached[1].data_ptr(),
                None if factor is None else factor[1].data_ptr())

    def __getstate__(self) -> dict:
        # copies (deepcopy for an EMA model, pickling) drop the caches: they are rebuilt on demand
        state = self.__dict__.copy()
        state["_mask_factor"] = None
        state["_masked_cache"] = None
        return state

    def sparse_weight(self) -> torch.Tensor:
        """The weight the forward uses (W~ in DESIGN.md section 4)."""
        return self.weight_fn(self)

    @torch.no_grad()
    def masked_weight(self) -> torch.Tensor:
        """W * E with the current binary mask (what export bakes in)."""
        return self.weight * self.weight_mask

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        """Set the weights the mask prunes to exactly zero, in place: on CPU one native pass reading the 1-byte mask,
        elsewhere by the cached 0/1 factor (a bool mask multiplies about 7x slower). Until the weight or the mask
        changes again, W is then W * E bit for bit and :func:`frozen_weight` skips its product."""
        if not (self.weight.device.type == "cpu" and native.mask_mul_native_(self.weight, self.weight_mask)):
            self.weight.mul_(self.mask_factor())
        self._zeroed_key = self._weight_key()

    def pruned_are_zero(self) -> bool:
        """True, in training mode, while the weight holds exactly what :meth:`zero_pruned_` left
        (:meth:`_weight_key` unchanged)."""
        key = getattr(self, "_zeroed_key", None)
        return self.training and key is not None and key == self._weight_key()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A stock (dense) timm checkpoint has no masks: keep the current mask instead of failing a strict load.
        key = prefix + "weight_mask"
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in missing_keys:
            missing_keys.remove(key)

    def pattern_label(self, sep: str = " ") -> str:
        """Every slice's pattern as ``label=pattern`` (``ff=2:4``, ``q=2:4 k=1:8 v=2:4``), or ``dense``."""
        return sep.join(f"{s.label}={s.pattern()}" for s in self.slices) or "dense"

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, method={self.method}, pattern=[{self.pattern_label(', ')}]"  # type: ignore[misc]


class MaskedLinear(MaskedMixin, nn.Linear):
    """``nn.Linear`` whose forward uses ``weight_fn(self)`` (W~) instead of ``weight``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fn(self), self.bias)

    @classmethod
    def from_dense(cls, mod: nn.Linear) -> MaskedLinear:
        """Wrap a dense Linear, sharing its parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = mod.in_features, mod.out_features
        new.weight = mod.weight
        new.bias = mod.bias
        new._init_sparse()
        new.train(mod.training)
        return new

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask baked in (W * E)."""
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_(self.masked_weight())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight_fn(self)``; N:M groups run along input channels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_sparse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_fn(self), self.bias)

    @classmethod
    def from_dense(cls, mod: nn.Conv2d) -> MaskedConv2d:
        """Wrap a dense Conv2d, sharing its parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        new._modules = dict(mod._modules)
        new._init_sparse()
        return new

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the mask baked in (W * E)."""
        w = self.weight
        out = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        out.weight.copy_(self.masked_weight())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out


MASKED_TYPES = (MaskedLinear, MaskedConv2d)


def layer_kind(module: nn.Module) -> str:
    """``linear``, ``conv1x1`` or ``conv`` (every other Conv2d): per-type recipe keys and report figures."""
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return "linear"


# ---- loss scaling (fp16 AMP) --------------------------------------------------------------------------------------
# A backward that adds a term of its own to the incoming gradient (SR-STE's lambda (1 - E) W, USD's penalty) must
# scale it like that gradient: under GradScaler the gradient arrives multiplied by the loss scale S and is divided
# by S before the optimizer step, so an unscaled term would end up divided by S (65536 at the start). Autograd runs
# CUDA backwards on its own device threads, so this is a plain module global, not a thread-local.
_LOSS_SCALE = None  # a scale tensor or a GradScaler (its scale read when a backward asks: scale() creates it)
_LOSS_DIVISOR = 1  # gradient accumulation: the loss is divided by its window's size


@contextlib.contextmanager
def loss_scale(scaler, divisor: int = 1) -> Iterator[None]:
    """Run the backward of ``scaler.scale(loss)`` inside this, so methods scale the gradient terms they add.

    ``scaler``: a ``torch.amp.GradScaler`` (its current scale, a device tensor: no host sync), a scale tensor, or
    None / a disabled scaler (nothing to do). ``divisor``: gradient accumulation over that many batches, whose
    losses are each divided by it; a method's terms are divided alike, so they enter each optimizer step once.
    ``train.py`` does this for ``--amp --amp-dtype float16`` on CUDA and for ``--grad-accum-steps``; a custom loop
    with a GradScaler or accumulation and ``srste`` or ``usd`` needs it too::

        with sparsity.loss_scale(scaler, divisor=accum_steps):
            scaler.scale(loss / accum_steps).backward()
    """
    global _LOSS_SCALE, _LOSS_DIVISOR
    if scaler is not None and not isinstance(scaler, torch.Tensor) and not scaler.is_enabled():
        scaler = None
    if divisor < 1:
        raise ValueError(f"loss_scale: divisor must be at least 1, got {divisor}")
    before, _LOSS_SCALE, before_div, _LOSS_DIVISOR = _LOSS_SCALE, scaler, _LOSS_DIVISOR, divisor
    try:
        yield
    finally:
        _LOSS_SCALE, _LOSS_DIVISOR = before, before_div


def current_loss_scale(like: torch.Tensor) -> torch.Tensor | None:
    """The loss scale set by :func:`loss_scale` as a 0-dim tensor of ``like``'s dtype and device, or None."""
    s = _LOSS_SCALE
    if s is not None and not isinstance(s, torch.Tensor):
        s = getattr(s, "_scale", None)  # a GradScaler: its current scale (a device tensor, no host sync)
    return None if s is None else s.to(device=like.device, dtype=like.dtype).reshape(())


def current_loss_divisor() -> int:
    """The accumulation divisor set by :func:`loss_scale` (1 without accumulation): a method divides the
    coefficient of the term it adds by it (a Python number: no tensor op, the native kernels still apply)."""
    return _LOSS_DIVISOR


def _mark_optimizer_step(optimizer, args, kwargs) -> None:
    """After any optimizer's step: move its parameters' version counters, as an in-place update does (torch's fused
    kernels write through pointers), so caches computed from a weight (:meth:`MaskedMixin._weight_key`) go stale
    with it, and only with it: another model's optimizer (the training benchmark keeps several) leaves them be."""
    params = [p for group in optimizer.param_groups for p in group["params"] if not p.is_inference()]
    if params:
        increment_version(params)


register_optimizer_step_post_hook(_mark_optimizer_step)


def masked_product(x: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * E``: on CPU in one native pass over ``x`` and the 1-byte ``mask`` (no float factor read), elsewhere
    ``x * factor``; the same values either way (E is exactly 0/1)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # a traced graph gets the product (it fuses it)
        return x * factor
    out = native.mask_mul_native(x, mask)
    return x * factor if out is None else out


class _FrozenWeight(torch.autograd.Function):
    """W * E forward, g * E backward (pruned weights get no gradient), with E as the float mask factor (``mask`` the
    bool one, which the CPU kernel reads)."""

    @staticmethod
    def forward(ctx, weight, factor, mask):
        ctx.save_for_backward(factor, mask)
        return masked_product(weight, factor, mask)

    @staticmethod
    def backward(ctx, grad):
        factor, mask = ctx.saved_tensors
        return masked_product(grad, factor, mask), None, None


class _ZeroedWeight(_FrozenWeight):
    """W itself forward (its pruned weights are exactly zero already: W * E is W bit for bit), g * E backward."""

    @staticmethod
    def forward(ctx, weight, factor, mask):
        ctx.save_for_backward(factor, mask)
        return weight.view_as(weight)


def frozen_weight(layer: MaskedMixin) -> torch.Tensor:
    """``weight_fn`` for a fixed binary mask: W * E with gradient g * E. Right after the controller's
    ``zero_pruned_`` (the training forward of a frozen mask) W is W * E already, so the forward's weight-sized
    product is skipped; elsewhere (eval mode, after an optimizer step, an EMA copy) the product runs."""
    zeroed = not torch.compiler.is_compiling() and layer.pruned_are_zero()  # compiled: the product, fused
    return (_ZeroedWeight if zeroed else _FrozenWeight).apply(layer.weight, layer.mask_factor(), layer.weight_mask)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)`` for the 4-D parameters and buffers only: torch's conversion
    also takes every 5-D tensor and fails on them (gumbel's conv logits are (O, kh, kw, groups, K))."""
    return model._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


def uncovered_rows(spans, rows: int) -> list[tuple[int, int]]:
    """Row ranges of ``[0, rows)`` outside every ``(start, stop)`` span, e.g. the rows of a weight no slice
    covers: they stay dense (mask all True)."""
    gaps, at = [], 0
    for start, stop in sorted(spans):
        if start > at:
            gaps.append((at, start))
        at = max(at, stop)
    if at < rows:
        gaps.append((at, rows))
    return gaps


def masked_modules(model: nn.Module) -> list[tuple[str, MaskedMixin]]:
    """All masked layers of ``model`` as (fqn, module), in registration order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MASKED_TYPES)]
