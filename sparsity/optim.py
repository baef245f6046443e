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
import logging
import math
import os
from collections.abc import Callable
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


# ---- the optimizer step that also computes the next masks ---------------------------------------------------------

_FUSED_OK: bool | None = None  # whether nm_keep_adamw's AdamW is torch's fused AdamW bit for bit here (checked once)
# torch's fused kernel rounds the last numel % 16 elements of a tensor in other ways (its compiler's epilogues):
# only weights of whole 16-element vectors (every N:M layer of a real model) take the native step
_TORCH_VECTOR = 16


def _adamw_scalars(group: dict, step: float) -> tuple[float, ...] | None:
    """(wdmul, c1, beta2, c2, bc2_sqrt, eps, neg_step) of one AdamW step at ``step`` as torch's fused CPU kernel
    rounds them to float32 (from doubles), or None for what the native step does not do: amsgrad, maximize,
    capturable/differentiable, a tensor lr, beta1 <= 0.5 (torch then takes the other form of its lerp)."""
    lr, (beta1, beta2), wd, eps = group["lr"], group["betas"], group["weight_decay"], group["eps"]
    if (group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable")
            or not group.get("fused") or isinstance(lr, torch.Tensor) or isinstance(beta1, torch.Tensor)
            or not 1.0 - beta1 < 0.5):
        return None
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    return (1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(bc2), eps, -(lr / bc1))


def _same_layout(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """``p`` fills its memory exactly (contiguous, or channels-last for a conv weight) and ``others`` lie in memory
    the same way: element i of each is at the same offset, so one elementwise pass can walk them all."""
    dense = p.is_contiguous() or (p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last))
    return dense and all(t.stride() == p.stride() and t.shape == p.shape for t in others)


def _static_problem(p: torch.Tensor, group: dict) -> str | None:
    """Why the native step can never take weight ``p`` of ``group`` (checked once, when attaching), or None."""
    if p.dtype != torch.float32 or p.device.type != "cpu":
        return f"a {p.dtype} weight on {p.device.type}"
    if p.numel() % _TORCH_VECTOR:
        return f"a weight of {p.numel()} elements, not whole vectors of {_TORCH_VECTOR}"
    if not _same_layout(p):
        return "a weight that is neither contiguous nor channels-last"
    if _adamw_scalars(group, 1.0) is None:
        return "amsgrad, maximize, a tensor lr or beta1 <= 0.5"
    return None


