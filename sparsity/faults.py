"""Fault injection for the reliability tests, driven by ``SPARSITY_FAULT=<point>:<step>[:<rank>]``.

Nothing here does anything unless that variable is set. Points: ``after_step`` and ``during_save`` (SIGKILL, once
per run folder), ``sigterm`` (SIGTERM after that step, once per run folder: the graceful stop), ``nan_loss`` (the
loss of that step becomes NaN), ``diverge_mask`` (the trainer flips one mask entry on that rank), ``pause`` (the
process sleeps two minutes after that step, once per run folder, holding its run folder: a test kills it).
"""

from __future__ import annotations

import os
from pathlib import Path

from .engine import TrainState

__all__ = ["fault_matches", "fault_loss", "inject_fault"]


def fault_matches(point: str, global_step: int, rank: int) -> bool:
    """Fault injection for the reliability tests: ``SPARSITY_FAULT=<point>:<step>[:<rank>]``."""
    spec = os.environ.get("SPARSITY_FAULT")
    if not spec:
        return False
    parts = spec.split(":")
    return parts[0] == point and int(parts[1]) == global_step and (len(parts) < 3 or int(parts[2]) == rank)


def fault_loss(loss_fn, state: TrainState):
    """``SPARSITY_FAULT=nan_loss:<step>`` makes the loss at that step NaN (tests of the non-finite guard)."""
    if not (os.environ.get("SPARSITY_FAULT") or "").startswith("nan_loss:"):
        return loss_fn

    fired: list[bool] = []

    def wrapped(out, target):
        loss = loss_fn(out, target)
        if not fired and fault_matches("nan_loss", state.global_step, 0):
            fired.append(True)  # once: a skipped step does not advance global_step
            return loss * float("nan")
        return loss

    return wrapped


def inject_fault(point: str, global_step: int, rank: int, run_dir: Path) -> None:
    """SIGKILL this process at ``point`` once (``after_step``, ``during_save``; ``sigterm``: SIGTERM; ``pause``: a
    sleep instead); a marker file in the run dir keeps a restarted run from dying (or pausing) again."""
    if not fault_matches(point, global_step, rank):
        return
    marker = run_dir / f".fault-{point}-{global_step}-{rank}"
    if marker.exists():
        return
    marker.write_text("fired")
    if point == "pause":
        import time

        time.sleep(120)
        return
    import signal

    os.kill(os.getpid(), signal.SIGTERM if point == "sigterm" else signal.SIGKILL)
