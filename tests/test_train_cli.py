"""End-to-end: train.py on the embedded digits data, validate.py on its checkpoints, resume, bad input."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import cli_common
import export
import sparsity
import train
import validate
from cli_common import run_cli
from tests.conftest import run_group

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32",
            "depth=2", "num_heads=2"]
FAST = ["--dataset", "digits", "-b", "256", "--workers", "0", "--opt", "adamw", "--lr", "1e-3", "--log-interval", "50",
        "--warmup-epochs", "0", "--hflip", "0", "--scale", "0.8", "1.0"]


def _recipe(tmp_path, name, sparsity_block):
    import yaml

    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"epochs": 1, "sparsity": sparsity_block}))
    return str(p)


RECIPES = {
    "ste": {"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 4}, {"target": ["q", "k", "v"], "n": 2, "m": 4}]},
    "srste": {"method": "srste", "rules": [{"target": "ff", "n": 1, "m": 4}]},
    "mdgf": {"method": "mdgf", "decay": {"type": "exp", "coef": 0.5}, "finetune_fraction": 0.2,
             "rules": [{"target": "ff", "n": 2, "m": 4}]},
    "sdgf": {"method": "srste", "structure_decay": "sparsify", "finetune_fraction": 0.2,
             "rules": [{"target": "ff", "n": 1, "m": 8}]},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_train_then_validate(tmp_path, name, capsys):
    cfg = _recipe(tmp_path, name, RECIPES[name])
    rc = run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run"])
    assert rc == 0
    run = tmp_path / "run"
    for f in ("args.yaml", "summary.csv", "last.pth.tar", "checkpoint-0.pth.tar", "model_best.pth.tar",
              "results.json", "sparsity_report.csv", "training_curves.png", "layer_density.png"):
        assert (run / f).is_file(), f
    with open(run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for col in ("epoch", "step", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "sparsity",
                "mask_flip_rate", "sparsity_forward", "sparsity_linear", "beta", "pattern", "phase"):
        assert col in rows[0], col
    assert int(rows[0]["step"]) == 5  # 1437 images / 256 per batch, last partial batch dropped (timm)
    result = json.loads((run / "results.json").read_text())
    assert result["layers"] > 0 and result["layers_conforming"] == result["layers"]
    expected_density = {"ste": 0.5, "srste": 0.25, "mdgf": 0.5, "sdgf": 0.125}[name]
    assert result["sparsity_selected"] == pytest.approx(1 - expected_density, abs=1e-6)
    out = capsys.readouterr().out
    assert "conforms    yes" in out
    # torch's one-pass kernel on CPU, with the N:M masks of the next step (and SR-STE's decay) computed in its pass
    masks = "the next masks and SR-STE decay" if RECIPES[name]["method"] == "srste" else "the next masks"
    assert f"optimizer: AdamW (fused implementation, --opt-impl auto), {masks} computed in its pass" in out
    native = re.search(r"the next masks came out of its pass in (\d+) of this process's (\d+) steps", out)
    # not at the first step, nor where a frame or phase changes: sdgf's 5-step ladder moves its frame every step
    assert native and int(native.group(2)) == 5 and (0 if name == "sdgf" else 1) <= int(native.group(1)) <= 4
    # the finalized model ties the last epoch's metric and takes model_best: its pruned weights are zero, so it
    # loads into timm with strict=False exactly (epoch 0's checkpoint still holds the pruned values)
    best = torch.load(run / "model_best.pth.tar", weights_only=True)
    assert best["best"] == [best["metric"], 1] and best["global_step"] == 5
    masks = {k[: -len("_mask")]: v for k, v in best["state_dict"].items() if k.endswith("weight_mask")}
    assert masks and all(not best["state_dict"][k][~m].any() for k, m in masks.items())
    res_file = tmp_path / "val.json"
    rc = run_cli(validate.main, ["--checkpoint", str(run / "last.pth.tar"), "--results-file", str(res_file),
                                 "--require-conformance"])
    assert rc == 0
    val = json.loads(res_file.read_text())
    assert val["top1"] == pytest.approx(result["top1"], abs=1e-3)  # same model, same data: same top-1
    assert val["layers_conforming"] == val["layers"] == result["layers"]
    if name == "ste":  # another input size than the model was trained at: one line, no evaluation
        capsys.readouterr()
        assert run_cli(validate.main, ["--checkpoint", str(run / "last.pth.tar"), "--img-size", "64"]) == 2
        err = capsys.readouterr().err
        assert "cannot take the data's 3x64x64 inputs" in err and "drop --img-size" in err
        # a config with another recipe: the file's own is what would be applied and checked, so it is refused
        other = _recipe(tmp_path, "other", RECIPES["srste"])
        assert run_cli(validate.main, ["--checkpoint", str(run / "last.pth.tar"), "--config", other,
                                       "--require-conformance"]) == 2
        err = capsys.readouterr().err
        assert "holds its own sparsity recipe, which differs from the one in" in err and "(in: method, rules)" in err
        assert run_cli(validate.main, ["--checkpoint", str(run / "last.pth.tar"), "--config", cfg]) == 0


def test_model_kwargs_on_the_command_line_merge_into_the_recipes(tmp_path):
    """``--model-kwargs depth=2`` on a recipe that builds a 32 px ViT keeps its img_size and patch_size (timm
    replaces the whole mapping, which silently built a 224 px model with 16 px patches)."""
    from cli_common import parse_with_config

    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: vit_tiny_patch16_224\nmodel_kwargs: {img_size: 32, patch_size: 4, depth: 12}\n")
    args, _ = parse_with_config(train.build_parser(), ["--config", str(cfg), "--model-kwargs", "depth=2",
                                                       "embed_dim=64"])
    assert args.model_kwargs == {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64}
    args, _ = parse_with_config(train.build_parser(), ["--model-kwargs", "depth=2", "--model-kwargs", "depth=3"])
    assert args.model_kwargs == {"depth": 3}
    assert train.build_parser().get_default("model_kwargs") == {}  # the shared default is never written to


def test_wall_time_counts_the_whole_run_across_a_resume(tmp_path, capsys):
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    args = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run", "--resume", "auto"]
    assert run_cli(train.main, args) == 0
    first = json.loads((tmp_path / "run" / "results.json").read_text())["wall_time_s"]
    out = capsys.readouterr().out
    assert f"wall time   {first:.1f} s" in out  # the table and results.json report the same figure
    saved = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)["wall_time_s"]
    assert saved == pytest.approx(first, abs=0.006)
    assert run_cli(train.main, args) == 0  # resumes the finished run: evaluates and reports again
    assert json.loads((tmp_path / "run" / "results.json").read_text())["wall_time_s"] >= first


def test_a_run_that_is_all_warm_up_is_warned_about(tmp_path, capsys):
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--warmup-epochs", "1", "--warmup-lr", "0",
                                "--output", str(tmp_path), "--experiment", "run"]) == 0
    out = capsys.readouterr().out
    assert "--warmup-epochs 1 covers the whole 1-epoch run: the lr never leaves its warm-up ramp (from --warmup-lr " \
           "0)" in out
    with open(tmp_path / "run" / "summary.csv") as f:
        assert float(next(csv.DictReader(f))["lr"]) == 0.0  # what the warning is about


def test_plateau_schedule_without_warmup_keeps_the_lr(tmp_path):
    """``--sched plateau --warmup-epochs 0`` trains at --lr, as in timm's train.py (a step(0) at the start set the
    plateau scheduler's warm-up LR, 1e-5 here, for the whole run)."""
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    args = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run", "--sched", "plateau",
            "--epochs", "2", "--warmup-lr", "1e-5"]
    assert run_cli(train.main, args) == 0
    with open(tmp_path / "run" / "summary.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == [1e-3, 1e-3]


@pytest.mark.parametrize("opt, flags, lr", [
    ("sgd", [], 0.025), ("adamw", [], 0.05), ("sgd", ["--lr", "0.3"], 0.3),
    ("adamw", ["--lr-base-scale", "linear", "--lr-base", "0.004", "--lr-base-size", "4096"], 0.0000625),
])
def test_lr_from_lr_base_as_in_timm(opt, flags, lr, capsys):
    """Without --lr the lr is --lr-base scaled to the global batch (here 64 on one process) over --lr-base-size:
    linearly, by the square root for ada*/lamb optimizers, as timm's train.py computes it."""
    assert run_cli(train.main, ["--opt", opt, "-b", "64", *flags, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == pytest.approx(lr)


def test_cooldown_epochs_are_trained_as_in_timm(tmp_path, capsys):
    """timm's train.py trains the length of its lr schedule: --epochs plus --cooldown-epochs. The sparsity schedule
    spans all of it (mdgf's decay and fine-tune fraction over 2 epochs), and a resume that would change the length
    is refused."""
    cfg = _recipe(tmp_path, "mdgf", RECIPES["mdgf"])
    args = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run", "--sched", "cosine"]
    assert run_cli(train.main, [*args, "--cooldown-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "training 2 epochs, the length of the lr schedule timm builds from --epochs 1 with --cooldown-epochs 1, " \
        "as timm's train.py does; --cooldown-epochs 0 trains exactly --epochs" in out
    with open(tmp_path / "run" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert [r["phase"] for r in rows] == ["sparse", "finetune"]  # fine-tune = the last 20 % of 10 steps
    ck = torch.load(tmp_path / "run" / "checkpoint-0.pth.tar", weights_only=True)
    assert ck["run_epochs"] == 2 and ck["next_epoch"] == 1
    # validate/export rebuild a mid-run mdgf checkpoint without its decayed weights: they say so (beta = e^-2.5)
    capsys.readouterr()
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "run" / "checkpoint-0.pth.tar")]) == 0
    out = capsys.readouterr().out
    assert "saved mid-run by mdgf at step 5 of 10" in out and "beta 0.0821" in out
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "run" / "last.pth.tar")]) == 0
    assert "mid-run" not in capsys.readouterr().out
    assert run_cli(train.main, [*args, "--resume", str(tmp_path / "run" / "checkpoint-0.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert "is from a 2-epoch run, this one would train 1" in err and "--epochs 1 --cooldown-epochs 1" in err


@pytest.mark.parametrize("scores,best", [([90.0, 80.0, 70.0, 60.0], [80.0, 1]), ([90.0, 80.0, 70.0, 95.0], [95.0, 3])])
def test_model_best_only_ranks_epochs_at_the_target(tmp_path, monkeypatch, scores, best):
    """Fine-tuning from a pretrained model, the early, denser epochs often score highest; model_best (what users
    export) must still be a model at the recipe's pattern. Top-1 is set per evaluation here (three epochs, then
    the final model, which competes as 'epoch 3')."""
    import sparsity.trainer as trainer_mod

    real, scores = trainer_mod.evaluate, iter(scores)

    def falling(*a, **k):
        return {**real(*a, **k), "top1": next(scores)}

    monkeypatch.setattr(trainer_mod, "evaluate", falling)
    cfg = _recipe(tmp_path, "sdgf", RECIPES["sdgf"])  # ladder 7:8 -> 4:8 -> 2:8 -> 1:8, then fine-tune
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--checkpoint-hist", "3",
                                "--output", str(tmp_path), "--experiment", "run"]) == 0
    run = tmp_path / "run"
    with open(run / "summary.csv") as f:
        patterns = [r["pattern"] for r in csv.DictReader(f)]
    assert patterns == ["ff=4:8", "ff=1:8", "ff=1:8"]
    ck = torch.load(run / "model_best.pth.tar", weights_only=True)
    assert ck["best"] == best and ck["metric"] == best[0]  # epoch 0 scored 90 at 4:8: not a candidate
    assert (run / "checkpoint-0.pth.tar").is_file()  # still kept for resume
    assert run_cli(validate.main, ["--checkpoint", str(run / "model_best.pth.tar"), "--require-conformance"]) == 0


def test_model_ema_ranks_checkpoints_by_the_ema_metric(tmp_path, monkeypatch, capsys):
    """As timm's train.py: with --model-ema, model_best (and a plateau scheduler) follow the EMA model's metric.
    Evaluations alternate live, EMA per epoch and at the end; here the live model improves while the EMA peaks at
    epoch 0, so model_best must be epoch 0 (the live ranking would pick the final model)."""
    import sparsity.trainer as trainer_mod

    real, scores = trainer_mod.evaluate, iter([50.0, 90.0, 60.0, 40.0, 70.0, 30.0, 80.0, 20.0])

    def scripted(*a, **k):
        return {**real(*a, **k), "top1": next(scores)}

    monkeypatch.setattr(trainer_mod, "evaluate", scripted)
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--model-ema",
                                "--output", str(tmp_path), "--experiment", "run"]) == 0
    run = tmp_path / "run"
    with open(run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["eval_top1"]), float(r["ema_top1"])) for r in rows] == [(50, 90), (60, 40), (70, 30)]
    best = torch.load(run / "model_best.pth.tar", weights_only=True)
    assert best["best"] == [90.0, 0] and best["metric"] == 90.0  # [metric, epoch]: epoch 0
    result = json.loads((run / "results.json").read_text())
    assert result["top1"] == 80.0 and result["ema_top1"] == 20.0
    assert "EMA top-1   20.00 %" in capsys.readouterr().out
    monkeypatch.setattr(trainer_mod, "evaluate", real)
    assert run_cli(validate.main, ["--checkpoint", str(run / "model_best.pth.tar")]) == 0
    captured = capsys.readouterr()
    assert "the model_best ranking come from the EMA weights" in captured.out + captured.err  # live weights read
    # resuming without --model-ema: the saved ranking compared EMA metrics, so it starts over
    scores = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr(trainer_mod, "evaluate", scripted)
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--output", str(tmp_path),
                                "--experiment", "resumed", "--resume", str(run / "checkpoint-0.pth.tar")]) == 0
    best = torch.load(tmp_path / "resumed" / "model_best.pth.tar", weights_only=True)
    assert best["best"] == [30.0, 3] and best["metric_model"] == "model"  # not the EMA's [90.0, 0]
    assert "ranking (ema metric) starts over" in "".join(capsys.readouterr())
    # in the run's own folder a changed --model-ema would rewrite what the run wrote: refused, nothing touched
    monkeypatch.setattr(trainer_mod, "evaluate", real)
    def files():  # the lock file of the finished runs is not theirs to keep
        return {p: p.read_bytes() for d in (run, tmp_path / "resumed") for p in d.iterdir() if p.name != ".run.lock"}

    written = files()
    for folder, flags, said in [("run", [], "was trained with --model-ema"),
                                ("resumed", ["--model-ema"], "was trained without --model-ema")]:
        assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--output", str(tmp_path),
                                    "--experiment", folder, "--resume", "auto", *flags]) == 2
        assert said in capsys.readouterr().err
    assert files() == written
    # with the run's own flags a finished run has nothing left to do: it says so and rewrites nothing
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--output", str(tmp_path),
                                "--experiment", "run", "--resume", "auto", "--model-ema"]) == 0
    assert "run run finished (EMA top-1 20.00 %;" in capsys.readouterr().out and files() == written
    results = run / "results.json"  # a results.json not written after this last.pth.tar (a crash in between):
    results.write_text(json.dumps({**json.loads(results.read_text()), "wall_time_s": 0.0}))  # the end runs again
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--output", str(tmp_path),
                                "--experiment", "run", "--resume", "auto", "--model-ema"]) == 0
    assert "finished" not in capsys.readouterr().out.splitlines()[-1]
    last = torch.load(run / "last.pth.tar", weights_only=True)
    assert json.loads(results.read_text())["wall_time_s"] == last["wall_time_s"]


