"""compare.py: recipes x seeds as train.py subprocesses, the CSV/Markdown/PNG outputs, resume, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

import compare
from cli_common import USER_ERROR_EXIT, run_cli
from sparsity import compare as cmp
from sparsity.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs" / "quickstart"
TINY = ["--epochs", "1", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"]


@pytest.mark.slow
def test_compare_runs_tables_plot_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [str(QUICK / "dense_digits.yaml"), str(QUICK / "srste_digits_2of4.yaml"), "--seeds", "0", "1",
            "--output", str(out), *TINY, "--", "--batch-size", "256", "--workers", "0"]
    assert run_cli(compare.main, argv) == 0
    text = capsys.readouterr().out
    assert "[1/4] dense_digits-s0: running" in text and "[4/4] srste_digits_2of4-s1" in text

    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == cmp.CSV_COLUMNS
    assert [(r["recipe"], int(r["seed"])) for r in rows] == [
        ("dense_digits", 0), ("dense_digits", 1), ("srste_digits_2of4", 0), ("srste_digits_2of4", 1)]
    for r in rows:
        assert r["status"] == "done" and r["dataset"] == "digits" and r["model"] == "vit_tiny_patch16_224"
        assert 0.0 <= float(r["top1"]) <= 100.0 and float(r["wall_time_s"]) > 0
    dense, sparse = rows[0], rows[2]
    assert (dense["method"], float(dense["sparsity_selected"]), float(dense["sparsity_all"])) == ("dense", 0.0, 0.0)
    assert sparse["method"] == "srste" and sparse["pattern"] == "ff=2:4 q,k,v=2:4"
    assert float(sparse["sparsity_selected"]) == pytest.approx(0.5)
    assert 0.0 < float(sparse["sparsity_all"]) < 0.5  # patch embedding, proj and head stay dense
    for r in rows:  # every run is a real train.py run folder
        run_dir = Path(r["run_dir"])
        assert run_dir.name == f"{r['recipe']}-s{r['seed']}" and run_dir.parent == out / "runs"
        assert json.loads((run_dir / "results.json").read_text())["top1"] == pytest.approx(float(r["top1"]))

    md = (out / "comparison.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| recipe | method | pattern | seeds | top-1 (%)")
    assert len(table) == 3 and table[1].startswith("| dense_digits | dense | dense | 2 |")
    assert "| n/a | 0.0 ± 0.0 % |" in table[1]  # no layer is selected in a dense run
    assert " ± " in table[2] and "| 50.0 ± 0.0 % |" in table[2]
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second invocation reads every run back: nothing is trained or rewritten
    stamps = {r["run_dir"]: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for r in rows}
    assert run_cli(compare.main, argv) == 0
    text = capsys.readouterr().out
    assert text.count("skipping, finished earlier") == 4 and ": running" not in text
    assert {d: (Path(d) / "results.json").stat().st_mtime_ns for d in stamps} == stamps
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == sorted(Path(d).name for d in stamps)
    with open(out / "comparison.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows
    # --dry-run validates as the real invocation would: finished runs with other flags are refused there too
    assert run_cli(compare.main, [*argv[:-5], "--dry-run", "--", "--batch-size", "128", "--workers", "0"]) == \
        USER_ERROR_EXIT
    assert "dense_digits-s0 finished earlier with other train.py flags (then --batch-size 256; now --batch-size " \
        "128)" in capsys.readouterr().err


def _fake_train(tmp_path: Path, top1: float, rc: int = 0) -> list[str]:
    """A stand-in for train.py: writes results.json into the run folder named on its command line."""
    script = tmp_path / f"fake_{rc}.py"
    script.write_text(
        "import json, pathlib, sys\n"
        "a = sys.argv[1:]\n"
        "d = pathlib.Path(a[a.index('--output') + 1]) / a[a.index('--experiment') + 1]\n"
        f"if {rc}:\n    print('error: bad data dir'); raise SystemExit({rc})\n"
        "d.mkdir(parents=True, exist_ok=True)\n"
        f"r = {{'model': 'm', 'method': 'x', 'top1': {top1} + int(a[a.index('--seed') + 1]), 'top5': 99.0,\n"
        "     'sparsity_selected': 0.5, 'sparsity_all': 0.25, 'wall_time_s': 1.5}\n"
        "(d / 'results.json').write_text(json.dumps(r))\n")
    return [sys.executable, str(script)]


def _infos(paths):
    labels = cmp.recipe_labels(paths)
    return [cmp.recipe_info(p, labels[p], {"method": "srste", "rules": [{"target": "ff", "n": 2, "m": 4}]}, "digits")
            for p in paths]


def test_run_all_resumes_and_reports_failures(tmp_path):
    a, b = tmp_path / "a" / "r.yaml", tmp_path / "b" / "r.yaml"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("# Source: x\n# Published top-1: 70.5\nepochs: 1\n")
    runs = cmp.plan_runs(_infos([a, b]), [0, 1], tmp_path / "runs")
    assert [r.experiment for r in runs] == ["a-r-s0", "a-r-s1", "b-r-s0", "b-r-s1"]
    fake = _fake_train(tmp_path, 60.0)
    lines: list[str] = []
    rows = cmp.run_all(runs[:3], lambda r: fake + cmp.train_command(r, Path("train.py"))[2:], lines.append)
    assert [r["status"] for r in rows] == ["done"] * 3
    # resume: the three finished runs are read back; the failing command only reaches the fourth
    failing = _fake_train(tmp_path, 0.0, rc=1)
    lines.clear()
    rows = cmp.run_all(runs, lambda r: failing + cmp.train_command(r, Path("train.py"))[2:], lines.append)
    assert sum("skipping" in ln for ln in lines) == 3 and "FAILED (exit code 1)" in lines[-1]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    summary = cmp.summarize(rows)
    assert summary[0]["top1"] == (pytest.approx(60.5), pytest.approx(0.5 ** 0.5))  # seeds 0, 1 -> 60, 61
    assert summary[1]["seeds"] == 1 and summary[1]["failed"] == 1 and summary[1]["top1"][1] is None
    cmp.write_markdown(summary, tmp_path / "c.md")
    md = (tmp_path / "c.md").read_text()
    assert "| a-r | srste | ff=2:4 | 2 | 60.50 ± 0.71 |" in md and "1 (1 failed)" in md and "| 70.5 |" in md
    # a finished run is not reused for other train.py flags: its result would be reported as theirs
    with pytest.raises(cmp.CompareError, match=r"a-r-s0 finished earlier with other train.py flags \(now --epochs "
                                               r"2\)"):
        cmp.run_all(runs[:1], lambda r: fake + cmp.train_command(r, Path("train.py"), ["--epochs", "2"])[2:])
    # a run that rejects its input (exit code 2) stops the comparison with its error line
    bad = _fake_train(tmp_path, 0.0, rc=2)
    recorded = runs[3].flags_path.read_text()  # the flags of the failed attempt in that folder
    with pytest.raises(cmp.CompareError, match="bad data dir"):
        cmp.run_all(runs[3:], lambda r: bad + cmp.train_command(r, Path("train.py"), ["--epochs", "3"])[2:])
    assert runs[3].flags_path.read_text() == recorded  # refused before training: the folder's record stays
    fresh = cmp.plan_runs(_infos([a]), [7], tmp_path / "runs")[0]
    with pytest.raises(cmp.CompareError, match="bad data dir"):
        cmp.run_all([fresh], lambda r: bad + cmp.train_command(r, Path("train.py"))[2:])
    assert not fresh.flags_path.exists()


def test_a_finished_run_is_not_reused_after_its_recipe_changed(tmp_path):
    """Same file, same flags, other content (here through its ``base:``): the old run's figures would be reported
    under the new recipe's method and pattern, so compare refuses and names what changed."""
    import compare

    base = tmp_path / "_base.yaml"
    base.write_text((ROOT / "configs/quickstart/ste_digits_2of4.yaml").read_text().replace(
        "base: _vit_digits.yaml", f"base: {ROOT / 'configs/quickstart/_vit_digits.yaml'}"))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: _base.yaml\nepochs: 1\n")

    def info():
        targs, block = compare._check_recipe(recipe, [])
        return cmp.recipe_info(recipe, "mine", block, "digits", targs)

    fake = _fake_train(tmp_path, 60.0)
    run = cmp.plan_runs([info()], [0], tmp_path / "runs")[0]
    assert [r["status"] for r in cmp.run_all([run], lambda r: fake + cmp.train_command(r, Path("train.py"))[2:])] \
        == ["done"]
    assert cmp.run_all([cmp.plan_runs([info()], [0], tmp_path / "runs")[0]],  # unchanged: read back
                       lambda r: fake + cmp.train_command(r, Path("train.py"))[2:])[0]["top1"] == 60.0
    saved = json.loads(run.flags_path.read_text())
    del saved["config"]["clip_grad"]  # a flag the train.py of that run did not have yet: not a recipe change
    run.flags_path.write_text(json.dumps(saved))
    assert cmp.run_all([cmp.plan_runs([info()], [0], tmp_path / "runs")[0]],
                       lambda r: fake + cmp.train_command(r, Path("train.py"))[2:])[0]["status"] == "done"
    moved = tmp_path / "moved"  # the comparison folder moved elsewhere: the same runs, read back
    shutil.copytree(tmp_path / "runs", moved)
    assert cmp.run_all([cmp.plan_runs([info()], [0], moved)[0]],
                       lambda r: fake + cmp.train_command(r, Path("train.py"))[2:])[0]["top1"] == 60.0
    base.write_text(base.read_text().replace("n: 2, m: 4", "n: 1, m: 8"))  # the recipe now means 1:8
    run = cmp.plan_runs([info()], [0], tmp_path / "runs")[0]
    assert run.info.pattern.startswith("ff=1:8")
    with pytest.raises(cmp.CompareError, match=r"mine-s0 finished earlier with another recipe \(sparsity\.rules: "):
        cmp.run_all([run], lambda r: fake + cmp.train_command(r, Path("train.py"))[2:])
    with pytest.raises(cmp.CompareError, match="another recipe"):  # what --dry-run checks for a finished run
        cmp.check_reuse(run, [sys.executable, "train.py", *cmp.train_command(run, Path("train.py"))[2:]])


