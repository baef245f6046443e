"""The optimizer: timm's ``create_optimizer_v2`` with the implementation (fused, foreach, loop) chosen on purpose.

torch's default for a CPU model is the per-parameter loop, for CUDA the multi-tensor ``foreach`` path. Both run
AdamW's ``sqrt`` as a separate op whose speed on CPU depends on the values (zeros and subnormals, which sparse
training produces in the optimizer state, cost 5-15x a normal float), and both read and write every state
tensor several times. torch's *fused* kernels (Adam, AdamW, SGD, Adagrad) do the whole update in one pass over
each parameter and their speed does not depend on the values. ``auto`` (the default of ``--opt-impl``) uses
them wherever torch has them for the optimizer and device, and timm's default everywhere else; the update is the
same formula (it can differ from the loop's in the last bit of a float).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .errors import UserError

OPT_IMPLS = ("auto", "fused", "foreach", "loop")


def _inner_name(opt: str) -> str:
    return opt.lower().split("_")[-1]  # "lookahead_adamw" wraps adamw


def has_fused(opt: str) -> bool:
    """Whether timm's optimizer ``opt`` is a torch class with a ``fused`` implementation."""
    from timm.optim import get_optimizer_info

    try:
        cls = get_optimizer_info(_inner_name(opt)).opt_class
    except (ValueError, KeyError):
        return False
    if isinstance(cls, str) or not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        return False
    return "fused" in inspect.signature(cls.__init__).parameters


def check_impl(opt: str, impl: str) -> None:
    """Refuse an unknown ``--opt-impl`` or ``fused`` for an optimizer torch has no fused kernel for."""
    if impl not in OPT_IMPLS:
        raise UserError(f"unknown --opt-impl {impl!r} (valid: {', '.join(OPT_IMPLS)})")
    if impl == "fused" and not has_fused(opt):
        raise UserError(f"--opt-impl fused: torch has no fused kernel for --opt {opt} (it has one for adam, "
                        "adamw, sgd, momentum, nesterov and adagrad); use --opt-impl auto")


def create_optimizer(params: Any, impl: str = "auto", **timm_kwargs: Any) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer with ``timm.optim.create_optimizer_v2(params, **timm_kwargs)`` and implementation
    ``impl``; returns it and the implementation that runs (``fused``, ``foreach``, ``loop`` or ``default``).

    ``auto`` takes torch's fused kernel when the optimizer has one and torch accepts these parameters for it
    (device, dtype), else timm's default. ``fused`` insists and says why it cannot; ``foreach``/``loop`` pass
    ``foreach=True/False``. The parameters must already be on their training device.
    """
    from timm.optim import create_optimizer_v2

    opt = timm_kwargs.get("opt", "sgd")
    check_impl(opt, impl)
    if impl in ("foreach", "loop"):
        return create_optimizer_v2(params, foreach=impl == "foreach", **timm_kwargs), impl
    if not isinstance(params, torch.nn.Module):
        params = list(params)  # may be a generator; tried twice below
    if has_fused(opt):
        try:
            return create_optimizer_v2(params, fused=True, **timm_kwargs), "fused"
        except (RuntimeError, ValueError) as e:  # torch refuses this device or dtype for its fused kernel
            if impl == "fused":
                raise UserError(f"--opt-impl fused: torch cannot run --opt {opt} fused here ({e}); "
                                "use --opt-impl auto") from e
    return create_optimizer_v2(params, **timm_kwargs), "default"