def test_resume_from_epoch_checkpoint_matches_uninterrupted(tmp_path):
    cfg = _recipe(tmp_path, "mdgf", {**RECIPES["mdgf"], "structure_decay": "sparsify", "mask_interval": 2})
    args = ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--checkpoint-hist", "3", "--output", str(tmp_path)]
    assert run_cli(train.main, [*args, "--experiment", "full"]) == 0
    full = tmp_path / "full"
    assert run_cli(train.main, [*args, "--experiment", "resumed", "--resume",
                                str(full / "checkpoint-0.pth.tar")]) == 0
    a = torch.load(full / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pth.tar", weights_only=True)
    assert a["global_step"] == b["global_step"] == 15
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["controller"] == b["controller"]
    with open(full / "summary.csv") as f1, open(tmp_path / "resumed" / "summary.csv") as f2:
        full_rows, resumed_rows = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert full_rows[1:] == resumed_rows  # the resumed run writes epochs 1 and 2, identical to the full run


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bad_input_one_message_exit_2_nothing_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    keep = run / "last.pth.tar"
    keep.write_bytes(b"precious")
    base = ["train.py", *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run"]
    cases = [
        (["--dataset", "", "--data-dir", str(tmp_path / "missing")], "does not exist"),
        (["--model", "vit_tiny_patch16_22"], "unknown model 'vit_tiny_patch16_22'; did you mean"),
        (["--resume", str(keep)], "truncated or corrupt"),
    ]
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochs: 1\nbatch_sise: 8\n")
    cases.append((["--config", str(typo)], "unknown key 'batch_sise'"))
    nested = tmp_path / "nested.yaml"
    nested.write_text("sparsity: {method: ste, rules: [{target: ff, n: 2, m: 4, strictt: true}]}\n")
    cases.append((["--config", str(nested)], "did you mean 'strict'"))
    for extra, message in cases:
        proc = _cli(*base, *extra)
        assert proc.returncode == 2, (extra, proc.stderr[-500:])
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert keep.read_bytes() == b"precious" and sorted(os.listdir(run)) == ["last.pth.tar"]
    assert not (tmp_path / "run-1").exists()
    proc = _cli("validate.py", "--checkpoint", str(keep))
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_run_shape_errors_before_anything_is_written(tmp_path, capsys):
    """--epochs 0, a batch larger than the data, --resume auto without a run name, and a resume that would change
    the run (another recipe, another length): one line, exit 2, no run folder."""
    base = [*TINY_VIT, *FAST, "--output", str(tmp_path / "out")]
    cases = [
        (["--epochs", "0", "--experiment", "a"], "--epochs must be at least 1, got 0"),
        (["--epochs", "0", "--print-config"], "--epochs must be at least 1, got 0"),
        (["-b", "4096", "--experiment", "b"], "batch size 4096 x 1 process(es) exceeds the training set (1437 images"),
        (["--resume", "auto"], "--resume auto needs --experiment NAME"),
        (["--drop-path", "0.1", "--model-kwargs", "drop_path_rate=0.2", "--experiment", "c"],
         "--drop-path 0.1 and model_kwargs drop_path_rate=0.2 disagree; set one of them"),
    ]
    for extra, message in cases:
        assert run_cli(train.main, [*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # a finished 1-epoch 2:4 run, resumed with a 1:8 recipe, then with another --epochs
    first = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", first, *base, "--experiment", "run"]) == 0
    ckpt = str(tmp_path / "out" / "run" / "checkpoint-0.pth.tar")
    other = _recipe(tmp_path, "srste", RECIPES["srste"])
    capsys.readouterr()
    assert run_cli(train.main, ["--config", other, *base, "--experiment", "r2", "--resume", ckpt]) == 2
    assert "was trained with another sparsity recipe (differs in: method, rules)" in capsys.readouterr().err
    assert run_cli(train.main, ["--config", first, *base, "--experiment", "r3", "--resume", ckpt,
                                "--epochs", "3"]) == 2
    assert "is from a 1-epoch run, this one would train 3" in capsys.readouterr().err
    assert not (tmp_path / "out" / "r2").exists() and not (tmp_path / "out" / "r3").exists()


def test_eval_metric_loss_keeps_the_lowest(tmp_path, monkeypatch):
    import sparsity.trainer as trainer_mod

    real, losses = trainer_mod.evaluate, iter([1.0, 2.0, 3.0, 4.0])  # three epochs, then the final model

    def rising(*a, **k):
        return {**real(*a, **k), "loss": next(losses)}

    monkeypatch.setattr(trainer_mod, "evaluate", rising)
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--epochs", "3", "--checkpoint-hist", "2",
                                "--eval-metric", "loss", "--output", str(tmp_path), "--experiment", "run"]) == 0
    best = torch.load(tmp_path / "run" / "model_best.pth.tar", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    assert best["metric"] == 1.0 and last["best"] == [1.0, 0] and last["hist"] == [[1.0, 0], [2.0, 1]]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-0.pth.tar",
                                                                                "checkpoint-1.pth.tar"]


def _image_folder(root: Path, classes: int, per_class: int = 4, size: int = 40) -> Path:
    """An ImageFolder with train/ and validation/ splits of solid-colour images, one colour per class and image."""
    from PIL import Image

    for split in ("train", "validation"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), color=(60 * c, 20 * i, 100)).save(d / f"{i}.png")
    return root


def test_image_folder_data_dir(tmp_path, capsys):
    _image_folder(tmp_path / "data", classes=3)
    cfg = _recipe(tmp_path, "ste", RECIPES["srste"])
    rc = run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--dataset", "", "--data-dir",
                              str(tmp_path / "data"), "--img-size", "32", "-b", "4", "--output", str(tmp_path),
                              "--experiment", "folder"])
    assert rc == 0
    args = (tmp_path / "folder" / "args.yaml").read_text()
    assert "num_classes: null" in args or "num_classes" in args
    ck = torch.load(tmp_path / "folder" / "last.pth.tar", weights_only=True)
    assert ck["create_kwargs"]["num_classes"] == 3 and ck["global_step"] == 3
    # validate.py reads the data the run trained on without being told; other data is refused, not mis-scored
    out = tmp_path / "v.json"
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "folder" / "last.pth.tar"), "--results-file",
                                   str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["top1"] <= 100.0 and res["loss"] > 0
    # a --results-file that cannot be written is refused before the evaluation, in one line
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    capsys.readouterr()
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "folder" / "last.pth.tar"), "--results-file",
                                   str(blocker / "v.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: --results-file {blocker / 'v.json'}: its folder {blocker} is not writable")
    assert "top-1" not in captured.out  # nothing was evaluated
    csv_out = tmp_path / "v.csv"
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "folder" / "last.pth.tar"), "--results-file",
                                   str(csv_out)]) == 0
    with open(csv_out, newline="") as f:
        assert float(next(csv.DictReader(f))["top1"]) == pytest.approx(res["top1"])
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "folder" / "last.pth.tar"), "--dataset",
                                   "digits"]) == 2
    assert "the digits validation split has 10 classes, the model predicts 3" in capsys.readouterr().err
    # --data-dir alone means an ImageFolder; with the embedded digits named it is refused (it would be ignored)
    base = ["--config", cfg, *TINY_VIT, *[a for a in FAST if a not in ("--dataset", "digits")], "--data-dir",
            str(tmp_path / "data"), "--img-size", "32", "-b", "4", "--output", str(tmp_path)]
    assert run_cli(train.main, [*base, "--experiment", "implicit", "--epochs", "1"]) == 0
    assert yaml.safe_load((tmp_path / "implicit" / "args.yaml").read_text())["dataset"] == ""
    assert run_cli(train.main, [*base, "--dataset", "digits", "--experiment", "refused"]) == 2
    assert "is not read with --dataset digits" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_validate_on_image_folder_uses_the_training_preprocessing(tmp_path, capsys):
    """A 32 px model trained on digits, validated on an ImageFolder: without flags validate.py takes the run's
    input size and mean/std (from the checkpoint, or the export's pretrained_cfg), not timm's 224 px ImageNet ones
    (which crashed the ViT, and would silently score a CNN at chance)."""
    import export
    from sparsity.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset

    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment",
                                "run"]) == 0
    digits = DigitsDataset("validation", img_size=32)
    for i, (img, label) in enumerate(zip(digits.images[:60], digits.targets[:60])):
        d = tmp_path / "folder" / "validation" / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i}.png")
    ckpt = tmp_path / "run" / "last.pth.tar"
    assert export.main(["--checkpoint", str(ckpt), "--format", "compressed", "--output", str(tmp_path / "exp")]) == 0
    data = ["--dataset", "", "--data-dir", str(tmp_path / "folder")]
    explicit = ["--img-size", "32", "--crop-pct", "1.0", "--mean", *map(str, DIGITS_MEAN), "--std",
                *map(str, DIGITS_STD)]
    results = {}
    for name, source, flags in [("explicit", ckpt, explicit), ("checkpoint", ckpt, []),
                                ("export", tmp_path / "exp", [])]:
        out = tmp_path / f"{name}.json"
        assert run_cli(validate.main, ["--checkpoint", str(source), *data, *flags, "--results-file", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert results["checkpoint"]["top1"] == results["explicit"]["top1"] == results["export"]["top1"]
    assert results["checkpoint"]["loss"] == pytest.approx(results["explicit"]["loss"], abs=1e-6)
    pcfg = json.loads((tmp_path / "exp" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["mean"] == pytest.approx(list(DIGITS_MEAN))
    # the same export written from Python records the run's preprocessing too
    model, ck = sparsity.model_from_checkpoint(ckpt)
    sparsity.export_densified(model, tmp_path / "py", arch=ck["arch"], create_kwargs=ck["create_kwargs"])
    pcfg = json.loads((tmp_path / "py" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["std"] == pytest.approx(list(DIGITS_STD))
    assert pcfg["crop_pct"] == 1.0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_torchrun_two_processes_identical_masks_and_weights(tmp_path):
    cfg = _recipe(tmp_path, "srste", RECIPES["srste"])
    proc = run_group(
        ["bash", "distributed_train.sh", "2", "--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path),
         "--experiment", "ddp", "--mask-check-interval", "1", "--model-ema",  # EMA: rank 0's on every rank
         "--grad-accum-steps", "2"],  # gradients reduced once per window (no_sync on its first batch)
        cwd=ROOT, timeout=300, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ranks identical: masks and weights" in proc.stdout
    ck = torch.load(tmp_path / "ddp" / "last.pth.tar", weights_only=True)
    assert ck["global_step"] == 1  # 719 images per rank / 256 per batch: 2 batches, one window


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_torchrun_bad_input_ends_with_the_error_line_and_exit_code_2(tmp_path):
    """torchrun reports a failed worker as exit code 1 under its own summary; the launcher ends with the workers'
    one-line error and exit code 2, as train.py does on one process, and the line is not repeated per rank."""
    cfg = _recipe(tmp_path, "typo", {"method": "srste", "rules": [{"target": "ff", "n": 2, "mm": 4}]})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_group(["bash", "distributed_train.sh", "2", "--config", cfg, *TINY_VIT, *FAST, "--output",
                      str(tmp_path / "out")], cwd=ROOT, timeout=300,
                     env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(scratch)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown key 'sparsity.rules[0].mm'") and "did you mean 'm'" in last
    # rank 0's own line and the launcher's last one: rank 1 wrote its line to the launcher's file only
    assert sum(line.startswith("error: unknown key") for line in proc.stderr.splitlines()) == 2, proc.stderr
    assert not (tmp_path / "out").exists()
    assert not list(scratch.glob("sparsity-error.*"))  # the launcher's error file is removed on exit


def test_summary_keeps_columns_aligned_when_a_resume_adds_one(tmp_path):
    from sparsity.run_outputs import append_summary

    path = tmp_path / "summary.csv"
    append_summary(path, {"epoch": 0, "eval_top1": 50.0, "sparsity": 0.5})
    append_summary(path, {"epoch": 1, "eval_top1": 60.0, "ema_top1": 55.0, "sparsity": 0.5})  # --model-ema added
    append_summary(path, {"epoch": 2, "eval_top1": 70.0, "sparsity": 0.5})  # and dropped again
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "eval_top1", "sparsity", "ema_top1"]
    assert [r["sparsity"] for r in rows] == ["0.5"] * 3 and [r["ema_top1"] for r in rows] == ["", "55.0", ""]


def test_summary_rewrites_are_atomic_and_truncate_keeps_finished_epochs(tmp_path, monkeypatch):
    """A rewrite of summary.csv (new column, resume truncation) that fails midway leaves the old file whole."""
    import os

    from sparsity.run_outputs import append_summary, truncate_summary

    path = tmp_path / "summary.csv"
    for e in range(3):
        append_summary(path, {"epoch": e, "eval_top1": 50.0 + e})
    before = path.read_bytes()

    def no_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_disk)
        with pytest.raises(OSError):
            append_summary(path, {"epoch": 3, "eval_top1": 53.0, "ema_top1": 52.0})  # rewrite with a new column
        with pytest.raises(OSError):
            truncate_summary(path, 1)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    truncate_summary(path, 2)
    with open(path, newline="") as f:
        assert [(r["epoch"], r["eval_top1"]) for r in csv.DictReader(f)] == [("0", "50.0"), ("1", "51.0")]
    assert b"\r\r" not in path.read_bytes()  # csv's own line ends, not translated twice


def test_a_checkpoint_that_cannot_be_deleted_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    from pathlib import Path

    from sparsity import run_files
    from sparsity.engine import TrainState

    (tmp_path / "checkpoint-0.pth.tar").write_bytes(b"old")
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if self.name.startswith("checkpoint-"):
            raise PermissionError(13, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    state = TrainState()
    with caplog.at_level("WARNING", logger="train"):
        for epoch, metric in enumerate([10.0, 20.0]):  # keep 1: epoch 0's checkpoint is dropped after epoch 1
            run_files._save_epoch(tmp_path, lambda *a: {"metric": a[2]}, lambda obj, p: p.write_bytes(b"ck"), state,
                                epoch, metric, keep=1, problem=None, lower_is_better=False)
    assert (tmp_path / "checkpoint-1.pth.tar").exists() and (tmp_path / "model_best.pth.tar").exists()
    assert "could not delete" in caplog.text and "checkpoint-0.pth.tar" in caplog.text


def test_use_ema_on_a_checkpoint_without_ema_is_one_line(tmp_path, capsys):
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment",
                                "run"]) == 0
    capsys.readouterr()
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "run" / "last.pth.tar"), "--use-ema"]) == 2
    assert "the checkpoint holds no EMA weights (train with --model-ema)" in capsys.readouterr().err


def test_missing_split_folder_is_an_error_not_the_whole_root(tmp_path):
    from PIL import Image

    from sparsity.data import DataError, build_dataset

    for split, images in (("train", 1), ("val", 2), ("test", 3)):
        d = tmp_path / split / "c0"
        d.mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (8, 8)).save(d / f"{i}.png")
    assert len(build_dataset("", str(tmp_path), "val", False)) == 2
    assert len(build_dataset("", str(tmp_path), "validation", False)) == 2  # timm's synonym: val/ for validation
    assert len(build_dataset("", str(tmp_path), "training", True)) == 1
    with pytest.raises(DataError, match=r"has split folders \(test, train, val\) but none for 'holdout'; pass "
                                        r"--val-split"):
        build_dataset("", str(tmp_path), "holdout", False)


def test_initial_checkpoint_from_stock_timm_loads_and_says_so(tmp_path, caplog, capsys):
    import timm

    torch.manual_seed(0)
    stock = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10)
    torch.save(stock.state_dict(), tmp_path / "stock.pth")
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    with caplog.at_level("INFO", logger="sparsity.checkpoint"):  # the CLI's handler prints it to stdout
        assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--lr", "0", "--initial-checkpoint",
                                    str(tmp_path / "stock.pth"), "--output", str(tmp_path), "--experiment", "run"]) == 0
    n = len(stock.state_dict())
    assert f"loaded {n} tensors from {tmp_path / 'stock.pth'}: no masks (the recipe computes them at the first " \
           "step)" in capsys.readouterr().out
    state = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)["state_dict"]
    assert torch.equal(state["patch_embed.proj.weight"], stock.state_dict()["patch_embed.proj.weight"])  # lr 0
    fc1, mask = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight_mask"]
    assert torch.equal(fc1, stock.state_dict()["blocks.0.mlp.fc1.weight"] * mask)  # pruned from the stock weights


