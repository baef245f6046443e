"""Export a sparse model: densified timm weights or a compressed N:M / BSR file, and load either back.

Two on-disk formats, both a directory with a timm-style ``config.json`` (``architecture``, ``num_classes``,
``model_args``, ``pretrained_cfg``) plus our own ``sparsity`` block (format, create kwargs, recipe, per-layer
report):

* **densified** -- ``model.safetensors`` with masks baked in (W * E) under stock timm keys. It loads with
  ``strict=True`` into ``timm.create_model(architecture, **create_kwargs)``, and ``timm.create_model(
  "local-dir:DIR", pretrained=True)`` reads the directory directly.
* **compressed** -- ``model_compressed.safetensors``: every masked weight is cut into row segments (one per
  :class:`~sparsity.layers.SliceSpec`, plus dense gaps) and each segment is stored as

  - ``nm``: the kept values (``n`` of every ``m``, weight dtype) and their positions inside the group (uint8);
  - ``bsr``: BSR components of the 2-D view: ``crow_indices``, ``col_indices`` (int32) and the kept
    ``tile`` x ``tile`` blocks;
  - ``bitmap``: the kept values in row-major order plus the mask as packed bits (unstructured slices, and
    N:M / block slices whose mask does not fit the pattern), when that is smaller than dense;
  - ``dense``: the masked values as they are (rows outside every slice, masks too dense for a bitmap);

  plus packed mask bits where the mask cannot be recovered from the layout alone. Everything else is stored
  dense under its stock key. The layout (JSON) sits in the safetensors metadata under ``sparsity.layout``.

Both files carry a CRC-32 of every tensor's bytes in their metadata (``sparsity.crc32``; safetensors itself
checks only the header): a damaged copy is refused on load, naming the tensor, instead of evaluating wrong
weights. Files written before the checksums load without the check.

Loading is bit-exact: every weight equals ``weight * weight_mask`` of the exported model (``torch.equal``;
a pruned ``-0.0`` comes back as ``0.0``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, _umask, checkpoint_create_kwargs, model_from_checkpoint
from .codec import decode_weight, encode_weight
from .errors import UserError
from .layers import MaskedConv2d, MaskedLinear, SliceSpec, frozen_weight, masked_modules
from .recipe import plain
from .report import sparsity_report
from .surgery import densify_, set_submodule

__all__ = [
    "ExportError", "DENSIFIED_FILE", "COMPRESSED_FILE", "CONFIG_FILE", "export_densified", "export_compressed",
    "export_checkpoint", "load_densified", "load_compressed", "load_for_eval", "use_binary_masks_",
    "encode_weight", "decode_weight",
]

_logger = logging.getLogger(__name__)

DENSIFIED_FILE = "model.safetensors"
COMPRESSED_FILE = "model_compressed.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
_LAYOUT_KEY = "sparsity.layout"
_CRC_KEY = "sparsity.crc32"


class ExportError(UserError):
    """An export cannot be written or read; the message says what to do (CLIs: exit code 2)."""


# ---- binary-mask forward --------------------------------------------------------------------------------------
def use_binary_masks_(model: nn.Module) -> nn.Module:
    """Make every masked layer's forward ``W * E`` with its stored binary mask (what export ships).

    A model rebuilt from a checkpoint already evaluates ``W * E`` for the built-in methods (N:M layers start in
    ``ste`` mode with beta 0; learned masks evaluate their argmax / top-k, which ``weight_mask`` holds). This makes
    it explicit for any method, a registered third-party one included, and drops a method's extra forward work.
    """
    for _, layer in masked_modules(model):
        layer.weight_fn = frozen_weight
    return model


# ---- building the export ----------------------------------------------------------------------------------------
def _config(model: nn.Module, arch: str, create_kwargs: dict, recipe: dict | None, fmt: str, report: list[dict],
            slices: dict, extra: dict | None) -> dict:
    """timm's hub ``config.json`` layout (so ``local-dir:`` works for densified exports) plus our block."""
    from timm.models._pretrained import filter_pretrained_cfg

    pcfg = filter_pretrained_cfg(dict(getattr(model, "pretrained_cfg", {}) or {}), remove_source=True)
    try:
        from timm.models import get_pretrained_cfg

        stock_input = get_pretrained_cfg(arch).input_size
    except Exception:  # noqa: BLE001 - an architecture without a registered config: no stock size to compare
        stock_input = None
    for k in ("custom_load", "tag"):
        pcfg.pop(k, None)
    pcfg["architecture"] = arch
    num_classes = create_kwargs.get("num_classes", getattr(model, "num_classes", None))
    pcfg["num_classes"] = num_classes
    img = create_kwargs.get("img_size")
    if isinstance(img, int) or (isinstance(img, (list, tuple)) and len(img) == 2):
        size = (img, img) if isinstance(img, int) else tuple(img)
        pcfg["input_size"] = (pcfg.get("input_size", (3,))[0], *size)
    # the stock weights' test-time size and crop (ConvNeXt: 288 px, crop 1.0), which timm's validate.py prefers,
    # are not how this model was evaluated; nor does the stock pool size hold at another input size
    for key in ("test_input_size", "test_crop_pct"):
        pcfg.pop(key, None)
    if "pool_size" in pcfg and tuple(pcfg.get("input_size") or ()) != tuple(stock_input or ()):
        pcfg.pop("pool_size")
    cfg = {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": getattr(model, "num_features", None),
        "model_args": {k: v for k, v in create_kwargs.items() if k != "num_classes"},
        "pretrained_cfg": pcfg,
        "sparsity": {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "weights_file": DENSIFIED_FILE if fmt == "densified" else COMPRESSED_FILE,
            "create_kwargs": create_kwargs,
            "recipe": recipe,
            "slices": slices,
            "layers": report,
            **(extra or {}),
        },
    }
    return plain(cfg)


