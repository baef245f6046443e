"""Masked layers: subclasses of ``nn.Linear`` / ``nn.Conv2d`` that keep timm's parameter names.

Each keeps ``weight`` and ``bias`` (always used) and adds a persistent bool ``weight_mask`` buffer, so a stock
timm checkpoint loads into a sparsified model and the state dict stays stock plus masks. How the mask enters the
forward (straight-through, SR-STE, MDGF, learned scores, ...) is the method's ``weight_fn(layer)``; the forward
itself is one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SliceSpec", "MaskedMixin", "MaskedLinear", "MaskedConv2d", "masked_modules", "MASKED_TYPES"]


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

    def sparse_weight(self) -> torch.Tensor:
        """The weight the forward uses (W~ in DESIGN.md section 4)."""
        return self.weight_fn(self)

    @torch.no_grad()
    def masked_weight(self) -> torch.Tensor:
        """W * E with the current binary mask (what export bakes in)."""
        return self.weight * self.weight_mask

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

    def extra_repr(self) -> str:  # type: ignore[override]
        pats = ", ".join(f"{s.label}={s.pattern()}" for s in self.slices) or "dense"
        return f"{super().extra_repr()}, method={self.method}, pattern=[{pats}]"  # type: ignore[misc]


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


def masked_modules(model: nn.Module) -> list[tuple[str, MaskedMixin]]:
    """All masked layers of ``model`` as (fqn, module), in registration order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MASKED_TYPES)]