def test_checkpoints_of_timms_train_py(tmp_path, capsys, caplog):
    """A checkpoint as timm's train.py writes it (CheckpointSaver: its argparse.Namespace as ``args``, version 2,
    EMA weights): validate.py rebuilds the model from its args (here a 10-class head), --initial-checkpoint takes
    the EMA weights as timm's train.py does, and --resume says to use --initial-checkpoint (all were refused as
    needing arbitrary pickled code)."""
    import argparse

    import timm

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    live = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    ema = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    targs = argparse.Namespace(model="vit_tiny_patch16_224", num_classes=10, model_kwargs=kwargs, in_chans=None,
                               gp=None, img_size=None, input_size=None, crop_pct=None, mean=None, std=None,
                               interpolation="", dataset="", data_dir=None, epochs=300)
    path = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": live.state_dict(),
                "state_dict_ema": ema.state_dict(), "optimizer": {}, "version": 2, "args": targs, "metric": 1.0},
               path)
    model, _ = sparsity.model_from_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), live.eval()(x))
    assert run_cli(validate.main, ["--checkpoint", str(path), "--dataset", "digits"]) == 0
    assert "top-1" in capsys.readouterr().out
    # export.py builds it the same way: the 10-class head and the model kwargs from timm's args
    assert run_cli(export.main, ["--checkpoint", str(path), "--format", "densified", "--output",
                                 str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["model_args"] == kwargs
    from sparsity.export import load_for_eval

    stock, _ = load_for_eval(tmp_path / "dense")
    _, meta = load_for_eval(path)
    assert meta["create_kwargs"] == {**kwargs, "num_classes": 10}
    with torch.no_grad():
        assert torch.equal(stock(x), live(x))
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    base = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path)]
    with caplog.at_level("INFO", logger="sparsity.checkpoint"):  # the CLI's handler prints it to stdout
        assert run_cli(train.main, [*base, "--lr", "0", "--initial-checkpoint", str(path), "--experiment",
                                    "init"]) == 0
    assert f"from {path} (EMA weights)" in capsys.readouterr().out
    state = torch.load(tmp_path / "init" / "last.pth.tar", weights_only=True)
    assert torch.equal(state["state_dict"]["patch_embed.proj.weight"], ema.state_dict()["patch_embed.proj.weight"])
    assert state["version"] == 2 and state["epoch"] == 0  # timm's meaning: the last finished epoch
    assert run_cli(train.main, [*base, "--resume", str(path), "--experiment", "res"]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint of this train.py" in err and f"--initial-checkpoint {path}" in err
    assert not (tmp_path / "res").exists()


def test_initial_checkpoint_with_another_number_of_classes_keeps_a_fresh_head(tmp_path, capsys):
    """ImageNet-style weights (1000 classes) for a 10-class run: everything but the classifier loads, the
    classifier keeps its initialisation and the log says so (the load was refused on the head's shape)."""
    import timm

    torch.manual_seed(0)
    stock = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save(stock.state_dict(), tmp_path / "in1k.pth")
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--lr", "0", "--initial-checkpoint",
                                str(tmp_path / "in1k.pth"), "--output", str(tmp_path), "--experiment", "run"]) == 0
    assert "its classifier (head) predicts 1000 classes, this model 10: the classifier keeps its fresh " \
           "initialisation" in capsys.readouterr().out
    state = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)["state_dict"]
    assert torch.equal(state["patch_embed.proj.weight"], stock.state_dict()["patch_embed.proj.weight"])
    assert state["head.weight"].shape == (10, 32)