class MaskedAdamW(torch.optim.AdamW):
    """torch's fused AdamW whose step, for the masked weights, also computes the masks of the next training step
    in the same pass over them (``nm_keep_adamw`` in ``csrc/nm_rank.c``): the N:M methods' mask step otherwise
    reads every masked weight again right after the optimizer wrote it. The update is torch's fused AdamW bit for
    bit (checked against torch once per process: :func:`attach_masks` leaves the optimizer alone where it is not),
    the masks those ``controller.step`` would have computed; the other parameters take torch's fused step. A state
    dict is torch AdamW's, so checkpoints move freely between the two. Optimizer step hooks run around torch's part
    of the step, after the masked weights were updated (their ``grad`` is None there).

    ``native_steps`` / ``steps`` count the steps that took the native pass and all steps.
    """

    _masks_for: Callable[[], Any] | None = None
    _decay_for: Callable[[], list] | None = None
    _layout_cache: tuple | None = None
    native_steps = 0
    steps = 0

    def step(self, closure=None):  # noqa: D102 - torch's
        loss = None
        if closure is not None:  # as torch's step does: the closure computes the gradients first
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        decay = self._decay_for() if self._decay_for is not None else []
        # a gradient scaler (fp16 AMP) hands over its scale and inf flag as attributes: torch's step unscales
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        work = self._masks_for() if self._masks_for is not None and not scaled else None
        taken = self._native_step(work, decay) if work is not None else []
        if not taken:
            if decay:
                self._add_decay(decay, getattr(self, "grad_scale", None))
            super().step()
            return loss
        self.native_steps += 1
        grads = [p.grad for p in taken]
        for p in taken:
            p.grad = None  # torch's step skips them: already updated
        try:
            super().step()
        finally:
            for p, g in zip(taken, grads):
                p.grad = g
        work.finish()  # after torch's step: it moves the parameters' version counters (sparsity.layers)
        return loss

    # torch wraps an optimizer class's step with its hook calls (again at every load_state_dict) unless marked:
    # the hooks already run in AdamW.step above, and a second post-step hook after finish() would stale the
    # precomputed forward weights it just declared current
    step.hooked = True

    @torch.no_grad()
    def _add_decay(self, decay: list, grad_scale: torch.Tensor | None) -> None:
        """SR-STE's decay term into the gradients that owe it, as the backward would have added it (scaled like
        the gradient when a gradient scaler hands over its scale)."""
        from .methods.nm import srste_decayed_grad

        scale = 1.0 if grad_scale is None else float(grad_scale)
        for w, mask, lam in decay:
            if w.grad is not None:
                w.grad = srste_decayed_grad(w.grad, w, mask, lam * scale)

    def _layout(self, work) -> tuple | None:
        """What does not change while the mask step replays the same kernel calls (``work.batches``, kept with it
        so its id cannot come back): the weights, and per kernel batch the (weight, element offset) of every unit
        and its AdamWStep array; None where the native step cannot take these weights."""
        from .native import AdamWStep

        cached = self._layout_cache
        if cached is not None and cached[0] is work.batches:
            return cached[1]
        where = {id(p): g for g in self.param_groups for p in g["params"]}
        spans = []  # (start byte, end byte, param)
        layout = None
        for w in work.weights:
            group = where.get(id(w))
            if group is None or _static_problem(w, group):
                break
            spans.append((w.data_ptr(), w.data_ptr() + w.numel() * 4, w))
        else:
            units, covered = [], {}
            for batch in work.batches:
                per = []
                for unit in batch.units:
                    start = unit[3].data_ptr()
                    span = next((sp for sp in spans if sp[0] <= start < sp[1]), None)
                    if span is None:
                        break
                    per.append((span[2], (start - span[0]) // 4))
                    covered[id(span[2])] = covered.get(id(span[2]), 0) + unit[3].numel()
                else:
                    units.append((batch, per, (AdamWStep * len(per))()))
                    continue
                break
            else:
                if all(covered.get(id(sp[2]), 0) == sp[2].numel() for sp in spans):
                    layout = ([sp[2] for sp in spans], units)
        self._layout_cache = (work.batches, layout)
        return layout

    @torch.no_grad()
    def _native_step(self, work, decay: list) -> list[torch.Tensor]:
        """Update ``work.weights`` and compute the next masks in one native pass per kernel batch, adding the
        ``decay`` terms (SR-STE) to the gradients inside it (``work.finish()`` is the caller's, once the step is
        whole); [] (nothing done) where any weight cannot go that way this step. Everything is checked before
        anything is written."""
        layout = self._layout(work)
        if layout is None:
            return []
        params, units = layout
        # the groups as they are now: load_state_dict replaces the group dicts, a scheduler sets their lr
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        scalars: dict[tuple, tuple | None] = {}
        keys, per_param = {}, {}
        for p in params:  # the weights' own layout was checked with the layout; gradients and moments may move
            grad, state, stride, group = p.grad, self.state.get(p, {}), p.stride(), groups.get(id(p))
            if (group is None or grad is None or grad.is_sparse or grad.dtype != torch.float32
                    or grad.stride() != stride
                    or any(state[k].stride() != stride for k in ("exp_avg", "exp_avg_sq") if k in state)):
                return []
            # torch's fused step adds 1 to the counter, then reads it; ours moves once the kernels ran
            key = (id(group), float(state["step"]) + 1.0 if state else 1.0)
            if key not in scalars:
                scalars[key] = _adamw_scalars(group, key[1])
            if scalars[key] is None:  # a loaded state dict may have switched amsgrad on, say
                return []
            keys[id(p)] = key
        for p in params:
            state = self.state[p]
            if not state:  # as torch's AdamW starts a parameter (fused: the step counter on its device)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            per_param[id(p)] = (scalars[keys[id(p)]], p.grad.data_ptr(), state["exp_avg"].data_ptr(),
                                state["exp_avg_sq"].data_ptr())
        lams = {id(w): lam for w, _, lam in decay}
        for _, per, steps in units:
            for s, (p, off) in zip(steps, per):
                sc, g, m, v = per_param[id(p)]
                s.g, s.m, s.v = g + off * 4, m + off * 4, v + off * 4
                s.wdmul, s.c1, s.beta2, s.c2, s.bc2_sqrt, s.eps, s.neg_step = sc
                s.lam = lams.get(id(p), 0.0)
        taken = list(params)
        written = [t for p in taken for t in (p, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"])]
        for batch, _, steps in units:
            if not batch.run_adamw(work.beta, steps, written):  # refuses only what its mask step already ran
                raise RuntimeError("the native AdamW mask step refused a batch its mask step had run")
        torch._foreach_add_([self.state[p]["step"] for p in taken], 1.0)  # as torch's step does, in one call
        return taken


def attach_masks(optimizer: torch.optim.Optimizer, controller, srste_decay: bool = False) -> str | None:
    """Make ``optimizer`` compute ``controller``'s next masks in its step (:class:`MaskedAdamW`) where that can
    run: torch's fused AdamW on CPU with the native kernels there and matching torch bit for bit, a method whose
    mask step is a prepared native N:M pass (``ste``, ``srste``, ``mdgf``) and masked weights the native step
    takes (float32, contiguous or channels-last, whole vectors of 16 elements). Returns None when it did, else why
    not; the steps then decide one by one (the first step of a frame, a dense phase, masks not due: the usual
    path; ``native_steps`` counts the others).

    ``srste_decay``: SR-STE's decay term moves from the backward into the optimizer's pass too
    (``move_decay_to_optimizer``). Only for a loop that neither clips nor scales gradients between backward and
    step (the decay would be clipped or scaled with it) and sums no gradients over micro-batches or processes
    (DDP, accumulation: the same sum, rounded in another order)."""
    from .native import kernel

    if type(optimizer) is not torch.optim.AdamW or not all(g.get("fused") for g in optimizer.param_groups):
        return "not torch's fused AdamW"
    if getattr(controller.method, "optimizer_masks", None) is None:
        return f"method {controller.recipe.method} has no N:M mask pass"
    if os.environ.get("SPARSITY_OPTIMIZER_MASKS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "SPARSITY_OPTIMIZER_MASKS=0"
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for fqn, layer in controller.layers:
        group = groups.get(id(layer.weight))
        problem = "a weight the optimizer does not hold" if group is None else _static_problem(layer.weight, group)
        if problem is not None:
            return f"{fqn}: {problem}"
    if kernel() is None:
        return "no native kernels"
    if not _fused_matches_torch():
        return "torch's fused AdamW rounds differently on this machine"
    optimizer.__class__ = MaskedAdamW
    optimizer._masks_for = controller.optimizer_masks
    move = getattr(controller.method, "move_decay_to_optimizer", None)
    if srste_decay and move is not None and move():
        optimizer._decay_for = controller.optimizer_decay
    return None


def _fused_matches_torch() -> bool:
    """Whether ``nm_keep_adamw``'s update equals torch's fused AdamW bit for bit on this machine and torch build
    (torch's kernel is built per CPU family, and where its compiler contracted a multiply and an add matters),
    checked once on two small weights over three steps with varied gradients."""
    global _FUSED_OK
    if _FUSED_OK is None:
        from .native import AdamWStep, NativeBatch

        gen = torch.Generator().manual_seed(0)
        shapes = [(8, 4, 9), (36, 4, 1)]
        ours = [torch.randn(s, generator=gen) for s in shapes]
        ref = [torch.nn.Parameter(w.clone()) for w in ours]
        moments = [(torch.zeros_like(w), torch.zeros_like(w)) for w in ours]
        group = {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "eps": 1e-8, "fused": True}
        opt = torch.optim.AdamW(ref, lr=group["lr"], betas=group["betas"], weight_decay=group["weight_decay"],
                                eps=group["eps"], fused=True)
        batch = NativeBatch([(torch.zeros(s, dtype=torch.bool), None, torch.empty(s), w) for s, w in
                             zip(shapes, ours)], 2, 4)
        ok = True
        for step in (1, 2, 3):
            grads = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-8, 1, s, generator=gen) for s in shapes]
            for p, g in zip(ref, grads):
                p.grad = g.clone()
            opt.step()
            steps = (AdamWStep * len(shapes))()
            for s, g, (m, v) in zip(steps, grads, moments):
                s.g, s.m, s.v = g.data_ptr(), m.data_ptr(), v.data_ptr()
                s.wdmul, s.c1, s.beta2, s.c2, s.bc2_sqrt, s.eps, s.neg_step = _adamw_scalars(group, float(step))
            ok = ok and batch.run_adamw(0.0, steps, []) and all(
                torch.equal(a, b.detach()) and torch.equal(m, opt.state[b]["exp_avg"])
                and torch.equal(v, opt.state[b]["exp_avg_sq"]) for a, b, (m, v) in zip(ours, ref, moments))
        _FUSED_OK = bool(ok)
        if not ok:
            logging.getLogger(__name__).info("the native AdamW mask step differs from torch's fused AdamW in the "
                                             "last bits on this machine: masks keep their own pass")
    return _FUSED_OK
