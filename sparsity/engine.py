"""The training loop: ``train_one_epoch`` and ``evaluate``, used by train.py and validate.py."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import loss_scale

__all__ = ["TrainState", "train_one_epoch", "evaluate", "mean_lr", "NonFiniteLossError"]

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops instead of writing garbage."""


@dataclass
class TrainState:
    """What the loop mutates across epochs (all of it is saved in checkpoints)."""

    global_step: int = 0
    epoch: int = 0
    skipped_nonfinite: int = 0
    loss_sum: float = 0.0  # running sum over the current epoch (restored by a mid-epoch resume)
    loss_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def correct_counts(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """Per k, how many samples have their target among the top k outputs (k clipped to the number of classes), as
    an int64 tensor on the outputs' device (no host sync)."""
    maxk = min(max(topk), output.shape[-1])
    pred = output.topk(maxk, dim=-1).indices
    correct = pred.eq(target.view(-1, 1))
    return torch.stack([correct[:, : min(k, maxk)].any(dim=1).sum() for k in topk])


def mean_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr timm's train.py logs and writes to summary.csv: the mean over the parameter groups (they differ
    with --layer-decay)."""
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    return lrs[0] if len(set(lrs)) == 1 else sum(lrs) / len(lrs)  # equal lrs: no rounding in the mean


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _clip(model: nn.Module, value: float, mode: str) -> None:
    """timm's gradient clipping (``dispatch_clip_grad``); agc leaves out the classifier's two tensors, as timm's
    train.py does."""
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad

    dispatch_clip_grad(model_parameters(model, exclude_head=mode == "agc"), value, mode=mode)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    state: TrainState,
    *,
    controller=None,
    device: torch.device = torch.device("cpu"),
    lr_scheduler=None,
    amp_dtype: torch.dtype | None = None,
    scaler=None,
    model_ema=None,
    mixup_fn=None,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    accum_steps: int = 1,
    channels_last: bool = False,
    log_interval: int = 50,
    max_nonfinite: int = 0,
    skip_batches: int = 0,
    on_step: Callable[[TrainState, int], None] | None = None,
    on_resume_point: Callable[[], None] | None = None,
    is_main: bool = True,
) -> dict[str, float]:
    """One epoch. The controller steps before every forward: ``controller.step(state.global_step)``.

    ``skip_batches`` resumes mid-epoch (the loader order is deterministic per epoch). ``on_step(state, batch_idx)``
    runs after every optimizer step (recovery checkpoints hook in there); ``on_resume_point()`` runs once, when the
    first not-skipped batch is in hand (a resume restores its RNG state there). Returns ``{'loss': mean}``.

    ``accum_steps`` > 1 accumulates the gradients of that many batches per optimizer step, as timm's train.py
    ``--grad-accum-steps``: each batch's loss is divided by the size of its window (the epoch's last window may be
    shorter), and so are the gradient terms a method adds (SR-STE's decay, USD's penalty), which enter once per
    step in total; the controller steps once per window, DDP syncs gradients only on the window's last batch,
    and ``state.global_step`` counts optimizer steps. A window with a non-finite loss is skipped whole.
    ``clip_mode`` is timm's ``--clip-mode`` (norm, value, agc; agc leaves out the classifier as timm does).
    """
    model.train()
    if not skip_batches:
        state.loss_sum, state.loss_count = 0.0, 0
    loss_sum = torch.full((), state.loss_sum, dtype=torch.float64, device=device)
    count = state.loss_count
    num_batches = len(loader)
    t0 = time.perf_counter()
    last_loss = float("nan")
    if skip_batches >= num_batches:  # every step of the epoch was done (its evaluation had failed): no data to load
        batches = iter(())
    else:
        batches = iter(loader)
        for _ in range(skip_batches):  # replay the epoch's order up to the resume point
            next(batches)
    if on_resume_point is not None:
        on_resume_point()  # before the next batch is drawn, so its augmentation sees the saved RNG state
    last_idx = num_batches - 1
    window_bad = False  # a non-finite loss in this accumulation window: it gets no optimizer step
    for batch_idx, (x, y) in enumerate(batches, start=skip_batches):
        first = batch_idx % accum_steps == 0
        update = batch_idx == last_idx or (batch_idx + 1) % accum_steps == 0
        # the epoch's last window may be shorter: its batches are averaged over its own size, as timm does
        window = min(accum_steps, num_batches - (batch_idx - batch_idx % accum_steps))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if first:
            if controller is not None:  # once per optimizer step: the weights do not change within a window
                controller.step(state.global_step)
            optimizer.zero_grad(set_to_none=True)
            window_bad = False
        # DDP: reduce the gradients once, on the window's last batch
        sync = contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device, amp_dtype):
                loss = loss_fn(model(x), y)
            finite = bool(torch.isfinite(loss))  # one host sync per batch; the loss is logged anyway
            if finite and not window_bad:
                with loss_scale(scaler, divisor=window):  # gradient terms a method adds are scaled like the loss's
                    (scaler.scale(loss / window) if scaler is not None else loss / window).backward()
        if not finite:
            state.skipped_nonfinite += 1
            if state.skipped_nonfinite > max_nonfinite:
                raise NonFiniteLossError(f"non-finite loss ({float(loss.detach())}) at epoch {state.epoch} step "
                                         f"{state.global_step}")
            _logger.warning("non-finite loss at step %d skipped (%d/%d allowed)", state.global_step,
                            state.skipped_nonfinite, max_nonfinite)
            window_bad = True
        else:
            loss_sum += loss.detach().double() * x.shape[0]
            count += x.shape[0]
        if not update:
            continue
        if window_bad:  # the window's other gradients are dropped with it
            optimizer.zero_grad(set_to_none=True)
            continue
        if scaler is not None:
            if clip_grad:
                scaler.unscale_(optimizer)
                _clip(model, clip_grad, clip_mode)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip_grad:
                _clip(model, clip_grad, clip_mode)
            optimizer.step()
        state.global_step += 1
        if model_ema is not None:
            model_ema.update(model, step=state.global_step)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=state.global_step)
        state.loss_count = count
        if on_step is not None:  # the running sum is synced only when a checkpoint may need it
            state.extra["loss_sum_tensor"] = loss_sum
        if is_main and ((batch_idx // accum_steps) % log_interval == 0 or batch_idx == last_idx):
            last_loss = float(loss.detach())
            lr = mean_lr(optimizer)
            rate = count / max(time.perf_counter() - t0, 1e-9)
            _logger.info("epoch %d [%3d/%d] loss %.4f lr %.3g %.0f img/s", state.epoch, batch_idx + 1, num_batches,
                         last_loss, lr, rate)
        if on_step is not None:
            on_step(state, batch_idx)
    state.extra.pop("loss_sum_tensor", None)
    # the epoch's totals, for a checkpoint written before its evaluation (a skipped last window counted its
    # finite batches without an update)
    state.loss_sum, state.loss_count = float(loss_sum), count
    mean = state.loss_sum / count if count else float("nan")
    return {"loss": mean if not math.isnan(mean) else last_loss}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    loss_fn: Callable | None = None,
    *,
    device: torch.device = torch.device("cpu"),
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (percent) over ``loader``. ``reduce`` sums a tensor across ranks (DDP)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct1, correct5, n
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        loss = loss_fn(out, y)
        n = x.shape[0]  # counts are summed exactly (percentages in float32 were not), on the device: no host sync
        totals += torch.cat([(loss.detach().double() * n).view(1), correct_counts(out, y, (1, 5)).double(),
                             totals.new_full((1,), n)])
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    return {"loss": float(totals[0]) / n, "top1": 100.0 * float(totals[1]) / n, "top5": 100.0 * float(totals[2]) / n}