def test_batch_of_one_on_batchnorm_with_1x1_maps_is_refused_up_front(tmp_path, capsys):
    """ResNet at 32 px sees 1x1 maps in its last stage: with -b 1 BatchNorm gets one value per channel and the
    first training step would die in a traceback, after the run folder was written."""
    args = ["--model", "resnet10t", "--dataset", "digits", "--epochs", "1", "--workers", "0", "--output",
            str(tmp_path / "out")]
    assert run_cli(train.main, [*args, "-b", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -b 1: BatchNorm layer layer4.0.bn1 (and ") and "use -b 2 or more" in err
    assert not (tmp_path / "out").exists()


def test_splits_with_other_class_folders_are_refused(tmp_path, capsys):
    """train/{a,b,c,d} and validation/{a,d}: timm labels validation's d as 1 and training's as 3, and the run would
    score every d image against the wrong class without a word."""
    from PIL import Image

    for split, classes in (("train", "abcd"), ("validation", "ad")):
        for c in classes:
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8)).save(d / f"{i}.png")
    cfg = _recipe(tmp_path, "ste", RECIPES["ste"])
    assert run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--dataset", "", "--data-dir",
                                str(tmp_path / "data"), "-b", "2", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hold different classes (only in training: b, c; only in validation: none)" in err
    assert not (tmp_path / "out").exists()


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from sparsity.checkpoint import _umask, save_atomic
    from sparsity.run_files import _copy_atomic

    save_atomic({"a": torch.zeros(2)}, tmp_path / "last.pth.tar")
    _copy_atomic(tmp_path / "last.pth.tar", tmp_path / "model_best.pth.tar")
    want = 0o666 & ~_umask()
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("last.pth.tar", "model_best.pth.tar")] == [want, want]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth.tar", "model_best.pth.tar"]  # no temp left


