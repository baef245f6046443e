"""Checkpoint I/O: atomic writes, safe loads (``weights_only=True``), clear errors for bad files."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .errors import UserError

__all__ = [
    "CheckpointError", "model_from_checkpoint", "save_atomic", "write_atomic", "write_csv_atomic",
    "load_checkpoint_file", "model_state_from", "load_model_weights", "checkpoint_create_kwargs", "check_fields",
]


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says which file and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (best effort: not every file system allows opening a directory)."""
    try:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "wb", before_rename=None,
                 newline: str | None = None) -> None:
    """``write(f)`` into a temp file in the same dir, fsync, then rename: a crash never leaves a partial file
    under ``path`` and the previous version survives until the new one is complete. The file gets the mode a plain
    ``open()`` would give it. ``newline`` is ``open``'s (text modes; csv wants ``""``). ``before_rename()`` is a
    test hook (fault injection between write and rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_csv_atomic(path: str | os.PathLike, fieldnames: list[str], rows, restval: str = "") -> None:
    """A CSV with ``fieldnames`` as header and ``rows`` (dicts; missing keys get ``restval``), written atomically."""
    def write(f):
        w = csv.DictWriter(f, fieldnames=fieldnames, restval=restval, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_atomic(path, write, mode="w", newline="")


def save_atomic(obj: Any, path: str | os.PathLike, before_rename=None) -> None:
    """``torch.save`` with :func:`write_atomic`."""
    write_atomic(path, lambda f: torch.save(obj, f), before_rename=before_rename)


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Load a ``.pth``/``.pth.tar``/``.bin`` (``weights_only=True``) or ``.safetensors`` file into a dict."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(_directory_hint(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                compressed = (f.metadata() or {}).get("sparsity.format") == "compressed"
            if not compressed:
                return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e}); re-export it") from None
        raise CheckpointError(f"{path} is a compressed export (kept values and indices, not a state dict): pass its "
                              "folder, with the config.json written beside it, to validate.py, or load it with "
                              "sparsity.load_compressed; a densified export (model.safetensors) is the state dict")
    _check_zip_crc(path)
    try:
        # timm's train.py stores its argparse.Namespace as "args": allowed, as timm's own loader does
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "This file can still be loaded" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"checkpoint {path} needs arbitrary pickled code to load, which is refused for safety "
                "(weights_only=True); re-save it with plain tensors and types"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); use another "
                              "checkpoint (e.g. the previous checkpoint-*.pth.tar)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    if isinstance(obj.get("args"), argparse.Namespace):
        obj["args"] = vars(obj["args"])
    return obj


def check_fields(path, ckpt: dict) -> None:
    """The fields a model is rebuilt from have their types (a damaged or foreign file: one message, not a
    traceback deep in timm)."""
    for key, kind in (("arch", str), ("create_kwargs", dict), ("recipe", dict), ("args", dict)):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], kind):
            raise CheckpointError(f"checkpoint {path}: its '{key}' is a {type(ckpt[key]).__name__}, not a "
                                  f"{kind.__name__}; the file is damaged or not a train.py checkpoint")


def checkpoint_create_kwargs(ckpt: dict) -> dict:
    """What ``timm.create_model`` took besides the name for the model in ``ckpt``: our ``create_kwargs``, or for a
    checkpoint of timm's train.py (which stores none) what that script passes: ``--model-kwargs``,
    ``--num-classes``, ``--in-chans`` and ``--gp`` from its ``args``."""
    if ckpt.get("create_kwargs") is not None:
        return dict(ckpt["create_kwargs"])
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    out = dict(args.get("model_kwargs") or {})
    for key, name in (("num_classes", "num_classes"), ("in_chans", "in_chans"), ("gp", "global_pool")):
        if args.get(key) is not None:
            out[name] = args[key]
    return out


def _check_zip_crc(path: Path) -> None:
    """torch.load does not check the CRC32 its zip format stores: flipped bits inside a tensor (a failing disk, a
    bad copy) loaded as if they were weights. The check reads the file once more (about a second per GB)."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format, or not a zip at all: torch.load says what is wrong
    bad = None
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0:  # torch.save with compute_crc32=False stores none: nothing to check
                    continue
                try:
                    with z.open(info) as f:  # reading to the end checks the CRC
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    bad = info.filename
                    break
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # a damaged directory: torch.load reports it as truncated or corrupt
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (its stored checksum does not match {bad}); use another "
                              "checkpoint (e.g. the previous checkpoint-*.pth.tar)")


