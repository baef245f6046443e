"""The files of a training run: its folder, the checkpoints written into it, which one a resume picks and what it
must match, and the generator states that make a resume exact. :mod:`sparsity.trainer` wires these into the run."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint_file, write_atomic
from .engine import TrainState
from .errors import UserError
from .recipe import Recipe, plain, recipe_differences

_logger = logging.getLogger("train")

CKPT_RE_EPOCH = "checkpoint-{epoch}.pth.tar"


# ---------------------------------------------------------------------------------------------------------------------
# generator states (exact resume)
# ---------------------------------------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """This process's generators: torch's CPU one, the current CUDA device's (dropout, drop-path on a GPU), Python's
    and numpy's (augmentations)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def _resume_rng(resume: dict, dist) -> dict | None:
    """The generator states this rank had at a mid-epoch checkpoint (the world size is the saved one: a resume
    with another refuses). Checkpoints from before per-rank states hold rank 0's only."""
    ranks = resume.get("rng_ranks")
    if ranks and len(ranks) == dist.world_size:
        return ranks[dist.rank]
    return resume.get("rng")

# ---------------------------------------------------------------------------------------------------------------------
# the run folder and what may resume in it
# ---------------------------------------------------------------------------------------------------------------------
def _base_dir(args) -> Path:
    return Path(args.output) / (args.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}")


def resumes_in_place(args, resume_path: str | None) -> bool:
    """A resume continues in the run's own folder (``--resume auto``, or a checkpoint inside ``--experiment``'s
    folder); anything else is a new run in a folder of its own."""
    return args.resume == "auto" or bool(resume_path and Path(resume_path).resolve().parent
                                         == _base_dir(args).resolve())


def _run_dir(args, resume_path: str | None) -> Path:
    base = _base_dir(args)
    if resumes_in_place(args, resume_path):
        return base
    if base.exists() and not base.is_dir():
        raise UserError(f"{base} is a file, not a run folder; choose another --experiment or --output")
    out, i = base, 1
    while out.exists() and any(out.iterdir()):  # never write into a finished run: timm's -1, -2 suffixes
        out = Path(f"{base}-{i}")
        i += 1
    return out


def resolved_config(args, recipe: Recipe) -> dict:
    """What a run's ``args.yaml`` holds: train.py's settings with the recipe normalized (plain types)."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    cfg["sparsity"] = recipe.to_dict()
    return plain(cfg)


def check_writable(path: Path, flag: str = "--output", what: str = "output dir") -> None:
    """Create the folder ``path`` if needed and write a probe file into it (a permission check alone would pass a
    read-only file system for root): one message naming ``flag`` when that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e}); choose another {flag}") from None