def _check_timm_fit(arch: str, create_kwargs: dict, state: dict[str, torch.Tensor]) -> None:
    """The densified state dict must load strictly into ``timm.create_model(arch, **create_kwargs)``."""
    import timm

    if not timm.is_model(arch):
        raise ExportError(f"architecture '{arch}' is not a timm model; pass arch= (the timm model name)")
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            ref = timm.create_model(arch, **create_kwargs).state_dict()
    except Exception:  # noqa: BLE001 - a model whose __init__ needs real tensors: build it for real
        ref = timm.create_model(arch, **create_kwargs).state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    shapes = [k for k in ref if k in state and tuple(ref[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ExportError(
            f"the exported weights do not fit timm.create_model('{arch}', **{create_kwargs}): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}; pass the create_kwargs the model was built with"
        )


def _plain_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


@torch.no_grad()
def _build(model: nn.Module, arch: str | None, create_kwargs: dict | None, recipe: dict | None) -> dict[str, Any]:
    """Everything both formats need, computed once from a copy of ``model`` (the original is not touched)."""
    if arch is None:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not arch:
            raise ExportError("cannot tell the timm architecture of this model; pass arch=")
    if create_kwargs is None:
        create_kwargs = {"num_classes": getattr(model, "num_classes", 1000)}
        _logger.warning("export: create_kwargs not given, assuming %s", create_kwargs)
    if recipe is None and getattr(model, "sparsity_recipe", None) is not None:
        recipe = model.sparsity_recipe.to_dict()
    work = use_binary_masks_(copy.deepcopy(model)).cpu().eval()
    report = sparsity_report(work)
    for row in report:
        if row["conforms"] is False:
            _logger.warning("export: %s does not conform to its pattern %s", row["fqn"], row["pattern"])
    skipped = dict(getattr(work, "sparsity_skipped", {}))  # what sparsify_ left out and why (densify_ drops it)
    layers = masked_modules(work)
    slices = {fqn: [asdict(s) for s in layer.slices] for fqn, layer in layers}
    methods = {fqn: layer.method for fqn, layer in layers}
    compressed, layout = {}, {}
    for fqn, layer in layers:
        key = f"{fqn}.weight" if fqn else "weight"
        tensors, layout[key] = encode_weight(layer, key)
        compressed.update(tensors)
    dense = _plain_state(densify_(work).state_dict())
    _check_timm_fit(arch, dict(create_kwargs), dense)
    for k, v in dense.items():
        if k not in layout:
            compressed[k] = v
    return {"arch": arch, "create_kwargs": dict(create_kwargs), "recipe": recipe, "report": report,
            "slices": slices, "methods": methods, "dense": dense, "compressed": compressed, "layout": layout,
            "model": work, "skipped": skipped}


def _compressed_metadata(build: dict[str, Any]) -> dict[str, str]:
    layout = json.dumps(build["layout"])  # checksummed too: a flipped digit in it would decode into wrong weights
    return {"format": "pt", "sparsity.format": "compressed", _LAYOUT_KEY: layout,
            _CRC_KEY: _crc32s(build["compressed"], {_LAYOUT_KEY: zlib.crc32(layout.encode())})}


def _crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _crc32s(tensors: dict[str, torch.Tensor], extra: dict[str, int] | None = None) -> str:
    return json.dumps({**{k: _crc32(t) for k, t in tensors.items()}, **(extra or {})})


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the files of ``tmp`` into ``out`` (config.json last). Only our own file names are ever replaced."""
    _refuse_existing(out, force)  # again: another process may have written there meanwhile
    out.mkdir(parents=True, exist_ok=True)
    clash = [n for n in (DENSIFIED_FILE, COMPRESSED_FILE, CONFIG_FILE) if (out / n).exists()]
    produced = sorted(p.name for p in tmp.iterdir())
    for name in sorted(produced, key=lambda n: n == CONFIG_FILE):
        os.replace(tmp / name, out / name)
    for name in clash:  # a stale weights file of the other format must not sit next to the new config
        if name not in produced:
            (out / name).unlink()


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.glob("*.pth.tar")):  # its config.json would make the run look like an export
        raise ExportError(f"output {out} is a training run folder; export into a folder of its own (the default is "
                          "one beside the checkpoint), not --force")
    clash = [n for n in (DENSIFIED_FILE, COMPRESSED_FILE, CONFIG_FILE) if (out / n).exists()]
    if clash and not force:
        raise ExportError(f"{out} already holds {', '.join(clash)}; pass --force (force=True) to replace them, "
                          "or choose another --output")


def _write(build: dict[str, Any], output_dir: str | os.PathLike, fmt: str, force: bool,
           extra: dict | None) -> dict[str, Any]:
    """Write into a temp dir beside ``output_dir``, then move the files in: a failure leaves nothing half-written."""
    from safetensors.torch import save, save_file

    out = Path(output_dir)
    dense_args = (build["dense"], {"format": "pt", _CRC_KEY: _crc32s(build["dense"])})
    comp_args = (build["compressed"], _compressed_metadata(build))
    weights_file, (tensors, metadata), (other, other_meta) = (
        (DENSIFIED_FILE, dense_args, comp_args) if fmt == "densified" else (COMPRESSED_FILE, comp_args, dense_args))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(tmp / weights_file), metadata=metadata)
        written = (tmp / weights_file).stat().st_size
        other_bytes = len(save(other, metadata=other_meta))  # the other format's size, measured in memory
        sizes = {"densified_bytes": written, "compressed_bytes": other_bytes} if fmt == "densified" else \
            {"densified_bytes": other_bytes, "compressed_bytes": written}
        cfg = _config(build["model"], build["arch"], build["create_kwargs"], build["recipe"], fmt, build["report"],
                      build["slices"], {"methods": build["methods"], "skipped": build["skipped"], **sizes,
                                        **(extra or {})})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        for p in tmp.iterdir():  # the mode a plain open() gives (the weights writer makes its files 0600)
            os.chmod(p, 0o666 & ~_umask())
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        _publish(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = sizes["compressed_bytes"] / sizes["densified_bytes"]
    if fmt == "compressed":  # a conforming structured slice its format could not take: say where and why (the
        warned = {r["fqn"] for r in build["report"] if r["conforms"] is False}  # others: _build's warning)
        for key, entry in build["layout"].items():
            for seg in entry["segments"] if key.removesuffix("weight").removesuffix(".") not in warned else ():
                if seg.get("note"):
                    _logger.info("compressed export: %s rows %d:%d stored as %s (%s)", key, seg["start"], seg["stop"],
                                 seg["format"], seg["note"])
    formats = [s["format"] for e in build["layout"].values() for s in e["segments"]]
    return {"format": fmt, "output_dir": str(out), "files": files, **sizes, "ratio": ratio,
            "layers": len(build["layout"]), "nm_segments": formats.count("nm"), "bsr_segments": formats.count("bsr"),
            "bitmap_segments": formats.count("bitmap")}


def export_densified(model: nn.Module, output_dir: str | os.PathLike, *, arch: str | None = None,
                     create_kwargs: dict | None = None, recipe: dict | None = None, force: bool = False,
                     extra: dict | None = None) -> dict[str, Any]:
    """Write ``model.safetensors`` (masks baked in, stock timm keys) and ``config.json`` to ``output_dir``.

    Args:
        model: a (sparsified) timm model; it is copied, never modified.
        output_dir: directory to write into (created); existing export files are replaced only with ``force``.
        arch: timm model name (default: ``model.pretrained_cfg['architecture']``).
        create_kwargs: kwargs for ``timm.create_model`` incl. ``num_classes`` (default: ``num_classes`` only).
        recipe: the ``sparsity:`` block as plain types (default: ``model.sparsity_recipe.to_dict()``).
        extra: more JSON-able keys for the ``sparsity`` block of config.json (e.g. epoch).

    Returns:
        ``format``, ``output_dir``, ``files`` (name -> bytes), ``densified_bytes``, ``compressed_bytes`` (what
        the compressed format would take), ``ratio`` (compressed / densified weights file), layer counts.
    """
    _refuse_existing(Path(output_dir), force)
    return _write(_build(model, arch, create_kwargs, recipe), output_dir, "densified", force, extra)


def export_compressed(model: nn.Module, output_dir: str | os.PathLike, *, arch: str | None = None,
                      create_kwargs: dict | None = None, recipe: dict | None = None, force: bool = False,
                      extra: dict | None = None) -> dict[str, Any]:
    """Write ``model_compressed.safetensors`` (N:M values + uint8 indices, BSR blocks, the rest dense) and
    ``config.json``. Arguments and return value as :func:`export_densified`."""
    _refuse_existing(Path(output_dir), force)
    return _write(_build(model, arch, create_kwargs, recipe), output_dir, "compressed", force, extra)


def default_output_dir(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """``run/model_best.pth.tar`` -> ``run/model_best-densified``."""
    path = Path(checkpoint)
    name = path.name
    for suffix in (".pth.tar", ".pth", ".tar", ".bin", ".pt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.parent / f"{name}-{fmt}"


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output_dir: str | os.PathLike | None = None,
                      use_ema: bool = False, force: bool = False) -> dict[str, Any]:
    """Export a train.py checkpoint (``arch``, ``create_kwargs``, ``recipe``, ``state_dict``[, ``_ema``])."""
    if fmt not in ("densified", "compressed"):
        raise ExportError(f"format must be 'densified' or 'compressed', got {fmt!r}")
    out = Path(output_dir) if output_dir else default_output_dir(checkpoint, fmt)
    _refuse_existing(out, force)  # before the (slow) model build
    model, ckpt = model_from_checkpoint(checkpoint, use_ema=use_ema)  # pretrained_cfg: the run's preprocessing
    extra = {"source_checkpoint": str(checkpoint), "ema": bool(use_ema)}
    for k in ("epoch", "global_step"):
        if k in ckpt:
            extra[k] = ckpt[k]
    fn = export_densified if fmt == "densified" else export_compressed
    return fn(model, out, arch=ckpt["arch"], create_kwargs=checkpoint_create_kwargs(ckpt),
              recipe=ckpt.get("recipe"), force=force, extra=extra)


# ---- loading ----------------------------------------------------------------------------------------------------
def _read_config(path: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        if path.is_file():
            raise ExportError(f"{path} has no {CONFIG_FILE} beside it: a bare state dict; load it with its timm name "
                              "(sparsity.create_model(name, checkpoint=path, num_classes=...))")
        if not path.exists():
            raise ExportError(f"{path} does not exist; check the path")
        if any(path.glob("*.pth.tar")):  # a run directory: name one of its checkpoints
            from .checkpoint import _directory_hint

            raise ExportError(_directory_hint(path))
        raise ExportError(f"{folder} has no {CONFIG_FILE}: not an export directory (see export.py)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{cfg_file} is not readable JSON ({e}); re-export the model") from None
    if "architecture" not in cfg:
        raise ExportError(f"{cfg_file} has no 'architecture'; re-export the model")
    version = (cfg.get("sparsity") or {}).get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{cfg_file} says format_version {version!r}; this version reads up to {FORMAT_VERSION}: "
                          "upgrade sparsity-timm, or re-export the model with this one")
    return folder, cfg


def _create_kwargs(cfg: dict) -> dict:
    sp = cfg.get("sparsity") or {}
    if "create_kwargs" in sp:
        return dict(sp["create_kwargs"])
    return {**(cfg.get("model_args") or {}), "num_classes": cfg.get("num_classes")}


def _meta(kind: str, folder: Path, cfg: dict) -> dict[str, Any]:
    sp = cfg.get("sparsity") or {}
    return {"kind": kind, "path": str(folder), "arch": cfg["architecture"], "create_kwargs": _create_kwargs(cfg),
            "num_classes": cfg.get("num_classes"), "recipe": sp.get("recipe"), "layers": sp.get("layers", []),
            "pretrained_cfg": cfg.get("pretrained_cfg", {}), "config": cfg}


def _meta_only_in_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True if every meta tensor of ``model`` is a state-dict entry (so ``assign=True`` loading fills them all)."""
    for mod in model.modules():
        if any(isinstance(v, torch.Tensor) and v.is_meta for v in vars(mod).values()):  # plain tensor attributes
            return False
    return all(name in state for name, _ in model.named_buffers())


def _stock_model(cfg: dict, state: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """``timm.create_model`` + strict load; built on the meta device (no random init) when that is safe."""
    import timm

    arch, kwargs = cfg["architecture"], _create_kwargs(cfg)
    assign = False
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, **kwargs)
        assign = _meta_only_in_state(model, state)
    except Exception:  # noqa: BLE001 - a model whose __init__ needs real tensors
        pass
    if not assign:
        try:
            model = timm.create_model(arch, **kwargs)
        except (TypeError, ValueError, RuntimeError) as e:  # a config.json edited or from another model
            raise ExportError(f"{where}: config.json asks for {arch} with {kwargs}, which timm cannot build "
                              f"({' '.join(str(e).split())[:200]})") from None
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        raise ExportError(f"{where} does not fit {cfg['architecture']}: {' '.join(str(e).split())[:300]}") from None
    return model


def _load_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not file.is_file():
        raise ExportError(f"{file} is missing; re-export the model")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
        raise ExportError(f"{file} is not a readable safetensors file ({e}); re-export the model") from None
    try:
        crcs = json.loads(meta[_CRC_KEY]) if _CRC_KEY in meta else {}
    except json.JSONDecodeError:
        raise ExportError(f"{file} has unreadable '{_CRC_KEY}' metadata; re-export the model") from None
    for name, t in tensors.items():
        if name in crcs and crcs[name] != _crc32(t):
            raise ExportError(f"{file} is corrupt: tensor {name} does not match its checksum (a damaged copy or "
                              "disk); copy the file again or re-export the model")
    if _LAYOUT_KEY in crcs and crcs[_LAYOUT_KEY] != zlib.crc32(meta.get(_LAYOUT_KEY, "").encode()):
        raise ExportError(f"{file} is corrupt: its '{_LAYOUT_KEY}' metadata does not match its checksum (a damaged "
                          "copy or disk); copy the file again or re-export the model")
    return tensors, meta


def load_densified(path: str | os.PathLike, masked: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A densified export (its directory, or its ``model.safetensors``), strict load into timm.

    Args:
        path: the export directory, or its ``model.safetensors`` with ``config.json`` beside it.
        masked: False (default): the stock timm model. True: the layers that were sparse come back as masked
            layers with their slices and ``weight_mask = weight != 0`` (the pattern as the values show it), so
            reports and conformance checks work; the forward is unchanged.
    """
    folder, cfg = _read_config(path)
    if (cfg.get("sparsity") or {}).get("format") == "compressed":
        raise ExportError(f"{folder} holds a compressed export; load it with sparsity.load_compressed (or "
                          "sparsity.export.load_for_eval, which reads either format)")
    file = Path(path) if Path(path).is_file() else folder / DENSIFIED_FILE
    state, _ = _load_safetensors(file)
    model = _stock_model(cfg, state, file)
    if masked:
        sp = cfg.get("sparsity") or {}
        _rewrap_masked(model, {fqn: model.get_submodule(fqn).weight != 0 for fqn in sp.get("slices", {})}, sp)
    return model.eval(), _meta("densified", folder, cfg)


def load_compressed(path: str | os.PathLike, masked: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a compressed export, bit-exact to the exported ``W * E``.

    Args:
        path: the export directory (or its ``model_compressed.safetensors``).
        masked: True (default): the sparse model back, masked layers with their slices, method name and
            ``weight_mask`` restored, forward ``W * E`` (reports, conformance and :func:`accelerate_` work).
            False: a stock timm model with the masks baked in (what a densified export loads as).

    Returns:
        ``(model, meta)`` with the model in eval mode; ``meta`` holds ``arch``, ``create_kwargs``, ``recipe``,
        ``layers`` (the export-time report) and ``masks`` (fqn -> bool mask).
    """
    folder, cfg = _read_config(path)
    sp = cfg.get("sparsity") or {}
    if sp.get("format") != "compressed":
        raise ExportError(f"{folder} holds a {sp.get('format', 'plain timm')} export, not a compressed one")
    file = Path(path) if Path(path).is_file() else folder / sp.get("weights_file", COMPRESSED_FILE)
    tensors, meta_st = _load_safetensors(file)
    try:
        layout = json.loads(meta_st[_LAYOUT_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ExportError(f"{file} has no readable '{_LAYOUT_KEY}' metadata; re-export the model") from None
    state = {k: v for k, v in tensors.items() if "@" not in k}
    masks = {}
    for key, entry in layout.items():
        try:
            state[key], masks[key.removesuffix("weight").rstrip(".")] = decode_weight(tensors, key, entry)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            raise ExportError(f"{file}: the compressed layout of {key} does not decode ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); the file was edited or written by another tool: "
                              "re-export the model") from None
    model = _stock_model(cfg, state, file)
    if masked:
        _rewrap_masked(model, masks, sp)
    meta = _meta("compressed", folder, cfg)
    meta["masks"] = masks
    return model.eval(), meta


def _rewrap_masked(model: nn.Module, masks: dict[str, torch.Tensor], sp: dict) -> None:
    """Swap the exported layers back to masked ones sharing the (already masked) parameters."""
    methods = sp.get("methods", {})
    for fqn, mask in masks.items():
        mod = model.get_submodule(fqn)
        layer = MaskedLinear.from_dense(mod) if isinstance(mod, nn.Linear) else MaskedConv2d.from_dense(mod)
        layer.weight_mask.copy_(mask)
        layer.slices = tuple(SliceSpec(**s) for s in sp.get("slices", {}).get(fqn, []))
        layer.method = methods.get(fqn, "masked")
        layer.weight_fn = frozen_weight
        set_submodule(model, fqn, layer)
    skipped = sp.get("skipped")
    if skipped is None:  # exports written before "skipped" was stored: read it back from the report's notes
        skipped = {r["fqn"]: r["note"].removeprefix("partly skipped: ") for r in sp.get("layers", [])
                   if r.get("method") == "skipped" or r.get("note")}
    model.sparsity_skipped = dict(skipped)  # type: ignore[attr-defined]
    if sp.get("recipe") is not None:
        from .recipe import RecipeError, recipe_from_dict

        try:
            model.sparsity_recipe = recipe_from_dict(sp["recipe"])  # type: ignore[attr-defined]
        except RecipeError as e:  # e.g. a method this install does not have: the layers still work
            _logger.warning("compressed export: recipe not restored (%s)", e)


def load_for_eval(path: str | os.PathLike, use_ema: bool = False, binary: bool = True) -> tuple[nn.Module, dict]:
    """An eval-ready model from a training checkpoint, a densified export or a compressed export.

    Args:
        path: a train.py checkpoint (``.pth.tar``), an export directory, or the ``.safetensors`` file of one
            (``config.json`` beside it).
        use_ema: training checkpoints only: the EMA weights.
        binary: training checkpoints only: forward ``W * E`` with the stored binary mask (what export ships,
            :func:`use_binary_masks_`). False keeps the method's own forward as rebuilt (the same function for
            the built-in methods; see :func:`use_binary_masks_`).

    Exports come back with masked layers (:func:`load_compressed` / :func:`load_densified` with ``masked=True``)
    so :func:`~sparsity.sparsity_report` can check conformance; their forward is the exported one.

    Returns:
        ``(model, meta)``: the model in eval mode on CPU; ``meta['kind']`` is ``checkpoint``, ``densified`` or
        ``compressed``, plus ``arch``, ``create_kwargs``, ``num_classes``, ``recipe``, ``pretrained_cfg``.
    """
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        folder, cfg = _read_config(p)
        fmt = (cfg.get("sparsity") or {}).get("format", "densified")
        if fmt == "compressed":
            return load_compressed(p, masked=True)
        return load_densified(p, masked=True)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; check the path")
    model, ckpt = model_from_checkpoint(p, use_ema=use_ema)
    if binary:
        use_binary_masks_(model)
    create_kwargs = checkpoint_create_kwargs(ckpt)  # the model was built with these (timm's train.py's args too)
    meta = {"kind": "checkpoint", "path": str(p), "arch": ckpt["arch"], "create_kwargs": create_kwargs,
            "num_classes": create_kwargs.get("num_classes", getattr(model, "num_classes", None)),
            "recipe": ckpt.get("recipe"), "pretrained_cfg": dict(getattr(model, "pretrained_cfg", {}) or {}),
            "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"), "ema": use_ema}
    return model.eval(), meta