def _directory_hint(path: Path) -> str:
    if (path / "config.json").is_file():
        weights = (f"pass its weights file {path / 'model.safetensors'}, or " if (path / "model.safetensors").is_file()
                   else "pass ")
        return (f"{path} is an export directory, not a training checkpoint; {weights}the .pth.tar it was exported "
                "from (validate.py and sparsity.export.load_for_eval read export directories)")
    found = sorted(p.name for p in path.glob("*.pth.tar"))
    if found:
        pick = "model_best.pth.tar" if "model_best.pth.tar" in found else found[-1]
        return f"{path} is a run directory; pass one of its checkpoints, e.g. {path / pick}"
    return f"{path} is a directory, not a checkpoint file; pass a .pth.tar or .safetensors file"


def model_state_from(ckpt: dict, use_ema: bool = False) -> dict:
    """The model state dict inside one of our checkpoints, a timm checkpoint, or a bare state dict."""
    if use_ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(ckpt.get(key), dict):  # train.py stores None when the run had no EMA
                return ckpt[key]
        raise CheckpointError("--use-ema: the checkpoint holds no EMA weights (train with --model-ema)")
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def _keep_fresh_head(model: nn.Module, state: dict, path) -> dict:
    """A checkpoint whose classifier has another number of classes (ImageNet weights for a CIFAR-100 run): the
    model's classifier keeps its fresh initialisation, as timm does when it loads pretrained weights for another
    ``num_classes``. Every other tensor must still fit."""
    from .targets import _classifier_names  # the modules the `head` target selects

    heads = sorted(_classifier_names(model))
    own = model.state_dict()
    swapped = [k for k, v in state.items() if k in own and own[k].shape != v.shape
               and any(k.startswith(h + ".") for h in heads)]
    if not swapped:
        return state
    first = next((k for k in swapped if k.endswith(".weight")), swapped[0])
    logging.getLogger(__name__).warning(
        "%s: its classifier (%s) predicts %d classes, this model %d: the classifier keeps its fresh initialisation "
        "(as timm does for pretrained weights); every other tensor is loaded", path, ", ".join(heads),
        state[first].shape[0], own[first].shape[0])
    return {**state, **{k: own[k] for k in swapped}}


