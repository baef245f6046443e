"""Compare recipes over seeds: one ``train.py`` subprocess per (recipe, seed), then tables and a plot.

The CLI is ``compare.py`` at the repository root; this module never sees argparse and never prints (progress goes
to a callback). A run is finished when its ``results.json`` exists, so an interrupted comparison resumes: finished
runs are read back, a run cut short resumes from its newest checkpoint (``--resume auto``).

Outputs in the comparison folder: ``comparison.csv`` (one row per run), ``comparison.md`` (one row per recipe:
mean ± std over seeds) and ``comparison.png`` (top-1 against sparsity, one line per method). The tables keep the
finished runs of earlier invocations into the same folder that this one does not name (:func:`earlier_rows`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import write_csv_atomic
from .errors import UserError
from .recipe import Recipe, recipe_from_dict
from .run_files import resolved_config

__all__ = [
    "CompareError", "RecipeInfo", "Run", "expand_recipes", "recipe_labels", "recipe_info", "method_label",
    "describe_pattern", "published_top1", "plan_runs", "train_command", "run_all", "earlier_rows", "summarize",
    "write_csv",
    "write_markdown", "write_plot", "CSV_COLUMNS",
]

CSV_COLUMNS = [
    "recipe", "seed", "status", "method", "pattern", "model", "dataset", "top1", "top5", "sparsity_selected",
    "sparsity_all", "wall_time_s", "published_top1", "run_dir", "recipe_path",
]
RESULT_KEYS = ("top1", "top5", "sparsity_selected", "sparsity_all", "wall_time_s")


class CompareError(UserError):
    """Bad input to a comparison (no recipe matches, a run fails on bad input); the message says what to change."""


@dataclass(frozen=True)
class RecipeInfo:
    """What the tables say about a recipe: its label, method and pattern text, and the published figure."""

    path: Path
    label: str
    method: str
    pattern: str
    published: float | None
    dataset: str
    config: dict | None = None  # what train.py will run (run_files.resolved_config: flags, ``base:`` merged)


@dataclass(frozen=True)
class Run:
    """One (recipe, seed) pair and where it writes."""

    info: RecipeInfo
    seed: int
    run_dir: Path

    @property
    def experiment(self) -> str:
        return self.run_dir.name

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / f"{self.experiment}.log"

    @property
    def flags_path(self) -> Path:
        """The train.py flags the run was started with (a finished run is reused only for the same flags)."""
        return self.run_dir.parent / f"{self.experiment}.flags.json"

    def finished(self) -> bool:
        return _read_results(self.results_path) is not None


# ---------------------------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------------------------
def expand_recipes(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs (``**`` allowed) -> recipe files, in the order given, duplicates and ``_*`` bases dropped."""
    if not patterns:
        raise CompareError("no recipes given; name YAML files or a glob such as 'configs/quickstart/*.yaml'")
    out: list[Path] = []
    seen: set[Path] = set()
    for pat in patterns:
        if glob.has_magic(pat):
            found = [Path(p) for p in sorted(glob.glob(pat, recursive=True))]
            found = [p for p in found if p.is_file() and p.suffix in (".yaml", ".yml") and not p.name.startswith("_")]
            if not found:
                raise CompareError(f"no recipe matches {pat!r} (quote the glob so the shell does not expand it; "
                                   "files starting with '_' are bases, not experiments)")
        else:
            p = Path(pat)
            if not p.is_file():
                raise CompareError(f"recipe {pat} does not exist")
            found = [p]
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def recipe_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Short unique names: the file stem, prefixed by as many parent folders as it takes to be unique."""
    parts = {p: p.resolve().with_suffix("").parts for p in paths}
    depth = {p: 1 for p in paths}
    while True:
        labels = {p: "-".join(parts[p][-depth[p]:]) for p in paths}
        clashes = [p for p in paths if list(labels.values()).count(labels[p]) > 1 and depth[p] < len(parts[p])]
        if not clashes:
            return {p: re.sub(r"[^0-9A-Za-z_.-]", "_", lab) for p, lab in labels.items()}
        for p in clashes:
            depth[p] += 1


def published_top1(path: Path) -> float | None:
    """The number on the recipe's ``# Published top-1: X`` header line, or None."""
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*Published top-1:\s*([0-9]+(?:\.[0-9]+)?)", line)
        if m:
            return float(m.group(1))
    return None