def test_timm_augmentation_flags_reach_the_loader(tmp_path):
    """--train-interpolation (timm's default: random), --remode/--recount (timm's default: pixel noise, not zeros)
    reach timm's training transform; a YAML true is turned off with --no-<flag>; RandAugment's 0-bit posterize
    runs on any Pillow (Pillow 13 refuses 0 bits, which timm's rand-m9-mstd0.5-inc1 asks for)."""
    from PIL import Image

    from sparsity.data import timm_pillow_compat
    from sparsity.distributed import DistInfo
    from sparsity.trainer import build_loaders

    cfg = tmp_path / "r.yaml"
    cfg.write_text("reprob: 0.25\namp: true\n")
    args, _ = cli_common.parse_with_config(train.build_parser(), ["--config", str(cfg), "--no-amp", "--recount", "2"])
    assert args.amp is False and args.reprob == 0.25 and args.remode == "pixel" and args.train_interpolation == "random"
    ds = sparsity.data.build_dataset("digits", None, "train", True, img_size=32)
    args.validation_batch_size, args.aa = None, "rand-m9-mstd0.5-inc1"
    data_cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                "crop_pct": 1.0}
    val = sparsity.data.build_dataset("digits", None, "validation", False, img_size=32)
    train_loader, _ = build_loaders(args, data_cfg, ds, val, DistInfo(rank=0, world_size=1, local_rank=0,
                                                                 device=torch.device("cpu")))
    text = repr(train_loader.dataset.transform)
    assert "RandomErasing(p=0.25, mode=pixel, count=(1, 2))" in text
    assert "interpolation=bilinear bicubic)" in text  # random: one of the two per image
    from timm.data import auto_augment

    timm_pillow_compat()
    black = auto_augment.NAME_TO_OP["PosterizeIncreasing"](Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    # the wrapper needs no state from the main process (DataLoader workers started with spawn re-import it)
    from sparsity.data import _posterize

    assert _posterize(Image.new("L", (2, 2), 200), 3).getextrema() == (192, 192)


def test_a_timm_args_yaml_plus_a_sparsity_block_is_a_config(tmp_path, capsys, monkeypatch):
    """A timm run's args.yaml lists every timm train.py setting. With a sparsity: block added it runs as --config:
    timm's values (sgd, lr_base 0.1, smoothing 0.1, weight decay 2e-5, checkpoint_hist 10, its RandAugment, mixup and
    cutmix with --cutmix-minmax) are the run's; the timm settings not taken here are dropped at timm's defaults and
    refused, naming the key and why, when set; timm's output '' is ours (output)."""
    import timm.data

    _image_folder(tmp_path / "data", classes=2, size=36)
    timm_args = yaml.safe_load((ROOT / "tests" / "data" / "timm_args.yaml").read_text())
    assert timm_args["jsd_loss"] is False and timm_args["output"] == "" and timm_args["no_prefetcher"] is False
    timm_args.update(model="resnet10t", model_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}, epochs=1,
                     batch_size=4, workers=0, img_size=32, amp=False, model_ema=False, channels_last=False,
                     data_dir=str(tmp_path / "data"), cutmix_minmax=[0.3, 0.6],
                     sparsity={"method": "ste", "rules": [{"target": "stem", "skip": True},
                                                         {"target": "conv", "n": 2, "m": 4}]})
    cfg = tmp_path / "args.yaml"
    cfg.write_text(yaml.safe_dump(timm_args))
    assert run_cli(train.main, ["--config", str(cfg), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output"] == "output" and printed["dataset"] == "" and printed["opt"] == "sgd"
    minmax = []
    real = timm.data.Mixup.__init__
    monkeypatch.setattr(timm.data.Mixup, "__init__", lambda self, **kw: (minmax.append(kw["cutmix_minmax"]),
                                                                         real(self, **kw))[1])
    assert run_cli(train.main, ["--config", str(cfg), "--output", str(tmp_path), "--warmup-epochs", "0"]) == 0
    run = yaml.safe_load((tmp_path / "resnet50-a" / "args.yaml").read_text())
    assert (run["opt"], run["lr_base"], run["smoothing"], run["weight_decay"], run["checkpoint_hist"], run["aa"]) == \
        ("sgd", 0.1, 0.1, 2e-5, 10, "rand-m7-mstd0.5-inc1")
    assert minmax == [[0.3, 0.6]] and run["sparsity"]["method"] == "ste"
    with open(tmp_path / "resnet50-a" / "sparsity_report.csv") as f:
        report = list(csv.DictReader(f))
    assert len(report) >= 8 and all(r["pattern"] == "conv=2:4" and r["conforms"] == "True" for r in report)
    for key, value, why in [("jsd_loss", True, "AugMix"), ("no_ddp_bb", True, "broadcasts"),
                            ("worker_seeding", "part", "not implemented"), ("head_init_scale", 0, "not implemented"),
                            ("gp", "", "global_pool")]:  # falsy but not timm's default: they mean something
        bad = tmp_path / f"{key}.yaml"
        bad.write_text(yaml.safe_dump({**timm_args, key: value}))
        assert run_cli(train.main, ["--config", str(bad), "--print-config"]) == cli_common.USER_ERROR_EXIT
        err = capsys.readouterr().err
        assert f"'{key}: {value}'" in err and why in err and "timm train.py setting" in err, err
    newer = tmp_path / "newer.yaml"  # keys of later timm versions: at their defaults, or taken as flags here
    newer.write_text(yaml.safe_dump({**timm_args, "input_img_mode": None, "wandb_tags": [], "device_modules": None,
                                     "train_crop_mode": None, "color_jitter_prob": None, "grayscale_prob": 0.2,
                                     "gaussian_blur_prob": None}))
    assert run_cli(train.main, ["--config", str(newer), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["grayscale_prob"] == 0.2
    seen = {}
    real_loader = timm.data.create_loader
    monkeypatch.setattr(timm.data, "create_loader", lambda ds, **kw: (seen.setdefault(kw["is_training"], kw),
                                                                      real_loader(ds, **kw))[1])
    assert run_cli(train.main, ["--config", str(newer), "--output", str(tmp_path), "--experiment", "newer",
                                "--warmup-epochs", "0", "--train-crop-mode", "rkrc"]) == 0
    assert seen[True]["grayscale_prob"] == 0.2 and seen[True]["train_crop_mode"] == "rkrc"  # timm's transform
    assert "gaussian_blur_prob" not in seen[True] and "grayscale_prob" not in seen[False]  # unset: timm's default
    capsys.readouterr()
    ours = tmp_path / "ours.yaml"  # in our own configs a 'config' key stays an error (a config naming a config)
    ours.write_text(yaml.safe_dump({"config": "base.yaml", "sparsity": timm_args["sparsity"]}))
    assert run_cli(train.main, ["--config", str(ours), "--print-config"]) == cli_common.USER_ERROR_EXIT
    assert "unknown key 'config'" in capsys.readouterr().err
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump({**timm_args, "cutmix_minmax": [0.2]}))
    assert run_cli(train.main, ["--config", str(short), "--print-config"]) == cli_common.USER_ERROR_EXIT
    assert "'cutmix_minmax' in" in capsys.readouterr().err
    old = tmp_path / "old.yaml"  # timm's deprecated positional data dir: its data_dir
    old.write_text(yaml.safe_dump({**timm_args, "data": str(tmp_path / "data"), "data_dir": None}))
    assert run_cli(train.main, ["--config", str(old), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data_dir"] == str(tmp_path / "data")


def test_a_finished_dense_run_is_extended_in_place_and_a_done_one_left_alone(tmp_path, capsys):
    """A dense run has no sparsity schedule to keep: --resume auto with more --epochs trains them (a sparse run's
    length is fixed). At its length a finished run has nothing to do and rewrites nothing."""
    cfg = _recipe(tmp_path, "dense", {"method": "dense"})
    base = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run"]
    assert run_cli(train.main, [*base, "--epochs", "1"]) == 0
    assert run_cli(train.main, [*base, "--epochs", "2", "--resume", "auto"]) == 0
    with open(tmp_path / "run" / "summary.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    assert torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)["global_step"] == 10
    capsys.readouterr()
    stamp = (tmp_path / "run" / "last.pth.tar").stat().st_mtime_ns
    assert run_cli(train.main, [*base, "--epochs", "2", "--resume", "auto"]) == 0
    assert "nothing left to train, nothing rewritten" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.pth.tar").stat().st_mtime_ns == stamp


@pytest.mark.skipif(__import__("sparsity.native", fromlist=["kernel"]).kernel() is None,
                    reason="needs the native kernels (a C compiler)")
@pytest.mark.parametrize("extra", [["--clip-grad", "1.0"], ["--grad-accum-steps", "2"]])
def test_srste_decay_stays_in_the_backward_where_gradients_are_clipped_or_summed(tmp_path, extra, capsys):
    """Clipping must see SR-STE's decay term, and a sum over micro-batches would round it in another order: the
    optimizer still computes the masks, the decay stays in the backward (the log says which)."""
    cfg = _recipe(tmp_path, "srste", RECIPES["srste"])
    args = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run", *extra]
    assert run_cli(train.main, args) == 0
    out = capsys.readouterr().out
    assert "optimizer: AdamW (fused implementation, --opt-impl auto), the next masks computed in its pass" in out