def test_labels_methods_and_patterns(tmp_path):
    paths = [Path("configs/imagenet/vit_b16/srste/ff_2of4.yaml"), Path("configs/imagenet/deit_s16/srste/ff_2of4.yaml"),
             Path("configs/quickstart/dense_digits.yaml")]
    labels = cmp.recipe_labels(paths)
    assert list(labels.values()) == ["vit_b16-srste-ff_2of4", "deit_s16-srste-ff_2of4", "dense_digits"]

    def rec(block):
        return recipe_from_dict(block)

    rules = [{"target": "ff", "n": 1, "m": 8}, {"target": ["q", "k", "v"], "n": 2, "m": 8}]
    assert cmp.method_label(rec({"method": "mdgf", "decay": {"type": "linear"}, "rules": rules})) == "mdgf (linear)"
    sdgf = rec({"method": "srste", "structure_decay": "fine", "rules": rules})
    assert cmp.method_label(sdgf) == "sdgf-fine (srste)" and cmp.describe_pattern(sdgf) == "ff=1:8 q,k,v=2:8"
    usd = rec({"method": "usd", "target_sparsity": 0.75, "rules": [{"target": ["ff", "qkv"]}]})
    assert cmp.describe_pattern(usd) == "ff,qkv=75% (N:16)"
    gmp = rec({"method": "gmp", "final_sparsity": 0.8, "rules": [{"target": "ff", "tile": 4}]})
    assert cmp.describe_pattern(gmp) == "ff=80%"
    assert cmp.describe_pattern(rec({"method": "dense"})) == "dense"
    assert cmp.published_top1(ROOT / "configs/imagenet/resnet50/srste_4of8.yaml") == 77.4