def run_epochs(args, recipe: Recipe | None = None) -> int:
    """How many epochs the run trains: as in timm's train.py, the length of the lr schedule timm builds from
    ``--epochs``, i.e. plus ``--cooldown-epochs`` (and the extra cycles of ``--lr-cycle-limit``, the warm-up of
    ``--warmup-prefix``). The sparsity schedule is laid out over all of it. With ``recipe``, a recipe that cannot
    run that long (USD's fine-tune epochs covering the whole run) is refused."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        _, n = create_scheduler_v2(probe, **scheduler_kwargs(args), updates_per_epoch=1)
    except (AssertionError, ValueError, ZeroDivisionError) as e:  # timm's checks, e.g. plateau per update
        raise UserError(f"timm cannot build the lr schedule --sched {args.sched} from these settings "
                        f"({type(e).__name__}: {str(e).strip() or 'rejected'}); check --sched-on-updates (plateau "
                        "steps per epoch only), --decay-epochs/--decay-milestones and the warm-up flags") from None
    n = max(int(n), args.epochs)
    if recipe is not None:
        from .methods import get_method

        get_method(recipe.method).check_run_length(recipe, n)
    return n


def _check_same_run(resume: dict, path: str, recipe: Recipe, args, n_epochs: int) -> None:
    """A resume continues one run: the same sparsity recipe and, for sparse recipes, the same length ``n_epochs``
    (:func:`run_epochs`; phases, ramps and decays are fractions of the whole run, so another length would move them
    mid-run)."""
    saved = resume.get("recipe")
    if saved is not None and (keys := recipe_differences(saved, recipe.to_dict())):
        raise CheckpointError(f"--resume {path} was trained with another sparsity recipe (differs in: "
                              f"{', '.join(keys)}); resume with the config the run started with (its args.yaml), or "
                              "start a new run from it with --initial-checkpoint")
    saved_args = resume.get("args") or {}
    epochs = saved_args.get("epochs")
    if recipe.method != "dense" and epochs is not None:
        if "run_epochs" in resume:
            then, cooldown = resume["run_epochs"], saved_args.get("cooldown_epochs", 0)
        else:  # written before the cooldown was trained: the run was exactly --epochs long
            then, cooldown = epochs, 0
        if then != n_epochs:
            flags = [f"--epochs {epochs}", f"--cooldown-epochs {cooldown}"]
            flags += [f"--{k.replace('_', '-')} {saved_args[k]}" for k in ("lr_cycle_limit", "lr_cycle_mul")
                      if k in saved_args and saved_args[k] != getattr(args, k, saved_args[k])]
            raise CheckpointError(f"--resume {path} is from a {then}-epoch run, this one would train {n_epochs}: the "
                                  f"sparsity schedule is laid out over the whole run; resume with {' '.join(flags)}, "
                                  "or start a new run from it with --initial-checkpoint")


def _checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoints, whatever their state: recovery, last, checkpoint-<epoch> and model_best (temp files
    of a killed write start with a dot and are not among them)."""
    names = ["recovery.pth.tar", "last.pth.tar", "model_best.pth.tar"]
    return [run_dir / n for n in names if (run_dir / n).exists()] + sorted(run_dir.glob("checkpoint-*.pth.tar"))


def load_newest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in ``run_dir`` and its contents (read once). ``recovery``/``last`` are the
    newest when intact, and the older files are not read then; when both are damaged an older ``checkpoint-<epoch>``
    or ``model_best`` is still a resume point, far better than starting over in a folder whose files a new run
    would then overwrite."""
    rank = {"last.pth.tar": 3, "recovery.pth.tar": 2, "model_best.pth.tar": 0}  # ties: the epoch checkpoint first
    files = _checkpoint_files(run_dir)
    latest = [p for p in files if p.name in ("recovery.pth.tar", "last.pth.tar")]
    for tier in (latest, [p for p in files if p not in latest]):
        best, best_key = None, None
        for p in tier:
            try:
                ck = load_checkpoint_file(p)
            except CheckpointError:
                _logger.warning("ignoring unreadable checkpoint %s", p)
                continue
            key = (int(ck.get("global_step", -1)), rank.get(p.name, 1))
            if best_key is None or key > best_key:
                best, best_key = (p, ck), key
        if best is not None:
            return best
    return None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The path of :func:`load_newest_checkpoint`."""
    found = load_newest_checkpoint(run_dir)
    return found[0] if found else None

