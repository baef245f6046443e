#!/usr/bin/env python3
"""Measure what sparsity costs in training and gains in inference: dense vs sparse, on this machine.

    python benchmark.py --bench train --model resnet18 --img-size 32 --methods ste srste mdgf supermask gumbel
    python benchmark.py --bench train --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 \\
        depth=4 --img-size 32 --recipes configs/quickstart/srste_digits_2of4.yaml
    python benchmark.py --bench infer --model output/run/export --backend semi_structured
    python benchmark.py --bench infer --model vit_base_patch16_224 --targets ff qkv proj --nm 2:4 -b 64 256 \\
        --dtype bfloat16 --torchcompile
    python benchmark.py --bench infer --model vit_base_patch16_224 --targets ff qkv proj --sparsity 0.9 --tile 64
    python benchmark.py --bench infer --model vit_base_patch16_224 --targets ff --layers -b 256
    python benchmark.py --bench masks --model resnet18

``--bench train`` times full training steps (controller step, forward, backward, optimizer step) of the dense
model and of each recipe, A/B interleaved in one process, and reports medians, the sparse/dense ratio, the
step-time breakdown and memory. ``--bench infer`` times inference of the densified model against the
accelerated one (sparse kernels) for every dtype x batch size, eagerly and compiled, with throughput, peak memory
and the largest logit difference; ``--layers`` times the MLP linears alone. Results go to ``--output`` as JSON
and CSV; a table is printed.
See docs/performance.md for measured figures and the exact commands behind them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

from cli_common import ConfigError, ParseKwargs, parse_flags, run_cli, setup_logging
from sparsity.accelerate import BACKENDS, SEMI_KERNELS
from sparsity.optim import OPT_IMPLS

BUILTIN = ("dense", "ste", "srste", "mdgf", "supermask", "gumbel")  # sparsity.bench_train.BUILTIN_METHODS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=["train", "infer", "masks"], default="train",
                   help="masks: time the N:M mask kernel alone against topk + scatter")
    p.add_argument("--model", default="resnet18",
                   help="timm model name (infer also takes a checkpoint or an export directory)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="timm.create_model kwargs")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, nargs="+", default=[64],
                   help="images per step (train: one value; infer: one or more)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own, e.g. 32 for "
                                                                "a ViT built with img_size=32; 224 for CNNs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU; default, or 0: torch's own count)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (train) or forwards (infer) per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps/forwards per variant first")
    p.add_argument("--output", default="", help="folder for bench_<kind>.json and .csv")
    g = p.add_argument_group("train")
    g.add_argument("--recipes", nargs="+", default=[], help="experiment YAMLs (their sparsity: block is used)")
    g.add_argument("--methods", nargs="+", default=[],
                   help=f"built-in recipes: {', '.join(BUILTIN)} (N:M on ff + q/k/v of a transformer, on every "
                        "conv of a CNN; supermask: the same density in 8x8 tiles)")
    g.add_argument("--nm", default=None,
                   help="N:M of the built-in recipes (infer: of --targets; default 2:4); masks: time this pattern "
                        "only (default: 2:4 1:4 1:8 2:8 4:8 1:16 2:16)")
    g.add_argument("--block", type=int, default=1, help="consecutive steps of one variant before switching")
    g.add_argument("--at", type=float, default=0.5, metavar="FRACTION",
                   help="where in a 100-epoch run the timed steps sit (default mid-run): recipes with a dense "
                        "warm-up, an SDGF ladder, a GMP ramp or a fine-tune phase are timed in the state they have "
                        "there; the table's phase/pattern columns say which")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None,
                   help="torch.compile backend (infer: adds compiled rows to the eager ones)")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-impl", default="auto", choices=OPT_IMPLS,
                   help="as train.py: auto = torch's fused kernel where it has one, else timm's default")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also write a torch.profiler table of STEPS steps per variant (profile_<variant>.txt)")
    g = p.add_argument_group("infer", "a timm --model name gets magnitude masks on --targets: N:M (--nm) or, with "
                                      "--tile, --sparsity in tile x tile blocks; a checkpoint or export keeps its own")
    g.add_argument("--backend", default=None, choices=BACKENDS,
                   help="default: bsr with --tile, else semi_structured (2:4)")
    g.add_argument("--semi-kernel", default="auto", choices=SEMI_KERNELS,
                   help="2:4 kernel: torch's choice (auto) or one forced")
    g.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    g.add_argument("--targets", nargs="+", default=None,
                   help="layers a timm name gets masks on (default: ff); e.g. ff qkv proj")
    g.add_argument("--sparsity", type=float, default=None, help="block sparsity with --tile (default 0.9)")
    g.add_argument("--tile", type=int, default=None, help="block tile side: block masks instead of N:M")
    g.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune, max-autotune-no-cudagraphs")
    g.add_argument("--layers", action="store_true",
                   help="time the MLP linears alone (dense F.linear vs the sparse kernel) instead of whole forwards")
    return p


def _recipes(args, model_for_rules) -> dict:
    from sparsity.bench_train import builtin_recipe
    from sparsity.recipe import closest, load_recipe

    n, m = _parse_nm(args.nm or "2:4")
    out: dict = {}
    for name in args.methods:
        if name not in BUILTIN:
            raise ConfigError(f"--methods: unknown method {name!r} (valid: {', '.join(BUILTIN)})"
                              f"{closest(name, BUILTIN)}")
        out[name] = builtin_recipe(name, model_for_rules, n, m)
    for path in args.recipes:
        stem = Path(path).stem
        out[stem if stem not in out else path] = load_recipe(path)
    if not out:
        raise ConfigError("--bench train needs --methods and/or --recipes (e.g. --methods ste srste)")
    return out


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(cols, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _write(out_dir: str, kind: str, result: dict, rows: list[dict]) -> None:
    if not out_dir:
        return
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"bench_{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    with open(path / f"bench_{kind}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _bench_train(args) -> int:
    import timm

    from sparsity.bench_infer import default_img_size
    from sparsity.bench_train import TrainBenchSettings, bench_train, profile_train_step
    from sparsity.factory import check_input_size, create_model

    device = _device(args)
    if not timm.is_model(args.model):
        raise ConfigError(f"--model {args.model!r} is not a timm model name")
    probe = create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)  # bad kwargs: one line
    side = args.img_size or default_img_size(probe)
    check_input_size(probe, (3, side, side), args.model, hint="pass the --img-size it was built for, or build it "
                     f"for this one (--model-kwargs img_size={side})")
    recipes = _recipes(args, probe)
    if len(args.batch_size) != 1:
        raise ConfigError(f"--bench {args.bench} takes one --batch-size, got {args.batch_size}")
    if not 0.0 <= args.at < 1.0:
        raise ConfigError(f"--at must be in [0, 1) (a fraction of the run), got {args.at}")
    settings = TrainBenchSettings(
        batch_size=args.batch_size[0], img_size=args.img_size, num_classes=args.num_classes,
        steps=args.steps, at=args.at, warmup=args.warmup, block=args.block, device=device, amp=args.amp,
        channels_last=args.channels_last, torchcompile=args.torchcompile, opt=args.opt, opt_impl=args.opt_impl,
        lr=args.lr, model_kwargs=dict(args.model_kwargs),
    )
    load_before = _load()

    def progress(r: int, rounds: int) -> None:
        if sys.stderr.isatty():
            print(f"\rround {r}/{rounds}", end="" if r < rounds else "\n", file=sys.stderr, flush=True)

    del probe
    result = bench_train(args.model, recipes, settings, on_progress=progress)
    result["settings"]["loadavg_before"], result["settings"]["loadavg_after"] = load_before, _load()
    rows = result["rows"]
    s = result["settings"]
    print(f"{args.model} {s['model_kwargs'] or ''} batch {s['batch_size']} img {s['img_size']} on {s['device_name']} "
          f"({s['threads']} threads, {s['optimizer']}, amp={s['amp']}, channels_last={s['channels_last']}, "
          f"compile={s['torchcompile']}), {rows[0]['steps']} steps per variant, load {load_before}, "
          f"process max RSS {s['process_max_rss_mb']} MB")
    peak = "peak step MB" if device.startswith("cuda") else "peak step MB (CUDA only)"
    cols = [("variant", "variant"), ("step_ms", "step ms"), ("ratio", "ratio"), ("ratio_paired", "paired ratio"),
            ("ratio_mean", "mean ratio"), ("mask_ms", "mask ms"), ("forward_ms", "fwd ms"), ("backward_ms", "bwd ms"),
            ("optimizer_ms", "opt ms"), ("peak_step_mb", peak), ("state_mb", "state MB"), ("phase", "phase"),
            ("pattern", "timed pattern"), ("forward_sparsity", "fwd sparsity")]
    print(_table(rows, cols))
    _write(args.output, "train", result, rows)
    if args.profile and args.output:
        from sparsity.bench_train import builtin_recipe

        for name, recipe in {"dense": builtin_recipe("dense", None), **recipes}.items():
            table = profile_train_step(args.model, recipe, settings, steps=args.profile)
            (Path(args.output) / f"profile_{name}.txt").write_text(table + "\n")
    return 0


def _device(args) -> str:
    from sparsity.distributed import pick_device

    return pick_device(args.device)


def _bench_masks(args) -> int:
    import timm

    from sparsity.bench_train import bench_masks

    device = _device(args)
    if not timm.is_model(args.model):
        raise ConfigError(f"--bench masks takes a timm model name, got --model {args.model!r}")
    patterns = {"patterns": [_parse_nm(args.nm)]} if args.nm else {}
    result = bench_masks(args.model, {"num_classes": args.num_classes, **args.model_kwargs}, iters=args.steps,
                         device=device, channels_last=args.channels_last, **patterns)
    result["settings"]["loadavg"] = _load()
    print(f"{args.model}: N:M masks of every divisible Linear/Conv2d weight, {result['settings']['threads']} threads, "
          f"load {result['settings']['loadavg']}, native kernel: {result['settings']['native_kernel']}, other tensors: "
          f"{result['settings']['rank_kernel']} rank")
    print(_table(result["rows"], [(k, k) for k in result["rows"][0]]))
    _write(args.output, "masks", result, result["rows"])
    return 0


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--nm must look like 2:4 (keep N of every M), got {text!r}") from None
    if not 0 < n <= m:
        raise ConfigError(f"--nm {text}: N must be between 1 and M")
    return n, m


def _infer_model(args):
    """The model --bench infer times: a timm name gets magnitude masks; a checkpoint or export comes as saved."""
    import timm

    from sparsity.bench_infer import sparse_model

    kwargs = {"num_classes": args.num_classes, **args.model_kwargs}
    if not timm.is_model(args.model):
        if args.targets or args.tile or args.sparsity is not None:
            raise ConfigError(f"--targets/--tile/--sparsity build masks for a timm model name; {args.model!r} is a "
                              "checkpoint or export and keeps the masks it was trained with (drop those flags)")
        if not Path(args.model).exists():
            raise ConfigError(f"--model {args.model!r} is neither a timm model name nor an existing checkpoint or "
                              "export directory")
        return args.model
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity is the fraction of zeros, in [0, 1); got {args.sparsity}")
    if args.tile is not None and args.tile < 1:
        raise ConfigError(f"--tile must be >= 1, got {args.tile}")
    return sparse_model(args.model, targets=args.targets or ["ff"], nm=_parse_nm(args.nm or "2:4"),
                        sparsity=args.sparsity, tile=args.tile, **kwargs)


def _bench_infer(args) -> int:
    import torch

    from sparsity.bench_infer import bench_infer, bench_layers, default_backend, resolve_model

    device = _device(args)
    source = _infer_model(args)
    model, _ = resolve_model(source)  # a checkpoint or export is loaded once, for every run below
    # a checkpoint or export with block-sparse layers (supermask, block gmp) runs BSR unless told otherwise
    backend = args.backend or default_backend(model)
    dtypes = [getattr(torch, d) for d in dict.fromkeys(args.dtype)]
    common = dict(backend=backend, img_size=args.img_size, device=device, warmup=args.warmup, iters=args.steps,
                  semi_kernel=args.semi_kernel)
    what = f"{args.model} on {device}, {backend}, {args.steps} timed forwards after {args.warmup}"
    if args.layers:
        rows, totals = [], []
        for dtype in dtypes:
            for bs in args.batch_size:
                res = bench_layers(model, batch_size=bs, dtype=dtype, **common)
                tag = {"dtype": res["settings"]["dtype"], "batch_size": bs}
                rows += [{**tag, **r} for r in res["rows"]]
                totals.append({**tag, **res["total"]})
        print(f"MLP linears alone: {what}")
        cols = [("dtype", "dtype"), ("batch_size", "batch"), ("layer", "layer"), ("count", "count"),
                ("weight", "weight"), ("rows", "input rows"), ("converted", "sparse"), ("dense_ms", "dense ms"),
                ("sparse_ms", "sparse ms"), ("speedup", "speedup"), ("max_abs_diff", "max |diff|")]
        print(_table(rows + totals, cols))
        settings = {k: v for k, v in res["settings"].items() if k not in ("dtype", "batch_size")}  # per row
        result = {"settings": settings, "rows": rows, "totals": totals}
        _write(args.output, "infer_layers", result, rows + totals)
        return 0

    def progress(row: dict) -> None:
        print(f"  {row['dtype']} batch {row['batch_size']} {row['mode']}: dense {row['dense_ms']:.3f} ms, "
              f"sparse {row['sparse_ms']:.3f} ms", file=sys.stderr, flush=True)

    modes = ["eager", "compiled"] if args.torchcompile else ["eager"]
    print(f"timing {what}: {len(dtypes) * len(args.batch_size) * len(modes)} settings, each line below when done"
          + ("; on CPU no sparse kernel runs (they need a CUDA GPU of compute capability 8.0+), so both columns "
             "time the dense model" if torch.device(device).type == "cpu" else ""), flush=True)
    result = bench_infer(model, batch_sizes=args.batch_size, dtypes=dtypes, modes=modes,
                         compile_backend=args.torchcompile or "inductor", compile_mode=args.compile_mode,
                         progress=progress, channels_last=args.channels_last, **common)
    print(what)
    for dtype in dict.fromkeys(r["dtype"] for r in result["layers"]):
        plan = [r for r in result["layers"] if r["dtype"] == dtype]
        converted = sum(r["converted"] for r in plan)
        print(f"  {dtype}: {converted} of {len(plan)} Linear/Conv2d layers run sparse")
        if not converted:
            reasons = Counter(r["reason"].split(";")[0] for r in plan)
            where = Path(args.output) / "infer_layers_plan.csv" if args.output else "pass --output DIR for them"
            print(f"    nothing runs sparse: {reasons.most_common(1)[0][0]} (every layer's reason: {where}); its "
                  "speedup column compares two timings of the same dense model")
    cols = [("dtype", "dtype"), ("batch_size", "batch"), ("mode", "mode"), ("dense_ms", "dense ms"),
            ("sparse_ms", "sparse ms"), ("speedup", "speedup"), ("dense_img_s", "dense img/s"),
            ("sparse_img_s", "sparse img/s"), ("dense_peak_mib", "dense peak MiB"),
            ("sparse_peak_mib", "sparse peak MiB"), ("sparse_weights_mib", "sparse weights MiB"),
            ("max_abs_diff", "max |diff|")]
    print(_table(result["rows"], cols))
    _write(args.output, "infer", result, result["rows"])
    if args.output:
        _write_layer_table(Path(args.output) / "infer_layers_plan.csv", result["layers"])
    return 0


def _write_layer_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dtype", "fqn", "shape", "pattern", "eligible", "converted", "reason"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _check_counts(args) -> None:
    """Counts and sizes that would time nothing or divide by zero: one line naming the flag."""
    checks = (("--steps", [args.steps], 1), ("--warmup", [args.warmup], 0), ("--block", [args.block], 1),
              ("--batch-size", args.batch_size, 1), ("--img-size", [args.img_size or 1], 1),
              ("--threads", [args.threads or 1], 1))
    for flag, values, low in checks:
        bad = [v for v in values if v < low]
        if bad:
            raise ConfigError(f"{flag} must be at least {low}, got {bad[0]}")
    if args.device and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"--device {args.device}: benchmark.py runs on cpu or cuda")
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.lr < 0:
        raise ConfigError(f"--lr must be 0 or more, got {args.lr}")
    from sparsity.run_args import check_compile_backend

    check_compile_backend(args.torchcompile)


def _main(argv: list[str] | None = None) -> int:
    args = parse_flags(build_parser(), argv)
    setup_logging()
    import logging

    logging.getLogger("sparsity").setLevel(logging.WARNING)  # sparsify_ tables would drown the results
    _check_counts(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.bench == "masks":
        return _bench_masks(args)
    return _bench_train(args) if args.bench == "train" else _bench_infer(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