def method_label(recipe: Recipe) -> str:
    """The method as a comparison line name: ``mdgf (exp)``, ``sdgf-fine (srste)``, ``oneshot+permute``, ..."""
    opts = recipe.options
    name = recipe.method
    sd = getattr(opts, "structure_decay", "none")
    if sd != "none":
        return f"sdgf-{sd if isinstance(sd, str) else 'custom'} ({name})"
    if name == "mdgf":
        return f"mdgf ({opts.decay.type})"
    if name == "oneshot" and opts.permute:
        return "oneshot+permute"
    return name


def describe_pattern(recipe: Recipe) -> str:
    """The rules as text: ``ff=2:4 q,k,v=2:4``, ``conv=2:4``, ``ff,qkv,proj=75%``, or ``dense``."""
    opts = recipe.options
    parts = []
    for rule in recipe.rules:
        if rule.skip:
            continue
        if rule.n is not None:
            what = f"{rule.n}:{rule.m}"
        elif recipe.method == "usd":
            what = f"{opts.target_sparsity:.0%} (N:{opts.m})"
        elif rule.sparsity is not None or getattr(opts, "final_sparsity", None) is not None:
            what = f"{rule.sparsity if rule.sparsity is not None else opts.final_sparsity:.0%}"
        elif recipe.method == "supermask":
            sp = opts.sparsity_linear if opts.sparsity_linear is not None else opts.sparsity_conv
            what = f"{sp:.0%}" + (f" tile {opts.tile_linear}" if opts.tile_linear > 1 else "")
        else:
            what = "selected"
        parts.append(f"{rule.describe()}={what}")
    return " ".join(parts) if parts else "dense"


def recipe_info(path: Path, label: str, sparsity_block: dict | None, dataset: str, train_args=None) -> RecipeInfo:
    """Validate the ``sparsity:`` block and describe the recipe for the tables. ``train_args`` (train.py's parsed
    flags for it) give the config train.py will run, as its ``args.yaml`` records it: a finished run is reused
    only if it ran the same."""
    recipe = recipe_from_dict(sparsity_block or {}, source=str(path))
    return RecipeInfo(path=path, label=label, method=method_label(recipe), pattern=describe_pattern(recipe),
                      published=published_top1(path), dataset=dataset,
                      config=None if train_args is None else resolved_config(train_args, recipe))


# ---------------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------------
def plan_runs(infos: Sequence[RecipeInfo], seeds: Sequence[int], runs_dir: Path) -> list[Run]:
    """Every (recipe, seed), recipe-major; run folders are ``runs_dir/<label>-s<seed>``."""
    return [Run(info, seed, Path(runs_dir) / f"{info.label}-s{seed}") for info in infos for seed in seeds]


def train_command(run: Run, train_script: Path, train_args: Sequence[str] = (), python: str = sys.executable
                  ) -> list[str]:
    """``python train.py --config R --seed S --output OUT/runs --experiment <label>-s<seed> --resume auto ...``."""
    cmd = [python, str(train_script), "--config", str(Path(run.info.path).resolve()), "--seed", str(run.seed),
           "--output", str(run.run_dir.parent.resolve()), "--experiment", run.experiment]
    if not any(a == "--resume" or a.startswith("--resume=") for a in train_args):
        cmd += ["--resume", "auto"]  # a run cut short continues in its own folder, not in a new '-1' one
    return cmd + list(train_args)


