#!/usr/bin/env python3
"""Evaluate a checkpoint (ours, a densified or compressed export, or a stock timm state dict).

    python validate.py --checkpoint output/quickstart/last.pth.tar
    python validate.py --checkpoint export_dir/ --dataset digits --require-conformance

Prints top-1/top-5, loss, overall sparsity and the per-layer conformance summary; ``--results-file`` writes
them as CSV or JSON. Exit code 1 when ``--require-conformance`` and a layer does not match its pattern.
``--accelerate semi_structured|bsr`` evaluates the model as it would be served: ``sparsity.accelerate_`` puts
the eligible layers on the sparse kernels (CUDA, compute capability 8.0+) and the model runs in ``--amp-dtype``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli_common import SWITCH, ParseKwargs, parse_with_config, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="experiment YAML (for --model, data and recipe)")
    p.add_argument("--checkpoint", required=True, help=".pth.tar checkpoint, export dir or model.safetensors")
    p.add_argument("--model", default=None, help="timm model name (only for checkpoints without one)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="timm model kwargs (only for checkpoints without a model name)")
    p.add_argument("--num-classes", type=int, default=None, help="only for checkpoints without a model name")
    p.add_argument("--use-ema", **SWITCH, help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default=None,
                   help="default: the training run's (from the checkpoint), '' (ImageFolder) with --data-dir, else "
                        "digits")
    p.add_argument("--val-split", default=None, help="default: the training run's, else validation")
    p.add_argument("--dataset-download", **SWITCH)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--interpolation", default="", type=str)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--pin-mem", **SWITCH)
    p.add_argument("--amp", **SWITCH)
    p.add_argument("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--channels-last", **SWITCH)
    p.add_argument("--device", default=None)
    p.add_argument("--results-file", default="", help="write results to this .csv or .json")
    p.add_argument("--require-conformance", **SWITCH, help="exit 1 if a layer breaks its pattern")
    p.add_argument("--accelerate", default="", choices=["", "semi_structured", "bsr"],
                   help="evaluate on the sparse kernels (CUDA sm80+; the model in --amp-dtype); on CPU the table "
                        "says why nothing converts and the model is evaluated as it is")
    return p


def _ignored_training_keys():
    """Keys of a training YAML that validate.py accepts and ignores (so one file serves both CLIs)."""
    from train import build_parser as train_parser

    return {a.dest for a in train_parser()._actions}


def _check_same_model(args, path: Path, arch: str, create_kwargs: dict, recipe, held_recipe: dict | None) -> None:
    """--model/--num-classes/--model-kwargs and the config's ``sparsity:`` block build bare state dicts; a file that
    names its model is built as it says (with its own recipe, or dense), so a flag or config asking for something
    else is refused instead of silently ignored (--require-conformance would check the file's pattern, not the
    config's)."""
    from sparsity.errors import UserError
    from sparsity.recipe import recipe_differences

    asked = []
    if args.model and args.model.split(".", 1)[0] != arch.split(".", 1)[0]:
        asked.append(f"--model {args.model} (file: {arch})")
    held = create_kwargs.get("num_classes")
    if args.num_classes is not None and held is not None and args.num_classes != held:
        asked.append(f"--num-classes {args.num_classes} (file: {held})")
    for key, value in (args.model_kwargs or {}).items():
        if key in create_kwargs and create_kwargs[key] != value:
            asked.append(f"--model-kwargs {key}={value} (file: {create_kwargs[key]})")
    if asked:
        raise UserError(f"{path} names its model, which differs from {'; '.join(asked)}; drop those flags (or "
                        "the config's keys) or pass the checkpoint you meant")
    if recipe is None:
        return
    if held_recipe is None and recipe.method != "dense":  # a dense block asks for nothing a file could ignore
        raise UserError(f"{path} holds no sparsity recipe (a dense model), so the sparsity block of {args.config} "
                        "would not be applied; drop it (or pass the sparse checkpoint you meant)")
    if held_recipe is not None and (keys := recipe_differences(held_recipe, recipe.to_dict())):
        raise UserError(f"{path} holds its own sparsity recipe, which differs from the one in {args.config} (in: "
                        f"{', '.join(keys)}); the file's is the one applied and checked: drop --config (or use the "
                        "run's own args.yaml), or pass the checkpoint you meant")


def _accelerate(model, args, device) -> int:
    """``--accelerate``: on CUDA the model goes to ``--amp-dtype`` and :func:`sparsity.accelerate_` converts what it
    can (it logs how many layers run sparse); prints the most common reasons the others do not. Returns the count
    converted."""
    from collections import Counter

    import torch

    import sparsity

    dtype = getattr(torch, args.amp_dtype)
    if device.type == "cuda":
        model.to(dtype)
    table = sparsity.accelerate_(model, backend=args.accelerate, dtype=dtype)
    for reason, n in Counter(r["reason"] for r in table if not r["converted"]).most_common(2):
        print(f"  {n} not converted: {reason}")  # under accelerate_'s own "k of n layers run sparse" line
    return sum(r["converted"] for r in table)


def main(argv: list[str] | None = None) -> int:
    import torch

    import sparsity
    from sparsity.data import (
        DataError,
        build_dataset,
        check_data_dir,
        num_classes_of,
        resolve_data,
        resolve_dataset,
    )
    from sparsity.distributed import init_distributed
    from sparsity.engine import evaluate
    from sparsity.errors import UserError
    from sparsity.factory import check_input_size
    from sparsity.run_files import check_writable
    from sparsity.trainer import build_loaders

    # a training recipe is a valid --config here too: its training-only keys are ignored
    args, blocks = parse_with_config(build_parser(), argv, ignore=_ignored_training_keys())
    setup_logging()
    if args.results_file:  # refused now, not after the whole evaluation has run
        out = Path(args.results_file)
        if out.is_dir():
            raise UserError(f"--results-file {out} is a directory; name a .json or .csv file")
        check_writable(out.parent, "--results-file", f"--results-file {out}: its folder")
    dist = init_distributed(args.device)
    path = Path(args.checkpoint)
    check_data_dir(args.dataset, args.data_dir, args.dataset_download)  # before the model is built
    recipe = sparsity.recipe_from_dict(blocks["sparsity"], source=args.config) if "sparsity" in blocks else None
    meta: dict = {}
    trained_cfg = None  # the data config the model was trained with, where the file says
    trained_args = None  # a train checkpoint's args: which data it read
    if path.is_dir() or (path.suffix == ".safetensors" and (path.parent / "config.json").exists()):
        from sparsity.export import load_for_eval

        if args.use_ema:
            raise UserError(f"--use-ema: {path} is an export, which holds one set of weights; export the EMA "
                            "(export.py --checkpoint RUN.pth.tar --use-ema) and validate that export")
        model, meta = load_for_eval(str(path))
        _check_same_model(args, path, meta["arch"], meta["create_kwargs"], recipe, meta.get("recipe"))
        trained_cfg = meta.get("pretrained_cfg")
    else:  # a train.py checkpoint, or a bare state dict (.pth, .safetensors) with --model
        ckpt = sparsity.checkpoint.load_checkpoint_file(path)
        sparsity.checkpoint.check_fields(path, ckpt)
        if "arch" in ckpt and ckpt.get("create_kwargs") is None and not ckpt.get("args"):
            # a name and weights only (no record of how the model was built): built like a bare state dict, from
            # --model/--num-classes/--model-kwargs, defaulting to the name it holds
            args.model = args.model or ckpt["arch"]
            ckpt = {k: v for k, v in ckpt.items() if k != "arch"}
        if "arch" in ckpt:
            _check_same_model(args, path, ckpt["arch"], sparsity.checkpoint.checkpoint_create_kwargs(ckpt), recipe,
                              ckpt.get("recipe"))
            model, _ = sparsity.model_from_checkpoint(path, use_ema=args.use_ema, ckpt=ckpt)
            trained_args = ckpt.get("args")
            # model_from_checkpoint put the run's data config (from its args) into pretrained_cfg
            trained_cfg = model.pretrained_cfg if trained_args else None
        else:
            if not args.model:
                raise UserError(f"{path} holds no model name; pass --model (and --config for a sparse recipe)")
            kwargs = dict(args.model_kwargs or {})
            if args.num_classes:
                kwargs["num_classes"] = args.num_classes
            model = sparsity.create_model(args.model, recipe=recipe, checkpoint=path, use_ema=args.use_ema, ckpt=ckpt,
                                          **kwargs)
    model.to(dist.device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    resolve_dataset(args, trained_args)
    data_cfg = resolve_data(args, model, trained_cfg)
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or args.model or str(path)
    check_input_size(model, data_cfg["input_size"], name, dist.device, args.channels_last,
                     hint="drop --img-size (a trained model takes the size it was trained at)")
    val_ds = build_dataset(args.dataset, args.data_dir, args.val_split, False, args.dataset_download,
                           data_cfg["input_size"][-1])
    classes, outputs = num_classes_of(val_ds), getattr(model, "num_classes", None)
    if classes and outputs and classes > outputs:
        raise DataError(f"the {args.dataset or args.data_dir} {args.val_split} split has {classes} classes, the model "
                        f"predicts {outputs}: pass the --dataset/--data-dir it was trained on")
    args.validation_batch_size = args.batch_size
    _, loader = build_loaders(args, data_cfg, None, val_ds, dist)
    # the report and sparsity figures of the masked model, before any layer leaves for a sparse kernel
    rows = sparsity.sparsity_report(model)
    selected, overall = sparsity.overall_sparsity(model), sparsity.overall_sparsity(model, selected_only=False)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    accelerated = _accelerate(model, args, dist.device) if args.accelerate else None
    if args.accelerate and dist.device.type == "cuda":  # the model is in --amp-dtype now, converted layers or not
        amp_dtype = getattr(torch, args.amp_dtype)
    metrics = evaluate(model, loader, device=dist.device, amp_dtype=amp_dtype, channels_last=args.channels_last)
    conform = [r["conforms"] for r in rows if r["conforms"] is not None]
    bad = [r["fqn"] for r in rows if r["conforms"] is False]
    result = {
        "checkpoint": str(path), "top1": round(metrics["top1"], 4), "top5": round(metrics["top5"], 4),
        "loss": round(metrics["loss"], 6), "sparsity_selected": round(selected, 6), "sparsity_all": round(overall, 6),
        "layers": len(conform), "layers_conforming": sum(bool(c) for c in conform), "nonconforming": bad,
    }
    if accelerated is not None:
        result.update(accelerate=args.accelerate, accelerated_layers=accelerated,
                      dtype=args.amp_dtype if amp_dtype is not None else "float32")
    result.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str))})
    print(sparsity.format_report(rows, max_rows=20))
    print(f"\ntop-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}")
    print(f"sparsity {result['sparsity_selected']:.1%} of selected layers, {result['sparsity_all']:.1%} of all "
          f"Linear/Conv weights; {result['layers_conforming']}/{result['layers']} layers conform")
    if args.results_file:
        from sparsity.checkpoint import write_atomic, write_csv_atomic

        out = Path(args.results_file)
        try:
            if out.suffix == ".json":
                write_atomic(out, lambda f: f.write(json.dumps(result, indent=2)), mode="w")
            else:
                write_csv_atomic(out, list(result), [{**result, "nonconforming": " ".join(bad)}])
        except OSError as e:
            raise UserError(f"could not write --results-file {out} ({e.strerror or e}); the results are printed "
                            "above; free space or choose another path") from None
    if args.require_conformance and bad:
        print(f"error: {len(bad)} layers do not conform to their pattern: {', '.join(bad[:5])}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
