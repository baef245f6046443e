"""The optimizer: timm's ``create_optimizer_v2`` with the implementation (fused, foreach, loop) chosen on purpose.

torch's default for a CPU model is the per-parameter loop, for CUDA the multi-tensor ``foreach`` path. Both run
AdamW's ``sqrt`` as a separate op whose speed on CPU depends on the values (zeros and subnormals, which sparse
training produces in the optimizer state, cost 5-15x a normal float), and both read and write every state
tensor several times. torch's *fused* kernels (Adam, AdamW, SGD, Adagrad) do the whole update in one pass over
each parameter and their speed does not depend on the values. ``auto`` (the default of ``--opt-impl``) uses
them wherever torch has them for the optimizer and device, and timm's default everywhere else; the update is the
same formula (it can differ from the loop's in the last bit of a float).

The implementation is a property of the run, not of a checkpoint: torch's ``load_state_dict`` would take the
saved groups' ``fused``/``foreach`` flags (an older or ``loop`` checkpoint would silently turn a fused optimizer
back into a loop, and under fp16 AMP the gradient scaler, which asked the fused optimizer to unscale, would then
fail), so the optimizers built here keep their own flags when a state dict is loaded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .errors import UserError
from .recipe import closest

OPT_IMPLS = ("auto", "fused", "foreach", "loop")
_IMPL_KEYS = ("fused", "foreach")


def _parts(opt: str) -> list[str]:
    return opt.lower().split("_")  # "lookahead_adamw" wraps adamw


def _torch_class(opt: str) -> type | None:
    """The optimizer class timm builds for ``opt``, or None if unknown or not a torch optimizer class."""
    from timm.optim import get_optimizer_info

    try:
        cls = get_optimizer_info(_parts(opt)[-1]).opt_class
    except (ValueError, KeyError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _accepts(opt: str, arg: str) -> bool:
    cls = _torch_class(opt)
    return cls is not None and arg in inspect.signature(cls.__init__).parameters


def has_fused(opt: str) -> bool:
    """Whether timm's optimizer ``opt`` is a torch class with a ``fused`` implementation."""
    return _accepts(opt, "fused")


def check_optimizer(opt: str, impl: str = "auto", opt_kwargs: dict | None = None) -> None:
    """Refuse what ``create_optimizer`` would fail on (after a run folder exists): an optimizer name that is not
    timm's (``timm.optim.list_optimizers()``, optionally ``lookahead_``-prefixed), an unknown ``--opt-impl``,
    ``fused``/``foreach`` for an optimizer without that implementation (timm's own optimizers, lamb or lars for
    instance, are per-parameter loops), or ``--opt-kwargs`` the optimizer does not take (tried on one scalar)."""
    from timm.optim import list_optimizers

    parts, known = _parts(opt), list_optimizers()
    if parts[-1] not in known or len(parts) > 2 or (len(parts) == 2 and parts[0] != "lookahead"):
        raise UserError(f"unknown optimizer --opt '{opt}'{closest(parts[-1], known)} (see "
                        "timm.optim.list_optimizers(); a 'lookahead_' prefix is allowed)")
    if impl not in OPT_IMPLS:
        raise UserError(f"unknown --opt-impl {impl!r} (valid: {', '.join(OPT_IMPLS)})")
    if impl == "fused" and not has_fused(opt):
        raise UserError(f"--opt-impl fused: torch has no fused kernel for --opt {opt} (it has one for adam, "
                        "adamw, sgd, momentum, nesterov and adagrad); use --opt-impl auto")
    if impl == "foreach" and not _accepts(opt, "foreach"):
        raise UserError(f"--opt-impl foreach: --opt {opt} has no foreach implementation; use --opt-impl auto")
    if opt_kwargs:
        from timm.optim import create_optimizer_v2

        try:
            create_optimizer_v2([torch.zeros(1, requires_grad=True)], opt=opt, lr=0.1, **opt_kwargs)
        except (TypeError, ValueError) as e:  # an unknown keyword, or a value the optimizer's checks refuse
            given = " ".join(f"{k}={v}" for k, v in opt_kwargs.items())
            raise UserError(f"--opt-kwargs {given}: --opt {opt} refuses them ({e}); check the names and values "
                            "against the optimizer's arguments") from None


def _fused_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: if it moves, the two devices every torch build has fused kernels for
        return ("cuda", "cpu")


def _fused_problem(params: list) -> str | None:
    """Why torch's fused kernels would refuse these parameters (it checks only at the first step), or None."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = _fused_devices()
    for p in tensors:
        if p.device.type not in devices:
            return f"parameters on {p.device.type}, fused kernels exist for {', '.join(devices)}"
        if not p.is_floating_point():
            return f"a parameter of dtype {p.dtype}"
    return None


def _keep_impl_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``load_state_dict`` keep this optimizer's ``fused``/``foreach`` flags instead of the saved ones."""
    base = getattr(optimizer, "_base_optimizer", optimizer)  # timm's Lookahead loads through its base optimizer

    def hook(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        groups = [dict(saved) for saved in state_dict["param_groups"]]
        for saved, own in zip(groups, opt.param_groups):
            for key in _IMPL_KEYS:
                if key in own:
                    saved[key] = own[key]
        return {**state_dict, "param_groups": groups}

    base.register_load_state_dict_pre_hook(hook)


def create_optimizer(params: Any, impl: str = "auto", **timm_kwargs: Any) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer for ``params`` (parameters or param groups, e.g. ``SparsityController.param_groups``)
    with ``timm.optim.create_optimizer_v2(params, **timm_kwargs)`` and implementation
    ``impl``; returns it and the implementation that runs (``fused``, ``foreach``, ``loop`` or ``default``).

    ``auto`` takes torch's fused kernel when the optimizer has one and the parameters' devices and dtypes allow it,
    else timm's default. ``fused`` insists and says why it cannot; ``foreach``/``loop`` pass ``foreach=True/False``
    where the optimizer has that switch (``loop`` is timm's default for one without it). The parameters must
    already be on their training device. A state dict loaded later keeps the implementation chosen here.
    """
    from timm.optim import create_optimizer_v2

    opt = timm_kwargs.get("opt", "sgd")
    check_optimizer(opt, impl)
    params = list(params)  # may be a generator: read twice below
    kwargs: dict[str, Any] = {}
    used = "default"
    if impl in ("foreach", "loop"):
        if _accepts(opt, "foreach"):
            kwargs, used = {"foreach": impl == "foreach"}, impl
    elif has_fused(opt):
        problem = _fused_problem(params)
        if problem is None:
            kwargs, used = {"fused": True}, "fused"
        elif impl == "fused":
            raise UserError(f"--opt-impl fused: torch cannot run --opt {opt} fused here ({problem}); "
                            "use --opt-impl auto")
    optimizer = create_optimizer_v2(params, **kwargs, **timm_kwargs)
    _keep_impl_on_load(optimizer)
    return optimizer, used