@pytest.mark.parametrize("argv, message", [
    (["configs/nothing/*.yaml"], "no recipe matches"),
    (["configs/quickstart/nothing.yaml"], "does not exist"),
    (["configs/quickstart/dense_digits.yaml", "--", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["configs/quickstart/dense_digits.yaml", "--", "--seed", "3"], "--seed after '--'"),
    (["configs/quickstart/dense_digits.yaml", "configs/imagenet/resnet50/dense.yaml"], "different data sets"),
    (["configs/quickstart/dense_digits.yaml", "--epochs", "0"], "--epochs must be >= 1"),
    (["configs/quickstart/dense_digits.yaml", "--dry-run", "--", "-b", "0"], "-b must be at least 1, got 0"),
    (["configs/quickstart/dense_digits.yaml", "--dry-run", "--", "--lr", "-1"], "--lr must be 0 or more"),
    # refused by train.py only once the run starts (no search epoch left): --dry-run says so up front
    (["configs/quickstart/usd_digits_75.yaml", "--epochs", "5", "--dry-run"], "finetune_epochs=5 leaves no epoch"),
])
def test_bad_input_exit_code_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert run_cli(compare.main, ["--output", "/nonexistent/never-written", *argv]) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_invalid_recipe_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nsparsity:\n  method: srste\n  rules:\n    - {target: ff, n: 2, m: 4, tiles: 3}\n")
    assert run_cli(compare.main, [str(bad), "--output", str(tmp_path / "o")]) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "tiles" in err and "did you mean 'tile'" in err and not (tmp_path / "o").exists()
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochs: 1\nbatch_sise: 8\n")
    assert run_cli(compare.main, [str(typo), "--dry-run"]) == USER_ERROR_EXIT
    assert "batch_size" in capsys.readouterr().err


def test_dry_run_lists_runs(tmp_path, capsys):
    argv = [str(QUICK / "dense_digits.yaml"), str(QUICK / "ste_digits_*.yaml"), "--seeds", "3", "4", "--dry-run",
            "--output", str(tmp_path / "o"), *TINY]
    assert run_cli(compare.main, argv) == 0
    text = capsys.readouterr().out
    assert "3 recipes x 2 seeds = 6 runs on digits" in text
    assert "[6/6] ste_digits_2of4-s4 (to run)" in text and "--resume auto --epochs 1" in text
    assert not (tmp_path / "o").exists()
    plain = tmp_path / "no_dataset_key.yaml"  # train.py reads digits without a dataset: key; so does compare
    plain.write_text("epochs: 1\nsparsity: {method: ste, rules: [{target: ff, n: 2, m: 4}]}\n")
    argv = [str(QUICK / "dense_digits.yaml"), str(plain), "--dry-run", "--output", str(tmp_path / "o"), *TINY]
    assert run_cli(compare.main, argv) == 0
    assert "2 recipes x 1 seeds = 2 runs on digits" in capsys.readouterr().out


def test_a_subset_rerun_keeps_the_other_runs_in_the_tables(tmp_path, capsys, monkeypatch):
    """Comparing a subset of the recipes (or adding one) into a folder keeps the finished runs it does not name in
    comparison.csv/.md (the tables were rewritten with the subset alone); a run no longer finished is left out,
    named, and its folder is not touched."""
    fake = _fake_train(tmp_path, 60.0)
    real = cmp.train_command
    monkeypatch.setattr(cmp, "train_command", lambda run, script, args=(), **kw: fake + real(run, script, args)[2:])
    out = tmp_path / "cmp"
    dense, srste = str(QUICK / "dense_digits.yaml"), str(QUICK / "srste_digits_2of4.yaml")

    def table():
        with open(out / "comparison.csv", newline="") as f:
            return [(r["recipe"], int(r["seed"]), float(r["top1"])) for r in csv.DictReader(f)]

    assert run_cli(compare.main, [dense, srste, "--seeds", "0", "--output", str(out), *TINY]) == 0
    assert table() == [("dense_digits", 0, 60.0), ("srste_digits_2of4", 0, 60.0)]
    capsys.readouterr()
    assert run_cli(compare.main, [srste, "--seeds", "0", "1", "--output", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "the tables keep 1 finished runs of earlier comparisons" in text and "dense_digits-s0" in text
    assert table() == [("dense_digits", 0, 60.0), ("srste_digits_2of4", 0, 60.0), ("srste_digits_2of4", 1, 61.0)]
    md = (out / "comparison.md").read_text()
    assert "| srste_digits_2of4 | srste | ff=2:4 q,k,v=2:4 | 2 | 60.50 ± 0.71 |" in md
    assert "| dense_digits | dense | dense | 1 | 60.00 |" in md and "Also listed: 1 runs" in md
    monkeypatch.chdir(tmp_path)  # the same folder spelled relative: the same runs, not new ones
    assert run_cli(compare.main, [srste, "--seeds", "0", "1", "--output", "cmp", *TINY]) == 0
    assert "left out" not in capsys.readouterr().out
    assert table() == [("dense_digits", 0, 60.0), ("srste_digits_2of4", 0, 60.0), ("srste_digits_2of4", 1, 61.0)]
    (out / "runs" / "dense_digits-s0" / "results.json").unlink()
    assert run_cli(compare.main, [srste, "--seeds", "0", "1", "--output", str(out), *TINY]) == 0
    assert "left out of the tables" in capsys.readouterr().out
    assert table() == [("srste_digits_2of4", 0, 60.0), ("srste_digits_2of4", 1, 61.0)]
    assert (out / "runs" / "dense_digits-s0").is_dir()


def test_flag_difference_names_the_flag():
    assert cmp._flag_items(["--epochs", "2", "-b", "32", "--scale", "0.8", "1.0", "--min-lr", "-1e-5", "--amp"]) \
        == ["--epochs 2", "-b 32", "--scale 0.8 1.0", "--min-lr -1e-5", "--amp"]
    assert cmp._flag_items(["--lr", "-1"]) == ["--lr -1"]
