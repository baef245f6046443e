"""What a training run writes for people: summary.csv rows, results.json, sparsity_report.csv, the PNG plots
and the final table printed at the end (and the optional wandb run)."""

from __future__ import annotations

import csv
import json
import logging
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import write_atomic, write_csv_atomic
from .errors import UserError
from .report import format_report, overall_sparsity

__all__ = ["append_summary", "truncate_summary", "init_wandb", "write_report", "plots", "final_table",
           "explain_write_errors"]

_logger = logging.getLogger("train")


def append_summary(path: Path, row: dict) -> None:
    """One row per epoch under the file's header; a row with new columns (a resume that added ``--model-ema``,
    say) rewrites the file with the union, so no value lands under another column's name."""
    header = None
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header is not None and not set(row) <= set(header):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        write_csv_atomic(path, header + [k for k in row if k not in header], [*rows, row])
        return
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or list(row))
        if header is None:
            w.writeheader()
        w.writerow(row)


def truncate_summary(path: Path, next_epoch: int) -> None:
    """On resume keep only rows of finished epochs, so the CSV matches an uninterrupted run."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    write_csv_atomic(path, list(rows[0]), [r for r in rows if int(r["epoch"]) < next_epoch])


def init_wandb(args, resolved: dict, run_dir: Path):
    try:
        import wandb
    except ImportError:
        _logger.warning("--log-wandb: wandb is not installed (pip install wandb); logging to summary.csv only")
        return None
    return wandb.init(project=args.experiment or "sparsity", config=resolved, dir=str(run_dir))


@contextmanager
def explain_write_errors(run_dir: Path):
    """A full disk (or a folder gone read-only) while writing the run's tables, config or plots: one message and
    exit code 2, as for checkpoints, instead of a traceback."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write into {run_dir} ({e.strerror or e}); free space or choose another --output. "
                        "The checkpoints written so far are intact: rerun with --resume auto to finish") from None


def write_report(run_dir: Path, rows, final, model, args, recipe, seconds: float) -> None:
    write_csv_atomic(run_dir / "sparsity_report.csv", list(rows[0]) if rows else ["fqn"],
                     [{**r, "shape": "x".join(map(str, r["shape"]))} for r in rows])
    conform = [r["conforms"] for r in rows if r["conforms"] is not None]
    result = {
        "model": args.model, "method": recipe.method, "top1": final["top1"], "top5": final["top5"],
        "loss": final["loss"], "sparsity_selected": overall_sparsity(model),
        "sparsity_all": overall_sparsity(model, selected_only=False), "layers": len(conform),
        "layers_conforming": sum(bool(c) for c in conform), "wall_time_s": round(seconds, 2),
    }
    result.update({k: final[k] for k in ("ema_top1", "ema_top5", "ema_loss") if k in final})  # --model-ema
    write_atomic(run_dir / "results.json", lambda f: f.write(json.dumps(result, indent=2)), mode="w")


def plots(run_dir: Path, summary_path: Path, rows) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if summary_path.exists():
        with open(summary_path, newline="") as f:
            data = list(csv.DictReader(f))
        if data:
            ep = [int(r["epoch"]) for r in data]
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(ep, [float(r["eval_top1"]) for r in data], "o-", label="top-1 (%)")
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs only
            ax.set_ylabel("top-1 (%)")
            ax2 = ax.twinx()
            ax2.plot(ep, [float(r["sparsity"]) for r in data], "s--", color="tab:red", label="sparsity")
            ax2.set_ylabel("sparsity of selected layers")
            ax2.set_ylim(0, 1)
            fig.legend(loc="upper center", ncol=2, frameon=False)  # above the axes: clear of curves and ticks
            fig.tight_layout(rect=(0, 0, 1, 0.9))
            fig.savefig(run_dir / "training_curves.png", dpi=120)
            plt.close(fig)
    if rows:
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows))))
        ax.barh([r["fqn"] for r in rows], [r["density"] for r in rows],
                color=["tab:blue" if r["conforms"] else "tab:gray" for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("density (nonzero fraction of the forward weight)")
        ax.tick_params(axis="y", labelsize=6)
        fig.tight_layout()
        fig.savefig(run_dir / "layer_density.png", dpi=120)
        plt.close(fig)


def final_table(args, recipe, final, rows, model, run_dir, seconds) -> str:
    conform = [r for r in rows if r["conforms"] is not None]
    ok = sum(bool(r["conforms"]) for r in conform)
    lines = [
        "",
        format_report(rows, max_rows=12),
        "",
        f"{'model':<12}{args.model} ({recipe.method})",
        f"{'top-1':<12}{final['top1']:.2f} %   (top-5 {final['top5']:.2f} %, loss {final['loss']:.4f})",
        *([f"{'EMA top-1':<12}{final['ema_top1']:.2f} %   (top-5 {final['ema_top5']:.2f} %, loss "
           f"{final['ema_loss']:.4f}; the metric model_best ranks)"] if "ema_top1" in final else []),
        f"{'sparsity':<12}{overall_sparsity(model):.1%} of the {len(conform)} selected layers' weights, "
        f"{overall_sparsity(model, selected_only=False):.1%} of all Linear/Conv weights",
        f"{'conforms':<12}" + ("n/a: no layer is selected (a dense run)" if not conform else
                                 f"yes: all {ok} selected layers match their pattern" if ok == len(conform)
                                 else f"NO: {len(conform) - ok} of {len(conform)} layers do not match their pattern"),
        f"{'wall time':<12}{seconds:.1f} s",
        f"{'run dir':<12}{run_dir}",
    ]
    return "\n".join(lines)
