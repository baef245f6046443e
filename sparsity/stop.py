"""A graceful stop on SIGTERM and Ctrl-C: the optimizer step in flight finishes, ``recovery.pth.tar`` is written
and the run exits, so ``--resume auto`` continues at exactly that step. Clusters send SIGTERM to a job they preempt
or whose time is up, and kill it a grace period later; without this, everything since the last
``--recovery-interval`` checkpoint (or the last epoch) was lost."""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from .errors import TrainingError

__all__ = ["StopSignals", "TrainingStopped"]

_logger = logging.getLogger("train")


class TrainingStopped(TrainingError):
    """The run stopped on a signal after writing its recovery checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Between :meth:`install` and :meth:`restore`, SIGTERM and SIGINT only note that a stop was asked for; the
    training loop asks :meth:`requested` after every optimizer step. A second Ctrl-C stops at once (the usual
    KeyboardInterrupt). Forked DataLoader workers, which get the same signals from a terminal or a job scheduler,
    ignore them: the step in flight still needs its batches, and they end with the run. Handlers can only be
    installed from the main thread; elsewhere this does nothing."""

    def __init__(self, dist) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        # the flag goes over a CPU (gloo) group: no device sync in the step loop, whatever the training backend
        self._group = torch.distributed.new_group(backend="gloo") if dist.distributed else None

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """The handlers from before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: it serves batches until the step is done
            return
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)
            _logger.warning("%s received: stopping after the current step with a recovery checkpoint%s",
                            self.received.name, " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")

    def requested(self) -> bool:
        """Whether to stop now. Under DDP every rank stops at the same step: the flag is reduced (MAX) across
        ranks, since each rank may see the signal a step apart."""
        if self._group is None:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else int(self.received)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        code = int(flag)  # a CPU tensor: no device sync
        if code and self.received is None:
            self.received = signal.Signals(code)
        return bool(code)