def load_model_weights(model: nn.Module, path: str | os.PathLike, use_ema: bool = False, strict: bool = True,
                       ckpt: dict | None = None, fresh_head: bool = False) -> dict:
    """Load weights into ``model``; a mismatch (another architecture) is a :class:`CheckpointError` naming keys.
    ``ckpt``: the file's contents when the caller has already loaded them (read once). ``fresh_head``: a
    classifier for another number of classes is left as initialised (fine-tuning onto another data set)."""
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    state = model_state_from(ckpt, use_ema)
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    if fresh_head:
        state = _keep_fresh_head(model, state, path)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None
        mine = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if arch and mine and arch != mine:  # the plain reason first: the masks below would be a red herring
            raise CheckpointError(f"checkpoint {path} is a checkpoint of '{arch}', not '{mine}'; pass one of "
                                  f"'{mine}' (or train it first)") from None
        own = model.state_dict()
        masked = [k.removesuffix(".weight_mask") for k in state if k.endswith(".weight_mask") and k not in own]
        if masked:
            rebuildable = arch and ckpt.get("recipe") is not None  # what export.py needs to build the model
            export = (f", or export it densified first (export.py --checkpoint {path} --format densified) and pass "
                      "the export's model.safetensors") if rebuildable else ""
            raise CheckpointError(
                f"checkpoint {path} is sparse: it holds masks for {len(masked)} layer(s) this run's recipe leaves "
                f"dense ({', '.join(masked[:3])}{', ...' if len(masked) > 3 else ''}); use a recipe that covers "
                f"them{export}"
            ) from None
        first = str(e).split("\n")
        detail = " ".join(line.strip() for line in first[1:3])[:400]
        guess = "another architecture or num_classes?"
        if "size mismatch for pos_embed" in str(e):  # a ViT's position embedding for another input size
            guess = ("weights for another input size? build the model for theirs (--model-kwargs img_size=...), "
                     "or, to train at this size, pass the file to train.py as --pretrained-path, which resamples "
                     "the position embedding")
        raise CheckpointError(f"checkpoint {path} does not fit this model ({guess}): {detail}") from None
    n_masks = sum(k.endswith("weight_mask") for k in state)
    logging.getLogger(__name__).info(
        "loaded %d tensors from %s%s: %s", len(state), path, " (EMA weights)" if use_ema else "",
        f"masks of {n_masks} layer(s) included" if n_masks else "no masks (the recipe computes them at the first step)")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "checkpoint": ckpt}


def model_from_checkpoint(path: str | os.PathLike, use_ema: bool = False,
                          ckpt: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the sparse model a training checkpoint was written from, with its weights and masks.

    Our checkpoints hold ``arch`` (timm model name), ``create_kwargs`` (everything passed to
    ``timm.create_model``: num_classes, model kwargs) and ``recipe`` (the ``sparsity:`` block as plain types).
    ``ckpt``: the file's contents when the caller has already loaded them (read once). Returns
    ``(model, checkpoint_dict)``; the model's ``pretrained_cfg`` holds the run's input size, mean/std, crop and
    interpolation (so ``export_densified``/``export_compressed`` of it record them too).
    """
    from .factory import create_model
    from .recipe import recipe_from_dict

    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    if "arch" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'arch': a bare state dict, not a train.py checkpoint, so "
                              "the model and recipe it needs are unknown; validate.py takes it with --model NAME (and "
                              "--config YAML for its recipe); in Python, sparsity.create_model(NAME, recipe=..., "
                              f"checkpoint='{path}') builds it for export_densified/export_compressed")
    check_fields(path, ckpt)
    recipe = recipe_from_dict(ckpt.get("recipe") or {}, source=f"{path} (recipe)")
    state = model_state_from(ckpt, use_ema)  # e.g. no EMA weights: refused before the model is built
    model = create_model(ckpt["arch"], recipe=recipe, **checkpoint_create_kwargs(ckpt))
    if ckpt.get("metric_model") == "ema" and not use_ema:
        logging.getLogger(__name__).warning(
            "%s: its metric and the model_best ranking come from the EMA weights (trained with --model-ema); these "
            "are the live weights: pass --use-ema for the EMA ones", path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its own arch/recipe: {str(e)[:400]}") from None
    _note_mid_run(path, ckpt, recipe)
    from .data import trained_data_config

    trained = trained_data_config(ckpt.get("args"), model)
    if trained:  # the preprocessing the run trained with: what an export writes for validate.py and timm users
        model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", {}) or {}),
                                **{k: trained[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}}
    return model, ckpt


def _note_mid_run(path, ckpt: dict, recipe) -> None:
    """Warn when the rebuilt model is not the one the run evaluated at the checkpoint's step (MDGF's decay)."""
    from .methods import get_method

    steps, epochs = ckpt.get("steps_per_epoch"), ckpt.get("run_epochs") or (ckpt.get("args") or {}).get("epochs")
    if ckpt.get("global_step") is None or not steps or not epochs:
        return
    note = get_method(recipe.method).checkpoint_note(recipe, int(ckpt["global_step"]), int(steps) * int(epochs))
    if note:
        logging.getLogger(__name__).warning("%s: %s", path, note)
