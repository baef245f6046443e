#!/usr/bin/env python3
"""Compare recipes over seeds on one data set: ``python compare.py 'configs/quickstart/*_2of4.yaml' --seeds 0 1 2``.

Each (recipe, seed) runs ``python train.py --config R --seed S --output OUT/runs --experiment <recipe>-s<seed>``;
flags after ``--`` go to every train.py run unchanged. Writes OUT/comparison.csv (one row per run),
OUT/comparison.md (mean ± std per recipe) and OUT/comparison.png (top-1 against sparsity, one line per method).
Run it again to resume: finished runs (results.json present) are skipped. The tables also keep the finished runs of
earlier comparisons into the same --output that this invocation does not name (add a recipe, or rerun a subset,
without losing the others).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli_common import ConfigError, parse_flags, parse_with_config, run_cli

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s RECIPE [RECIPE ...] [options] [-- TRAIN.PY FLAGS]")
    p.add_argument("recipes", nargs="+", help="recipe files or quoted globs ('configs/**/srste_*.yaml')")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run every recipe with")
    p.add_argument("--output", default="output/compare", help="comparison folder (runs go to OUTPUT/runs)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    p.add_argument("--model-kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="set keys of every recipe's model_kwargs (merged into its mapping, key by key)")
    p.add_argument("--dataset", default=None, help="override every recipe's data set (e.g. digits, torch/cifar100)")
    p.add_argument("--data-dir", default=None, help="override every recipe's data dir")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    return p


def _train_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    out = []
    if args.epochs is not None:
        out += ["--epochs", str(args.epochs)]
    if args.model_kwargs is not None:
        out += ["--model-kwargs", *args.model_kwargs]
    if args.dataset is not None:
        out += ["--dataset", args.dataset]
    if args.data_dir is not None:
        out += ["--data-dir", args.data_dir]
    return out + extra


def _check_recipe(path: Path, train_args: list[str]):
    """Validate a recipe the way train.py will read it (training keys, flags, sparsity block)."""
    import train

    parser = train.build_parser()

    def fail(message: str):
        raise ConfigError(f"{path} with flags {' '.join(train_args) or '(none)'}: {message}")

    parser.error = fail  # type: ignore[method-assign]  # bad pass-through flags: our message, exit code 2
    targs, blocks = parse_with_config(parser, ["--config", str(path), *train_args])
    from sparsity.data import resolve_dataset

    resolve_dataset(targs)  # train.py's defaults: digits, or an ImageFolder with only --data-dir
    from sparsity.errors import UserError
    from sparsity.recipe import recipe_from_dict
    from sparsity.run_args import check_args
    from sparsity.run_files import run_epochs

    try:
        check_args(targs)  # the values train.py refuses before it builds anything (-b 0, --lr -1, --epochs 0)
    except UserError as e:
        fail(str(e))
    run_epochs(targs, recipe_from_dict(blocks.get("sparsity") or {}, source=str(path)))  # as train.py refuses it
    return targs, blocks.get("sparsity")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parse_flags(parser, argv)
    from sparsity import compare as cmp

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds has duplicates: {args.seeds}")
    for flag in ("--seed", "--output", "--experiment", "--config"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ConfigError(f"{flag} after '--' is set by compare.py for every run; remove it")
    paths = cmp.expand_recipes(args.recipes)
    labels = cmp.recipe_labels(paths)
    train_args = _train_args(args, extra)
    infos, datasets = [], set()
    for path in paths:
        targs, block = _check_recipe(path, train_args)
        dataset = targs.dataset or "ImageFolder"
        datasets.add(dataset)
        infos.append(cmp.recipe_info(path, labels[path], block, dataset, targs))
    if len(datasets) > 1:
        raise ConfigError(f"the recipes use different data sets ({', '.join(sorted(datasets))}); a comparison runs "
                          "on one: pass --dataset (and --data-dir)")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; name a folder for the comparison")
    runs = cmp.plan_runs(infos, args.seeds, out / "runs")
    dataset = datasets.pop()
    print(f"compare: {len(paths)} recipes x {len(args.seeds)} seeds = {len(runs)} runs on {dataset}; output {out}")
    if args.dry_run:
        for i, run in enumerate(runs, 1):
            cmd = cmp.train_command(run, ROOT / "train.py", train_args)
            if run.finished():  # reused only as the real invocation would: refused here too if it would be
                cmp.check_reuse(run, cmd)
            print(f"[{i}/{len(runs)}] {run.experiment} ({'finished' if run.finished() else 'to run'}): "
                  f"{' '.join(cmd)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    title = f"Comparison on {dataset}"
    notes = [f"Seeds: {' '.join(map(str, args.seeds))}.",
             f"train.py flags for every run: `{' '.join(train_args)}`." if train_args else "No flag overrides."]

    earlier, left = cmp.earlier_rows(out / "comparison.csv", runs, dataset)
    if earlier:
        names = ", ".join(Path(r["run_dir"]).name for r in earlier)
        print(f"compare: the tables keep {len(earlier)} finished runs of earlier comparisons in {out} not named this "
              f"time: {names}")
        notes.append(f"Also listed: {len(earlier)} runs of earlier comparisons into this folder ({names}); each run's "
                     "train.py flags are in runs/<run>.flags.json.")
    if left:
        print(f"compare: left out of the tables (another data set, failed or unfinished, not named this time; their "
              f"folders stay in {out / 'runs'}): {', '.join(left)}")

    def tables(rows):
        rows = earlier + rows
        cmp.write_csv(rows, out / "comparison.csv")
        cmp.write_markdown(cmp.summarize(rows), out / "comparison.md", title, notes)

    rows = earlier + cmp.run_all(runs, lambda run: cmp.train_command(run, ROOT / "train.py", train_args),
                                 progress=_progress, on_row=tables)
    summary = cmp.summarize(rows)
    plotted = cmp.write_plot(summary, out / "comparison.png", title)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"wrote {out / 'comparison.csv'}, {out / 'comparison.md'}"
          + (f", {out / 'comparison.png'}" if plotted else " (no plot: matplotlib missing)"))
    print((out / "comparison.md").read_text())
    if failed:
        print(f"{failed} of {len(rows)} runs failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _progress(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