# ---------------------------------------------------------------------------------------------------------------------
# checkpoints written at the end of an epoch
# ---------------------------------------------------------------------------------------------------------------------
def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy with :func:`write_atomic`: a crash never leaves a partial model_best/checkpoint-N, and a failed copy
    (disk full) is one message; ``src`` stays intact."""
    try:
        with open(src, "rb") as f_src:
            write_atomic(dst, lambda f: shutil.copyfileobj(f_src, f, 16 << 20))  # 16 MiB reads: few Python rounds
    except OSError as e:
        raise UserError(f"could not copy {src.name} to {dst.name} ({e.strerror or e}); free space or choose another "
                        f"--output. {src.name} is intact") from None


def _better(a: float, b: float, lower_is_better: bool) -> bool:
    return a < b if lower_is_better else a > b


def _claim_best(state: TrainState, metric: float, epoch: int, problem: str | None, lower_is_better: bool,
                final: bool = False) -> bool:
    """Make ``[metric, epoch]`` the run's best if it beats the best so far and the model is at the recipe's target
    (``problem`` None); True if it did. The ``final`` model (fixed binary masks, pruned weights zero) also takes a
    tie: it usually scores exactly what the last epoch did, and unlike that epoch's checkpoint it loads into timm
    with ``strict=False`` exactly."""
    best = state.extra.get("best")
    beats = best is None or _better(metric, best[0], lower_is_better) or (final and metric == best[0])
    if beats and problem is not None:
        _logger.info("epoch %d (eval metric %.4g) is not a model_best candidate: %s", epoch, metric, problem)
    if beats and problem is None:
        state.extra["best"] = [metric, epoch]
        return True
    return False


def _save_epoch(run_dir: Path, checkpoint_dict, save, state: TrainState, epoch: int, metric: float,
                keep: int, problem: str | None, lower_is_better: bool) -> None:
    """last.pth.tar every epoch; checkpoint-<epoch> for the ``keep`` best epochs; model_best for the best epoch
    at the recipe's target.

    ``problem`` (:func:`~sparsity.report.target_problem`) says why this epoch's model is not yet the sparse model
    the recipe asks for (dense warm-up, GMP ramp, an SDGF step above the final N:M, MDGF's beta > 0). Such an
    epoch is kept as last/checkpoint-<epoch> (resume needs them) but never becomes model_best: fine-tuning from a
    pretrained model, its top-1 is often the run's highest, and model_best is what users export.
    """
    last = run_dir / "last.pth.tar"
    new_best = _claim_best(state, metric, epoch, problem, lower_is_better)
    hist = [list(h) for h in state.extra.get("hist") or []]
    hist.append([metric, epoch])
    hist.sort(key=lambda h: (h[0] if lower_is_better else -h[0], -h[1]))  # best first; ties: the later epoch
    dropped = hist[keep:] if keep >= 0 else []
    state.extra["hist"] = hist[:keep] if keep >= 0 else hist
    copies = [CKPT_RE_EPOCH.format(epoch=epoch)] if any(e == epoch for _, e in state.extra["hist"]) else []
    copies += ["model_best.pth.tar"] if new_best else []
    drops = [CKPT_RE_EPOCH.format(epoch=e) for _, e in dropped]
    # last.pth.tar names the copies it owes and the files it drops: a crash before they are done is mended on
    # resume (finish_epoch_files)
    save({**checkpoint_dict(epoch + 1, 0, metric), "copies": copies, "drops": drops}, last)
    settle_last(run_dir, copies, drops)
    _remove_stale(run_dir / "recovery.pth.tar")  # superseded by last.pth.tar


def settle_last(run_dir: Path, copies, drops=()) -> None:
    """Copy the just-written ``last.pth.tar`` to the files it names (checkpoint-<epoch>, model_best) and delete the
    epoch checkpoints it dropped: at the end of an epoch, at the end of the run, and again on resume."""
    last = run_dir / "last.pth.tar"
    for name in copies:
        _copy_atomic(last, run_dir / name)
    for name in drops:
        _remove_stale(run_dir / name)


def finish_epoch_files(run_dir: Path, path: str | Path, ck: dict, newest: bool = True) -> None:
    """Resuming in the run's folder: delete the temporary files of interrupted writes; from its ``last.pth.tar``,
    also redo what a crash may have cut short after it was written: its ``copies`` (checkpoint-<epoch>,
    model_best) and ``drops`` (epoch checkpoints ``--checkpoint-hist`` no longer keeps), and the deletion of the
    recovery file it superseded (``newest``: the resume took the newest checkpoint, as ``--resume auto`` does;
    otherwise only a recovery file older than last.pth.tar goes). Without this, a crash between writing
    last.pth.tar and copying it lost that model_best for good: the resumed run saw the best as already claimed."""
    for tmp in run_dir.glob(".*.tmp"):  # write_atomic's temporaries of writes a crash cut short
        _remove_stale(tmp)
    last = run_dir / "last.pth.tar"
    if Path(path).resolve() != last.resolve() or ck.get("skip_batches"):
        return
    settle_last(run_dir, ck.get("copies") or [], ck.get("drops") or [])
    recovery = run_dir / "recovery.pth.tar"
    if recovery.exists() and (newest or recovery.stat().st_mtime <= last.stat().st_mtime):
        _remove_stale(recovery)


def claim_run_dir(run_dir: Path, args) -> Path:
    """Claim the folder of a new run by creating its ``args.yaml`` exclusively (rewritten with the config later):
    two runs started at once with one ``--experiment`` took the same folder, both having found it free. A folder
    claimed in between makes this run take the next free name. Returns the folder claimed."""
    base, i = (Path(args.output) / args.experiment) if args.experiment else run_dir, 1
    while True:
        check_writable(run_dir)
        try:
            os.close(os.open(run_dir / "args.yaml", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return run_dir
        except FileExistsError:
            while True:
                run_dir = Path(f"{base}-{i}")
                i += 1
                if not (run_dir.exists() and any(run_dir.iterdir())):
                    break


class RunLock:
    """One training process per run folder: an exclusive POSIX lock (``lockf``) on ``RUN/.run.lock``, held from
    before a resume picks its checkpoint there (or from the claim of a new run's folder) until the run ends. A
    second train.py on the same folder (a job launched twice, a requeue racing the old job, ``--resume auto`` on a
    folder a run is still writing) would interleave its checkpoints and summary rows with the first's; it is
    refused instead, naming the holder. The kernel releases the lock when the holder dies, even by SIGKILL, so a
    crashed run never blocks its own ``--resume auto``; a POSIX lock (unlike ``flock``) is not inherited by the
    forked data-loader workers, which may outlive a killed parent by seconds, and NFS supports it. The file stays
    once the run has written into its folder (deleting a lock file others may have opened would let two processes
    lock different files); a run refused before that removes it, and so does a new run that fails before writing
    anything but its args.yaml (:meth:`discard_unused_folder`, which removes the folder too, while still holding the
    lock: a process that opened the file before can at worst lock the removed file of a removed folder). On a file
    system without locks the run goes on with a warning. Under torchrun only rank 0 takes it."""

    NAME = ".run.lock"

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.wrote = False  # set once the run writes into its folder; until then release() removes the file
        self.claimed: Path | None = None  # the folder a new run claimed (not one it resumes in)

    def acquire(self, run_dir: Path) -> None:
        import errno
        import fcntl
        import json
        import socket

        if self.fd is not None and self.path == run_dir / self.NAME:
            return
        self.release()
        path = run_dir / self.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    _logger.warning("cannot lock %s on this file system (%s); nothing stops a second run in this "
                                    "folder", run_dir, e.strerror or e)
                    return
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "its process did not say which"
            raise UserError(f"run folder {run_dir} is in use by another train.py ({who}); wait for it to end or stop "
                            "it, or pass another --experiment") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd, self.path = fd, path

    def discard_unused_folder(self) -> None:
        """After a failure: the folder this new run claimed goes again when it holds nothing but the run's
        args.yaml and lock file (a corrupt image or a crash in the first epoch, before any checkpoint), so that a
        retry gets the same name instead of a ``-1`` next to an empty folder. Removed while the lock is held."""
        run_dir = self.claimed
        if run_dir is None or self.fd is None or self.path != run_dir / self.NAME:
            return
        try:
            if {p.name for p in run_dir.iterdir()} - {"args.yaml", self.NAME}:
                return  # a checkpoint, a row, a plot: the run's work stays
            (run_dir / "args.yaml").unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = self.path = None
            run_dir.rmdir()
        except OSError as e:
            _logger.warning("could not remove the unused run folder %s (%s)", run_dir, e.strerror or e)

    def release(self) -> None:
        """Drop the lock. A run refused before its first write removes the file too (still holding the lock, so
        no one else holds that file), leaving the folder as it found it."""
        if self.fd is not None:
            if not self.wrote:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # drops the lock
            self.fd = self.path = None


def _remove_stale(path: Path) -> None:
    """Delete a file the run no longer needs; one that cannot be deleted only costs disk space, so the run goes on."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        _logger.warning("could not delete %s (%s); the run goes on, delete it by hand", path, e.strerror or e)