def _read_results(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "top1" in data else None


def _flag_items(args: list[str]) -> list[str]:
    """``["--epochs", "2", "-b", "32"]`` -> ``["--epochs 2", "-b 32"]``: each flag with its values (a difference
    then names the flag, not just the value)."""
    items: list[list[str]] = []
    for a in args:
        if (a.startswith("-") and not _is_number(a)) or not items:  # -1 and -1e-5 are values
            items.append([a])
        else:
            items[-1].append(a)
    return [" ".join(i) for i in items]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_reuse(run: Run, cmd: list[str]) -> None:
    """Refuse to report the finished ``run`` as the one ``cmd`` (its train.py command) would train."""
    _check_same_run(run, cmd[2:])  # after the interpreter and the script


_PATH_FLAGS = ("--output", "--config")  # where the run lives and the recipe file's path: not what it trained


def _comparable(flags: list[str]) -> list[str]:
    """The flags with the values of the path flags left out: a comparison folder moved elsewhere, or the same
    recipes in another checkout, is the same run (the recipe's content is compared on its own)."""
    return [("<path>" if i and flags[i - 1] in _PATH_FLAGS else a) for i, a in enumerate(flags)]


def _check_same_run(run: Run, flags: list[str]) -> None:
    """A finished run is reused only if it was started with the same train.py flags and the same resolved recipe
    (an edited recipe file, or one of its ``base:`` files, would otherwise report the old run under the new
    recipe's name)."""
    try:
        saved = json.loads(run.flags_path.read_text())
    except (OSError, ValueError):
        return  # finished before flags were recorded
    saved_flags, saved_config = (saved, None) if isinstance(saved, list) else (saved.get("flags"), saved.get("config"))
    if saved_config and run.info.config:  # the recipes' contents are compared below: their paths need not be
        saved_flags, flags = _comparable(saved_flags or []), _comparable(flags)
    if saved_flags != flags:
        before, after = _flag_items(saved_flags or []), _flag_items(flags)
        gone = [a for a in before if a not in after]
        new = [a for a in after if a not in before]
        what = "; ".join(([f"then {', '.join(gone)}"] if gone else []) + ([f"now {', '.join(new)}"] if new else [])) \
            or "the same flags in another order"
        _refuse_reuse(run, f"other train.py flags ({what})")
    diffs = _config_diff(saved_config, run.info.config) if saved_config and run.info.config else []
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        _refuse_reuse(run, f"another recipe ({shown})")


def _refuse_reuse(run: Run, why: str) -> None:
    raise CompareError(f"run {run.experiment} finished earlier with {why}: its result would be reported as this "
                       f"one's; use another --output, or delete {run.run_dir} to run it again")


def _config_diff(then: dict, now: dict, prefix: str = "") -> list[str]:
    """``["sparsity.rules: [...] -> [...]", "lr: 0.001 -> 0.002"]`` for the keys whose values differ. At the top
    level only the settings both know are compared: a train.py flag added or removed by an upgrade is not a change
    of the recipe."""
    out = []
    keys = [k for k in then if k in now] if not prefix else list(then) + [k for k in now if k not in then]
    for key in keys:
        a, b = then.get(key, "(unset)"), now.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _row(run: Run, status: str, result: dict | None) -> dict:
    result = result or {}
    row = {
        "recipe": run.info.label, "seed": run.seed, "status": status, "method": run.info.method,
        "pattern": run.info.pattern, "model": result.get("model", ""), "dataset": run.info.dataset,
        "published_top1": "" if run.info.published is None else run.info.published,
        "run_dir": str(run.run_dir), "recipe_path": str(run.info.path),
    }
    for key in RESULT_KEYS:
        row[key] = result.get(key, "")
    return row


def run_all(runs: Sequence[Run], command: Callable[[Run], list[str]], progress: Callable[[str], None] = lambda s: None,
            on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every unfinished run (finished ones are read back) and return one row per run.

    ``progress`` gets one line per event; ``on_row`` gets all rows so far after each run (to rewrite the tables).
    A run that exits with code 2 (bad input) stops the comparison with its error line; other failures are recorded
    as ``failed`` rows and the comparison goes on.
    """
    rows: list[dict] = []
    total = len(runs)
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{total}] {run.experiment}"
        result = _read_results(run.results_path)
        cmd = command(run)
        flags = cmd[2:]  # after the interpreter and the script
        if result is not None:
            check_reuse(run, cmd)
            progress(f"{tag}: skipping, finished earlier (top-1 {result['top1']:.2f} %)")
            rows.append(_row(run, "done", result))
        else:
            run.log_path.parent.mkdir(parents=True, exist_ok=True)
            before = run.flags_path.read_text() if run.flags_path.exists() else None
            run.flags_path.write_text(json.dumps({"flags": flags, "config": run.info.config}))
            progress(f"{tag}: running (log: {run.log_path})")
            with open(run.log_path, "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            result = _read_results(run.results_path) if rc == 0 else None
            if rc == 2:
                if not any(run.run_dir.glob("*.pth.tar")):  # refused before training: the folder's recorded flags
                    if before is None:  # stay what they were (after checkpoints were written they are theirs)
                        run.flags_path.unlink(missing_ok=True)
                    else:
                        run.flags_path.write_text(before)
                errors = [ln for ln in _log_tail(run.log_path, 40).splitlines() if ln.startswith("error:")]
                raise CompareError(f"run {run.experiment} rejected its input: "
                                   f"{errors[-1][len('error: '):] if errors else _log_tail(run.log_path)}")
            if result is None:
                progress(f"{tag}: FAILED (exit code {rc}); last lines of {run.log_path}:\n{_log_tail(run.log_path)}")
                rows.append(_row(run, "failed", None))
            else:
                progress(f"{tag}: top-1 {result['top1']:.2f} %, sparsity {result['sparsity_all']:.1%} of all "
                         f"weights, {result['wall_time_s']:.0f} s")
                rows.append(_row(run, "done", result))
        if on_row is not None:
            on_row(rows)
    return rows


def earlier_rows(path: Path, runs: Sequence[Run], dataset: str) -> tuple[list[dict], list[str]]:
    """Rows of a previous ``comparison.csv`` at ``path`` for runs this invocation does not name, so that comparing a
    subset of the recipes (or adding one) does not drop the others from the tables. A row is kept when its run
    finished (its ``results.json`` is read back) on the same data set. Returns the rows kept and the names of the
    runs left out (another data set, failed, or no longer finished); their folders are not touched."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return [], []
    # a run is its folder's name under <comparison>/runs: the stored path may be relative to another directory
    planned = {r.experiment for r in runs}
    runs_dir = Path(path).parent / "runs"
    kept: list[dict] = []
    left: list[str] = []
    for row in rows:
        name = Path(row.get("run_dir") or "").name
        if name in planned:
            continue
        result = _read_results(runs_dir / name / "results.json") if name else None
        if row.get("status") != "done" or result is None or row.get("dataset") != dataset:
            left.append(name or str(row.get("recipe")))
            continue
        kept.append({**row, "run_dir": str(runs_dir / name), **{key: result.get(key, "") for key in RESULT_KEYS}})
    return kept, left


# ---------------------------------------------------------------------------------------------------------------------
# tables and plot
# ---------------------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One entry per recipe (in run order) with mean/std over its finished seeds."""
    order: list[str] = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["recipe"] not in groups:
            order.append(r["recipe"])
            groups[r["recipe"]] = []
        groups[r["recipe"]].append(r)
    out = []
    for label in order:
        rs = groups[label]
        ok = [r for r in rs if r["status"] == "done"]
        entry = {"recipe": label, "method": rs[0]["method"], "pattern": rs[0]["pattern"],
                 "model": next((r["model"] for r in ok if r["model"]), ""), "published_top1": rs[0]["published_top1"],
                 "seeds": len(ok), "failed": len(rs) - len(ok)}
        for key in RESULT_KEYS:
            vals = [float(r[key]) for r in ok]
            entry[key] = _mean_std(vals) if vals else None
        out.append(entry)
    return out


def write_csv(rows: Sequence[dict], path: Path) -> None:
    write_csv_atomic(path, CSV_COLUMNS, rows)


def _fmt(ms: tuple[float, float | None] | None, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    if ms is None:
        return "—"
    mean, std = ms
    text = f"{mean * scale:.{digits}f}"
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text + unit


def write_markdown(summary: Sequence[dict], path: Path, title: str = "Comparison", notes: Sequence[str] = ()) -> None:
    lines = [f"# {title}", ""]
    lines += [f"{n}  " for n in notes]
    if notes:
        lines.append("")
    lines += ["| recipe | method | pattern | seeds | top-1 (%) | top-5 (%) | sparsity, selected | sparsity, all "
              "| wall time (s) | published top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        seeds = str(e["seeds"]) + (f" ({e['failed']} failed)" if e["failed"] else "")
        pub = e["published_top1"] if e["published_top1"] != "" else "—"
        lines.append(
            f"| {e['recipe']} | {e['method']} | {e['pattern']} | {seeds} | {_fmt(e['top1'])} | {_fmt(e['top5'])} "
            f"| {'n/a' if e['method'] == 'dense' else _fmt(e['sparsity_selected'], 100, 1, ' %')} "
            f"| {_fmt(e['sparsity_all'], 100, 1, ' %')} "
            f"| {_fmt(e['wall_time_s'], digits=0)} | {pub} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Sparsity: fraction of zero weights in the layers the "
              "recipe selects, and in all Linear/Conv layers.", ""]
    Path(path).write_text("\n".join(lines))


def write_plot(summary: Sequence[dict], path: Path, title: str = "") -> bool:
    """Top-1 against sparsity of all Linear/Conv weights, one line per method. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_method: dict[str, list[dict]] = {}
    for e in summary:
        if e["top1"] is not None:
            by_method.setdefault(e["method"], []).append(e)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, entries in by_method.items():
        entries = sorted(entries, key=lambda e: e["sparsity_all"][0])
        xs = [100 * e["sparsity_all"][0] for e in entries]
        ys = [e["top1"][0] for e in entries]
        errs = [e["top1"][1] or 0.0 for e in entries]
        line = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
        if method == "dense" and len(entries) == 1:  # the baseline as a reference line across the x range
            ax.axhline(ys[0], color=line[0].get_color(), linestyle="--", linewidth=1, alpha=0.6)
    ax.set_xlabel("sparsity of all Linear/Conv weights (%)")
    ax.set_ylabel("top-1 (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if by_method:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
