"""Reliability: SIGKILL + --resume auto is bit-exact, torchrun restarts, the non-finite guard, DDP mask checks,
and every row of docs/errors.md: one clear message, exit code 2, nothing earlier in the output dir touched."""

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sparsity
import train
from cli_common import run_cli
from tests.conftest import run_group

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32",
            "depth=2", "num_heads=2"]
FAST = ["--dataset", "digits", "-b", "256", "--workers", "0", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs",
        "0", "--hflip", "0", "--scale", "0.8", "1.0", "--log-interval", "100"]
RECIPE = {"method": "mdgf", "decay": {"type": "exp", "coef": 0.2}, "structure_decay": "sparsify",
          "finetune_fraction": 0.2, "rules": [{"target": "ff", "n": 1, "m": 4}, {"target": ["q", "k", "v"], "n": 2,
                                                                                 "m": 4}]}


def _cfg(tmp_path, block=RECIPE, name="exp.yaml", **top):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"epochs": 3, **top, "sparsity": block}))
    return str(p)


def _train(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _final(run: Path):
    ck = torch.load(run / "last.pth.tar", weights_only=True)
    with open(run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    return ck, rows


def _assert_same(a, b):
    ck_a, rows_a = a
    ck_b, rows_b = b
    assert ck_a["global_step"] == ck_b["global_step"]
    for k, v in ck_a["state_dict"].items():
        assert torch.equal(v, ck_b["state_dict"][k]), k
    for k, v in (ck_a["state_dict_ema"] or {}).items():
        assert torch.equal(v, ck_b["state_dict_ema"][k]), k
    assert ck_a["controller"] == ck_b["controller"]
    assert rows_a == rows_b


@pytest.mark.parametrize("fault, accum", [("after_step:7", 1), ("during_save:4", 1), ("after_step:10", 1),
                                          ("after_step:4", 2), ("sigterm:7", 1)])
def test_sigkill_then_resume_auto_is_bit_exact(tmp_path, fault, accum):
    """Killed mid-epoch, in the middle of a checkpoint write, at an epoch's last step, and mid-epoch with
    gradient accumulation (5 batches: windows of 2, 2 and 1). SIGTERM (a cluster's preemption) is no kill: the
    run finishes its step, writes recovery.pth.tar there (step 7, between --recovery-interval's 6 and 8) and
    exits with 143."""
    cfg = _cfg(tmp_path)
    common = ["--config", cfg, *TINY_VIT, *FAST, "--mixup", "0.2", "--drop-path", "0.1", "--model-ema",
              "--recovery-interval", "2", "--deterministic", "--output", str(tmp_path), "--grad-accum-steps",
              str(accum)]
    ref = _train([*common, "--experiment", "ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _train([*common, "--experiment", "run", "--resume", "auto"], env={"SPARSITY_FAULT": fault})
    run = tmp_path / "run"
    if fault.startswith("sigterm"):
        assert killed.returncode == 143, killed.stderr[-2000:]
        assert killed.stderr.strip().splitlines()[-1] == (
            f"error: stopped by SIGTERM at epoch 1 step 7; {run / 'recovery.pth.tar'} holds that step: continue "
            f"by running the same command with --resume auto --experiment run --output {tmp_path}")
        assert torch.load(run / "recovery.pth.tar", weights_only=True)["global_step"] == 7
    else:
        assert killed.returncode == -9, killed.stderr[-2000:]
    if fault.startswith("during_save"):
        assert list(run.glob(".recovery.pth.tar.*.tmp")), "the interrupted write left its temp file"
    resumed = _train([*common, "--experiment", "run", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "--resume auto: resuming from" in resumed.stdout
    _assert_same(_final(tmp_path / "ref"), _final(run))
    assert not list(run.glob(".*.tmp"))  # the resume removed the interrupted write's temp file


def test_a_second_train_py_on_a_busy_run_folder_is_refused(tmp_path, capsys):
    """A job launched twice, or a requeue racing the old job: a second train.py with --resume auto on the folder a
    run is writing is refused in one line naming the first's pid, and writes nothing there. The lock dies with its
    holder (SIGKILL), so the next --resume auto continues the run at once: the killed run's forked loader worker,
    which lingers for seconds, does not hold it."""
    import signal
    import time

    args = ["--config", _cfg(tmp_path, epochs=2), *TINY_VIT, *FAST, "--recovery-interval", "1", "--output",
            str(tmp_path), "--experiment", "busy", "--resume", "auto", "--workers", "1"]  # forked loader workers
    run = tmp_path / "busy"
    log = tmp_path / "first.log"
    with open(log, "w") as f:  # not a pipe: waiting for its end would wait for the loader worker too
        first = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "SPARSITY_FAULT": "pause:3"})
    try:
        deadline = time.monotonic() + 240
        while not (run / ".fault-pause-3-0").exists():  # step 3 done, recovery written: paused, holding the lock
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        assert run_cli(train.main, args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: run folder {run} is in use by another train.py (pid "
                                                   f"{first.pid} on "), err
        assert "wait for it to end or stop it, or pass another --experiment" in err[0]
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()  # the main process only
    assert run_cli(train.main, args) == 0
    out = capsys.readouterr().out
    assert f"--resume auto: resuming from {run / 'recovery.pth.tar'}" in out
    assert torch.load(run / "last.pth.tar", weights_only=True)["next_epoch"] == 2


def test_two_runs_started_at_once_get_their_own_folders(tmp_path):
    """Both found output/same free before either wrote into it; the second to claim it takes same-1 (they shared
    one folder: duplicated summary rows, one run's args.yaml beside the other's checkpoints)."""
    from types import SimpleNamespace

    from sparsity.run_files import _run_dir, claim_run_dir

    args = SimpleNamespace(output=str(tmp_path), experiment="same", resume="", model="m")
    first, second = _run_dir(args, None), _run_dir(args, None)
    assert first == second == tmp_path / "same"
    assert claim_run_dir(first, args) == tmp_path / "same"
    assert claim_run_dir(second, args) == tmp_path / "same-1"
    assert (tmp_path / "same" / "args.yaml").exists() and (tmp_path / "same-1" / "args.yaml").exists()


def test_a_crash_before_the_epoch_copies_loses_no_model_best(tmp_path, monkeypatch):
    """Killed after last.pth.tar was written but before its copy to model_best/checkpoint-<epoch>: the resumed run
    makes the copies (it took the best as already claimed, and the run ended without model_best.pth.tar)."""
    import sparsity.run_files as rf

    cfg = _cfg(tmp_path, {"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 4}]}, epochs=2)
    common = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--checkpoint-hist", "1"]
    real = rf._copy_atomic
    best_copies = []
    monkeypatch.setattr(rf, "_copy_atomic", lambda src, dst: (best_copies.append(dst.name == "model_best.pth.tar"),
                                                               real(src, dst)))
    assert run_cli(train.main, [*common, "--experiment", "ref"]) == 0
    last_best = sum(best_copies)  # the run's last model_best copy: no later epoch claims the best again

    def crash(src, dst):
        if dst.name == "model_best.pth.tar":
            crash.n += 1
            if crash.n == last_best:
                raise KeyboardInterrupt  # the process dies here, as under SIGKILL
        real(src, dst)
    crash.n = 0
    monkeypatch.setattr(rf, "_copy_atomic", crash)
    assert run_cli(train.main, [*common, "--experiment", "run", "--resume", "auto"]) != 0
    run = tmp_path / "run"
    monkeypatch.setattr(rf, "_copy_atomic", real)
    assert run_cli(train.main, [*common, "--experiment", "run", "--resume", "auto"]) == 0
    names = sorted(p.name for p in run.glob("*.pth.tar"))
    assert names == sorted(p.name for p in (tmp_path / "ref").glob("*.pth.tar"))
    for name in names:
        a = torch.load(run / name, weights_only=True)
        b = torch.load(tmp_path / "ref" / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and all(torch.equal(v, b["state_dict"][k]) for k, v in
                                                a["state_dict"].items()), name


@pytest.mark.parametrize("block, column", [
    ({"method": "gmp", "final_sparsity": 0.5, "update_interval": 2, "rules": [{"target": "ff"}]}, "rmsi_linear"),
    ({"method": "usd", "target_sparsity": 0.5, "update_interval": 2, "m": 8, "finetune_epochs": 0,
      "rules": [{"target": "ff"}]}, "rmsi_linear"),
    ({"method": "gumbel", "init": "magnitude", "rules": [{"target": "ff", "n": 2, "m": 4}]}, "mask_flip"),
], ids=["gmp", "usd", "gumbel"])
def test_mid_epoch_resume_keeps_the_metric_reference(tmp_path, block, column):
    """rmsi_* (weight change since the last epoch) and mask_flip (patterns changed since the last epoch) of the
    epoch a kill interrupted equal the uninterrupted run's: the mid-epoch checkpoint carries their reference."""
    cfg = _cfg(tmp_path, block, epochs=2)
    common = ["--config", cfg, *TINY_VIT, *FAST, "--recovery-interval", "1", "--deterministic",
              "--output", str(tmp_path)]
    assert _train([*common, "--experiment", "ref"]).returncode == 0
    killed = _train([*common, "--experiment", "run", "--resume", "auto"], env={"SPARSITY_FAULT": "after_step:7"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _train([*common, "--experiment", "run", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, run = _final(tmp_path / "ref"), _final(tmp_path / "run")
    assert float(ref[1][1][column]) > 0  # the column measures something in the interrupted epoch
    _assert_same(ref, run)


TINY_RESNET = ["--model", "resnet10t", "--model-kwargs", "channels=[8,16,32,64]", "stem_width=8"]
CONV_RECIPE = {"method": "srste", "rules": [{"target": "stem", "skip": True}, {"target": "head", "skip": True},
                                            {"target": "conv", "n": 2, "m": 4}]}


@pytest.mark.parametrize("fault, model", [("after_step:3:1", "vit"), ("sigterm:3:1", "vit"),
                                          ("after_step:2:1", "resnet")])
def test_torchrun_restart_after_a_rank_crash_ends_like_an_uninterrupted_run(tmp_path, fault, model):
    """Rank 1 dies mid-epoch; torchrun restarts both ranks, which resume from the recovery checkpoint. Each rank
    must get its own generator states back (its own crops and drop-path draws), or the runs part ways. A SIGTERM
    that only rank 1 gets stops both ranks at the same step (rank 0 learns of it with the step's flag reduction).
    A ResNet killed at its first epoch's last step, with timm's --aug-repeats sampler and --dist-bn reduce: each
    rank's BN statistics (and its EMA's) differ until the epoch's end averages them, so the recovery file must give
    every rank its own back."""
    if model == "vit":
        cfg, flags = _cfg(tmp_path, epochs=2), [*TINY_VIT, "--drop-path", "0.1"]
    else:
        cfg, flags = _cfg(tmp_path, CONV_RECIPE, epochs=2), [*TINY_RESNET, "--aug-repeats", "2", "--model-ema",
                                                             "--model-ema-decay", "0.5", "--dist-bn", "reduce"]
    common = ["--config", cfg, *flags, *FAST, "--recovery-interval", "1", "--deterministic", "--output",
              str(tmp_path)]
    env = {**os.environ, "PYTHON": sys.executable}
    ref = run_group(["bash", "distributed_train.sh", "2", *common, "--experiment", "ref"], cwd=ROOT, timeout=400,
                    env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = run_group(
        ["bash", "distributed_train.sh", "2", "--max-restarts", "1", *common, "--resume", "auto", "--experiment",
         "ddp"], cwd=ROOT, timeout=400, env={**env, "SPARSITY_FAULT": fault},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / f".fault-{fault.replace(':', '-')}").exists()  # the crash did happen
    if fault.startswith("sigterm"):  # one line per rank: both stopped after step 3
        assert proc.stderr.count("error: stopped by SIGTERM at epoch 1 step 3;") == 2, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    ck = torch.load(tmp_path / "ddp" / "last.pth.tar", weights_only=True)
    assert ck["global_step"] == 4 and ck["next_epoch"] == 2
    _assert_same(_final(tmp_path / "ref"), _final(tmp_path / "ddp"))
    if model == "resnet":  # 1437 images: 1280 a round (timm's multiple of 256), twice, split over 2 ranks
        assert ck["steps_per_epoch"] == 2
        for out in (ref.stdout, proc.stdout):
            assert "ranks identical: masks, weights and batch-norm statistics" in out


def test_ddp_mask_divergence_names_the_layer(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    proc = run_group(
        ["bash", "distributed_train.sh", "2", "--config", cfg, *TINY_VIT, *FAST, "--mask-check-interval", "1",
         "--output", str(tmp_path), "--experiment", "div"],
        cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "SPARSITY_FAULT": "diverge_mask:1:1"},
    )
    assert proc.returncode != 0
    assert "ranks diverged at blocks.0.attn.qkv.weight_mask" in proc.stderr


def test_nonfinite_loss_stops_or_skips(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    args = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path)]
    os.environ["SPARSITY_FAULT"] = "nan_loss:7"
    try:
        assert run_cli(train.main, [*args, "--experiment", "stop"]) == 1
        err = capsys.readouterr().err
        assert "non-finite loss (nan) at epoch 1 step 7" in err
        assert "last good checkpoint is " + str(tmp_path / "stop" / "last.pth.tar") in err
        assert run_cli(train.main, [*args, "--experiment", "skip", "--skip-nonfinite", "1"]) == 0
    finally:
        del os.environ["SPARSITY_FAULT"]
    ck = torch.load(tmp_path / "skip" / "last.pth.tar", weights_only=True)
    assert ck["global_step"] == 14 and ck["skipped_nonfinite"] == 1  # one of 15 steps skipped


def _folder(tmp_path, corrupt=False, empty=False):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "validation"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            if empty:
                continue
            for i in range(4):
                Image.new("RGB", (32, 32), color=(100 * c, 30 * i, 50)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "c0" / "1.png").write_bytes(b"not a png")
    return root


BAD_RECIPES = {
    "n_gt_m": ({"method": "ste", "rules": [{"target": "ff", "n": 5, "m": 4}]}, "n must be in 1..m"),
    "m_lt_1": ({"method": "ste", "rules": [{"target": "ff", "n": 1, "m": 0}]}, "m must be >= 1"),
    "typo_nested": ({"method": "mdgf", "decay": {"tpye": "exp"}}, "unknown key 'sparsity.decay.tpye'"),
    "wrong_type": ({"method": "ste", "mask_interval": "often"}, "must be an integer"),
    "no_match": ({"method": "ste", "rules": [{"target": "re:nothing", "n": 2, "m": 4}]}, "matches no layer"),
    "all_skipped": ({"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 5}]},
                    "selects 4 layer(s) but none can take its pattern (e.g. blocks.0.mlp.fc1: "),
    "strict": ({"method": "ste", "rules": [{"target": "stem", "n": 2, "m": 4, "strict": True}]},
               "patch_embed.proj cannot take 2:4 (rules[0], strict: true"),
    # sparse runs that would train dense, and blocks of the wrong type (they trained dense / raised a TypeError)
    "no_rules": ({"method": "ste"}, "method 'ste' has no rule that selects layers (no rules given)"),
    "only_skips": ({"method": "ste", "rules": [{"target": "ff", "skip": True}]}, "every rule is skip: true"),
    "dense_rules": ({"method": "dense", "rules": [{"target": "ff", "n": 2, "m": 4}]}, "would be ignored"),
    "not_a_mapping": ([1, 2], "must be a mapping (method:, rules:, ...), got [1, 2]"),
    "decay_coef": ({"method": "mdgf", "decay": {"type": "exp", "coef": -1}, "rules": [{"target": "ff", "n": 2,
                                                                                         "m": 4}]},
                   "decay_coef.yaml must be a finite number above 0, got -1.0"),
    "huge_tile": ({"method": "supermask", "rules": [{"target": "ff", "sparsity": 0.5, "tile": 1000}]},
                  "blocks.0.mlp.fc1: tile 1000 cuts the 128x32 weight into 1 tile(s), all of which sparsity 0.5 keeps"),
}


def test_resume_auto_falls_back_to_the_newest_readable_checkpoint(tmp_path, monkeypatch):
    """recovery and last damaged: the newest intact epoch checkpoint is the resume point (a new run would overwrite
    it); model_best, a copy of one of them, is taken only when nothing newer is readable."""
    from sparsity.run_files import newest_checkpoint

    for name, step in [("checkpoint-0.pth.tar", 10), ("model_best.pth.tar", 10), ("checkpoint-1.pth.tar", 20)]:
        torch.save({"global_step": step, "state_dict": {}}, tmp_path / name)
    for name in ("recovery.pth.tar", "last.pth.tar"):
        (tmp_path / name).write_bytes(b"truncated")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-1.pth.tar"
    (tmp_path / "checkpoint-1.pth.tar").unlink()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-0.pth.tar"  # ties: the epoch checkpoint
    (tmp_path / "checkpoint-0.pth.tar").unlink()
    assert newest_checkpoint(tmp_path) == tmp_path / "model_best.pth.tar"
    torch.save({"global_step": 25, "state_dict": {}}, tmp_path / "recovery.pth.tar")
    assert newest_checkpoint(tmp_path) == tmp_path / "recovery.pth.tar"
    # an intact recovery/last is the newest by construction: the older files are not read at all
    from sparsity import run_files

    read = []
    real = run_files.load_checkpoint_file
    monkeypatch.setattr(run_files, "load_checkpoint_file", lambda p: read.append(p.name) or real(p))
    path, ck = run_files.load_newest_checkpoint(tmp_path)
    assert path.name == "recovery.pth.tar" and ck["global_step"] == 25 and sorted(read) == ["last.pth.tar",
                                                                                             "recovery.pth.tar"]


def test_bad_input_table(tmp_path, capsys, caplog):
    """Every row of docs/errors.md that train.py refuses: exit code 2, one line, the run folder untouched. In
    process (run_cli is what train.py's __main__ runs; test_train_cli checks the real process's exit status and
    stderr): one process per row took two minutes of the suite."""
    out = tmp_path / "out"
    run = out / "run"
    run.mkdir(parents=True)
    (run / "last.pth.tar").write_bytes(b"an earlier run's file")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    base = [*TINY_VIT, *FAST, "--output", str(out), "--experiment", "run"]
    cases = {name: (["--config", _cfg(tmp_path, block, f"{name}.yaml")], msg)
             for name, (block, msg) in BAD_RECIPES.items()}
    cases["top_level_type"] = (["--config", _cfg(tmp_path, RECIPE, "t.yaml", batch_size="big")],
                               "'batch_size' in")
    cases["unknown_model"] = (["--model", "resnet5O"], "unknown model 'resnet5O'")
    sparse = ["--config", _cfg(tmp_path, RECIPE, "sparse.yaml")]  # a layer table to print, were the model built
    cases["unknown_opt"] = ([*sparse, "--opt", "adamx"], "unknown optimizer --opt 'adamx'; did you mean 'adamax'?")
    cases["fused_without_kernel"] = (["--opt", "lamb", "--opt-impl", "fused"],
                                     "--opt-impl fused: torch has no fused kernel for --opt lamb")
    cases["sched_typo"] = (["--config", _cfg(tmp_path, RECIPE, "s.yaml", sched="cosinee")],
                           "'sched' in " + str(tmp_path / "s.yaml") + " must be one of ['cosine', ")
    cases["missing_data"] = (["--dataset", "", "--data-dir", str(tmp_path / "nope")], "does not exist")
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:  # timm's tfds/ reader imports it on first use
        cases["reader_package_missing"] = (["--dataset", "tfds/cifar10", "--data-dir", str(tmp_path)],
                                           "dataset 'tfds/cifar10' needs a package this environment does not have "
                                           "(tensorflow); install it")
    cases["empty_data"] = (["--dataset", "", "--data-dir", str(_folder(tmp_path / "e", empty=True))],
                           "holds no images")
    trunc = tmp_path / "trunc.pth.tar"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:300])
    cases["truncated_ckpt"] = ([*sparse, "--resume", str(trunc)], "truncated or corrupt")
    other = tmp_path / "resnet.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": {}}, other)
    cases["other_arch"] = ([*sparse, "--resume", str(other)], "checkpoint of 'resnet18', not 'vit_tiny_patch16_224'")
    dense = tmp_path / "dense.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, dense)
    cases["initial_other_arch"] = ([*sparse, "--initial-checkpoint", str(dense)], "does not fit this model")
    proj = sparsity.create_model(TINY_VIT[1], recipe=sparsity.recipe_from_dict(
        {"method": "ste", "rules": [{"target": "proj", "n": 2, "m": 4}]}), img_size=32, patch_size=8,
        embed_dim=32, depth=2, num_heads=2, num_classes=10)
    torch.save({"state_dict": proj.state_dict()}, tmp_path / "proj.pth.tar")
    cases["initial_sparse_elsewhere"] = (
        ["--initial-checkpoint", str(tmp_path / "proj.pth.tar")],
        "is sparse: it holds masks for 2 layer(s) this run's recipe leaves dense (blocks.0.attn.proj, "
        "blocks.1.attn.proj); use a recipe that covers them")  # no name inside: export.py could not take it
    torch.save({"arch": TINY_VIT[1], "state_dict": proj.state_dict(), "recipe": proj.sparsity_recipe.to_dict(),
                "create_kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=10)}, tmp_path / "named.pth.tar")
    cases["initial_sparse_named"] = (
        ["--initial-checkpoint", str(tmp_path / "named.pth.tar")],
        "use a recipe that covers them, or export it densified first (export.py --checkpoint")
    torch.save({"arch": "resnet10t", "state_dict": proj.state_dict()}, tmp_path / "other_sparse.pth.tar")
    cases["initial_other_arch_sparse"] = (  # the architecture, not the masks, is what is wrong
        ["--initial-checkpoint", str(tmp_path / "other_sparse.pth.tar")],
        "is a checkpoint of 'resnet10t', not 'vit_tiny_patch16_224'")
    cases["initial_missing"] = ([*sparse, "--initial-checkpoint", str(tmp_path / "dense" / "last.pth.tar")],
                                f"initial_checkpoint {tmp_path / 'dense' / 'last.pth.tar'} does not exist: pass "
                                "--initial-checkpoint PATH, or train the model it names first")
    cases["initial_run_dir"] = (["--initial-checkpoint", str(run)], f"{run} is a run directory; pass one of its "
                                f"checkpoints, e.g. {run / 'last.pth.tar'}")
    cases["model_kwargs_values"] = ([*sparse, "--model-kwargs", "embed_dim=33"],  # merged: num_heads=2 stays
                                    "model 'vit_tiny_patch16_224' cannot be built with img_size=32, patch_size=8, "
                                    "embed_dim=33, depth=2, num_heads=2")
    cases["model_for_another_size"] = ([*sparse, "--model-kwargs", "img_size=64"],
                                       "cannot take the data's 3x32x32 inputs (AssertionError: Input height (32) "
                                       "doesn't match model (64).); build it for that size")
    cases["auto_nothing_readable"] = ([*sparse, "--resume", "auto"], f"--resume auto: no checkpoint in {run} can be "
                                      "read (last.pth.tar); a new run there would overwrite them")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases["unwritable_output"] = (["--output", str(blocker / "sub")], "is not writable")
    for name, (extra, msg) in cases.items():
        with caplog.at_level("INFO", logger="sparsity"):  # the layer table, as the CLI prints it
            code = run_cli(train.main, [*base, *extra])
        stdout, stderr = capsys.readouterr()
        lines = stderr.strip().splitlines()
        assert code == 2, (name, stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (name, stderr)
        if name in ("initial_missing", "other_arch", "truncated_ckpt", "unknown_opt"):  # refused before building
            assert "sparsify_" not in stdout, (name, stdout)  # the model: no layer table above the error
        if name == "initial_other_arch":  # the control: a mismatch needs the model, so its table is printed
            assert "sparsify_" in stdout, stdout
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before, name
        assert sorted(os.listdir(out)) == ["run"], name


def test_corrupt_image_fail_or_skip(tmp_path):
    data = _folder(tmp_path, corrupt=True)
    cfg = _cfg(tmp_path, {"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 4}]}, epochs=1)
    base = ["--config", cfg, *TINY_VIT, *FAST, "-b", "2", "--dataset", "", "--data-dir", str(data), "--img-size",
            "32", "--output", str(tmp_path / "o")]
    proc = _train([*base, "--experiment", "fail"])
    assert proc.returncode == 2 and "unreadable image" in proc.stderr and "1.png" in proc.stderr
    assert "--on-bad-image skip" in proc.stderr and "Traceback" not in proc.stderr
    assert "cannot identify image file" in proc.stderr and "Skipped sample" not in proc.stderr  # PIL's own reason
    assert not (tmp_path / "o" / "fail").exists()  # nothing written but args.yaml: the retry gets the name again
    proc = _train([*base, "--experiment", "skip", "--on-bad-image", "skip"])
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "skipping unreadable image" in proc.stdout + proc.stderr


def test_image_folder_without_splits_warns_that_it_evaluates_on_training_images(tmp_path, capsys):
    data = _folder(tmp_path)
    cfg = _cfg(tmp_path, epochs=1)
    base = ["--config", cfg, *TINY_VIT, *FAST, "-b", "2", "--dataset", "", "--img-size", "32", "--output",
            str(tmp_path / "o")]
    assert run_cli(train.main, [*base, "--data-dir", str(data / "train"), "--experiment", "flat"]) == 0
    assert "it has no split folders (train/ and validation/ or val/), so every epoch is evaluated on the " \
           "training images themselves" in capsys.readouterr().out
    assert run_cli(train.main, [*base, "--data-dir", str(data), "--experiment", "split"]) == 0
    assert "no split folders" not in capsys.readouterr().out


def test_unreadable_validation_image_keeps_the_epochs_training(tmp_path, capsys):
    """The validation set is first read after an epoch's training: a bad image there used to end the run with the
    epoch lost (no checkpoint yet). Now recovery.pth.tar keeps every step of it, and after the fix --resume auto
    runs the evaluation and goes on, ending exactly where an uninterrupted run ends."""
    data = _folder(tmp_path)
    image = data / "validation" / "c1" / "2.png"
    good = image.read_bytes()
    cfg = _cfg(tmp_path, {"method": "mdgf", "rules": [{"target": "ff", "n": 2, "m": 4}]}, epochs=2)
    base = ["--config", cfg, *TINY_VIT, *FAST, "-b", "2", "--dataset", "", "--data-dir", str(data), "--img-size",
            "32", "--output", str(tmp_path / "o"), "--model-ema", "--model-ema-decay", "0.5"]
    assert run_cli(train.main, [*base, "--experiment", "ref"]) == 0
    image.write_bytes(b"not a png")
    capsys.readouterr()
    assert run_cli(train.main, [*base, "--experiment", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / "o" / "run"
    assert len(err) == 1 and "unreadable image" in err[0] and "2.png" in err[0], err
    assert f"Epoch 0's training is kept in {run / 'recovery.pth.tar'}" in err[0]
    assert "after the fix, continue by running the same command with --resume auto --experiment run" in err[0]
    recovery = torch.load(run / "recovery.pth.tar", weights_only=True)
    assert recovery["global_step"] == 4 and recovery["next_epoch"] == 0 and recovery["skip_batches"] == 4
    image.write_bytes(good)
    assert run_cli(train.main, [*base, "--experiment", "run", "--resume", "auto"]) == 0
    ref, got = (torch.load(tmp_path / "o" / d / "last.pth.tar", weights_only=True) for d in ("ref", "run"))
    assert got["global_step"] == 8 and got["controller"] == ref["controller"]
    for key in ("state_dict", "state_dict_ema"):
        for k, v in ref[key].items():
            assert torch.equal(v, got[key][k]), (key, k)
    with open(tmp_path / "o" / "ref" / "summary.csv") as f1, open(run / "summary.csv") as f2:
        assert list(csv.DictReader(f1)) == list(csv.DictReader(f2))  # epoch 0's row too, train loss included


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import sparsity.checkpoint as ckmod

    cfg = _cfg(tmp_path)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # epoch 0 is saved, epoch 1 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckmod.torch, "save", flaky_save)
    rc = run_cli(train.main, ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "full",
                              "--checkpoint-hist", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "intact" in err
    ck = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    assert ck["next_epoch"] == 1  # epoch 0's checkpoint survived
    assert not list((tmp_path / "full").glob(".*.tmp"))


@pytest.mark.parametrize("target", ["append_summary", "write_report", "plots"])
def test_disk_full_on_the_run_tables_is_one_message(tmp_path, monkeypatch, capsys, target):
    """summary.csv, the report files and the plots hit a full disk: exit 2 with one line (they ended in a
    traceback); the checkpoints written so far are intact and --resume auto finishes the run."""
    import sparsity.trainer as trainer_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    real = getattr(trainer_mod, target)
    monkeypatch.setattr(trainer_mod, target, full)
    args = ["--config", _cfg(tmp_path, epochs=1), *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "r"]
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume auto" in err[0]
    if target != "append_summary":  # the epoch's row is written before its checkpoint
        assert torch.load(tmp_path / "r" / "last.pth.tar", weights_only=True)["next_epoch"] == 1
    monkeypatch.setattr(trainer_mod, target, real)
    assert run_cli(train.main, [*args, "--resume", "auto"]) == 0
    assert (tmp_path / "r" / "results.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["-b", "0"], "-b must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be 0 or more"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--log-interval", "0"], "--log-interval must be at least 1"),
    (["--num-classes", "3"], "--num-classes 3 is fewer than the 10 classes"),
    (["--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
    (["--sched", "step", "--decay-epochs", "0"], "--decay-epochs must be above 0"),
    (["--sched", "plateau", "--sched-on-updates"], "timm cannot build the lr schedule --sched plateau"),
    (["--ratio", "0", "0"], "--ratio must be 0 < min <= max"),
    (["--std", "0", "0", "0"], "--std values must be above 0"),
    (["--mean", "0.5", "0.5"], "--mean takes 1 or 3 values"),
    (["--aa", "bogus"], "timm cannot build the training transform"),
    (["--interpolation", "bogus"], "--interpolation must be one of"),
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    (["--opt-betas", "0.9"], "--opt-betas takes 2 values"),
    (["-j", "-1"], "-j/--workers must be 0 or more"),
    (["--model-ema-decay", "5"], "--model-ema-decay must be in [0, 1]"),
    (["--warmup-epochs", "-2"], "--warmup-epochs must be 0 or more"),
    (["--device", "tpu"], "--device tpu: not a device torch knows"),
    (["--torchcompile", "bogus"], "--torchcompile bogus: not a torch.compile backend"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be at least 1, got 0"),
    (["--grayscale-prob", "1.5"], "--grayscale-prob is a probability: it must be in [0, 1], got 1.5"),
    (["--hflip", "-0.1"], "--hflip is a probability"),
    (["--clip-grad", "0"], "--clip-grad must be above 0 (--clip-grad none, or leaving it out, for no clipping)"),
    (["--layer-decay", "1.5"], "--layer-decay must be in (0, 1]"),
    (["--clip-mode", "agc", "--clip-grad", "-1"], "--clip-grad must be above 0"),
    (["--lr-noise", "0.9", "0.5"], "--lr-noise takes one or two increasing fractions of the schedule in [0, 1]"),
    (["--lr-cycle-limit", "0"], "--lr-cycle-limit must be at least 1"),
    (["--layer-decay-min-scale", "0.5"], "act on --layer-decay's scales; add --layer-decay or drop them"),
    (["--aug-repeats", "0.5"], "--aug-repeats must be 0 (off) or at least 1"),
    (["--aug-repeats", "3"], "--aug-repeats 3 needs several processes (torchrun, distributed_train.sh)"),
    (["--bce-sum"], "--bce-target-thresh, --bce-sum and --bce-pos-weight shape the BCE loss; add --bce-loss"),
    (["--torchcompile-mode", "max-autotune"], "--torchcompile-mode max-autotune is inductor's: use it with "
                                              "--torchcompile"),
    (["--drop-block", "1.5"], "--drop-block must be in [0, 1)"),
    (["--opt-kwargs", "bogus=1"], "--opt-kwargs bogus=1: --opt adamw refuses them"),
    (["--opt-kwargs", "betas=[0.9,2.0]"], "--opt-kwargs betas=[0.9, 2.0]: --opt adamw refuses them"),
    # the command line itself: one line instead of argparse's whole usage, with what to do instead
    (["--jsd-loss"], "--jsd-loss is a timm train.py flag not taken here: AugMix's split-batch JSD loss is not"),
    (["--start-epoch", "3"], "--start-epoch is a timm train.py flag not taken here: the epoch to start at comes "
                             "from the checkpoint: use --resume"),
    (["--grad-acum-steps", "2"], "unrecognized arguments: --grad-acum-steps 2; did you mean '--grad-accum-steps'?"),
    (["--sched", "cosinee"], "argument --sched: invalid choice: 'cosinee'"),
    (["--cutmix-minmax", "0.8", "0.2"], "--cutmix-minmax takes MIN MAX with 0 < MIN < MAX <= 1"),
    (["--cutmix-minmax", "0.5", "0.5"], "--cutmix-minmax takes MIN MAX with 0 < MIN < MAX <= 1"),
    (["--cutmix-minmax", "0.30", "0.31"], "--cutmix-minmax 0.3 0.31 gives boxes of 9 to 9 pixels at 32x32 inputs"),
])
def test_nonsense_values_are_one_message(tmp_path, capsys, flags, message):
    """Values timm or torch refused mid-run in a traceback (or accepted: a negative warm-up, an EMA decay of 5)."""
    args = ["--config", _cfg(tmp_path, epochs=1), *TINY_VIT, *FAST, "--output", str(tmp_path / "out"), *flags]
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_run_folder_that_is_a_file_and_resume_with_another_optimizer(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    base = ["--config", _cfg(tmp_path, epochs=2), *TINY_VIT, *FAST, "--output", str(tmp_path)]
    assert run_cli(train.main, [*base, "--experiment", "taken"]) == 2
    assert "taken is a file, not a run folder" in capsys.readouterr().err
    assert run_cli(train.main, [*base, "--experiment", "r", "--checkpoint-hist", "2"]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "r" / "checkpoint-0.pth.tar")
    assert run_cli(train.main, [*base, "--experiment", "r", "--resume", ckpt, "--opt", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "was trained with --opt adamw, not sgd" in err and "--no-resume-opt" in err


def test_recipe_files_with_null_values_repeated_keys_or_other_encodings(tmp_path, capsys):
    """A null training key (it reached the run as None: a traceback), a key given twice (PyYAML kept the last one
    without a word), a file that is not UTF-8 (UnicodeDecodeError) and a base: naming a directory."""
    cases = {"null.yaml": (b"epochs: null\n", "'epochs' in"), "twice.yaml": (
        b"sparsity:\n  method: ste\n  method: mdgf\n", "key 'method' appears twice in one mapping (line 3)"),
        "latin1.yaml": (b"epochs: 1\n# caf\xe9\n", "is not UTF-8 text"),
        "dirbase.yaml": (b"base: .\n", "is a directory, not a recipe file")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_bytes(text)
        assert run_cli(train.main, ["--config", str(tmp_path / name), "--print-config"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
    # YAML merge keys still work: an explicit key may override a merged one
    (tmp_path / "merge.yaml").write_text("x: &opt {lr: 0.5, epochs: 3}\nsparsity:\n  <<: {method: ste}\n"
                                         "  rules: [{target: ff, n: 2, m: 4}]\n")
    from sparsity.recipe import load_yaml

    assert load_yaml(tmp_path / "merge.yaml")["sparsity"]["method"] == "ste"


def test_flipped_bytes_inside_a_checkpoint_are_caught(tmp_path):
    """torch.load does not check the zip's CRC32: zeroed bytes inside a tensor loaded as weights (validate exit 0).
    They are now refused like a truncated file, and --resume auto passes over such a file."""
    from sparsity.checkpoint import CheckpointError, load_checkpoint_file
    from sparsity.run_files import newest_checkpoint

    torch.save({"global_step": 5, "state_dict": {"w": torch.randn(100_000)}}, tmp_path / "checkpoint-0.pth.tar")
    torch.save({"global_step": 9, "state_dict": {"w": torch.randn(100_000)}}, tmp_path / "last.pth.tar")
    data = bytearray((tmp_path / "last.pth.tar").read_bytes())
    data[200_000:200_008] = bytes(8)
    (tmp_path / "last.pth.tar").write_bytes(data)
    with pytest.raises(CheckpointError, match="is corrupt \\(its stored checksum does not match"):
        load_checkpoint_file(tmp_path / "last.pth.tar")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-0.pth.tar"


def test_checkpoints_with_damaged_fields_or_a_name_only(tmp_path, capsys):
    """Fields of the wrong type (an int arch, a string recipe) are one message, not a traceback; a file with a
    model name and weights but no record of how the model was built takes --num-classes like a bare state dict."""
    import timm

    import validate

    model = timm.create_model("resnet10t", num_classes=10)
    for key, value in (("arch", 7), ("recipe", "ste"), ("create_kwargs", [1])):
        ck = {"arch": "resnet10t", "state_dict": model.state_dict(), key: value}
        torch.save(ck, tmp_path / "bad.pth.tar")
        assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "bad.pth.tar")]) == 2
        err = capsys.readouterr().err
        assert f"its '{key}' is a" in err and "damaged or not a train.py checkpoint" in err, err
    torch.save({"arch": "resnet10t", "state_dict": model.state_dict()}, tmp_path / "named.pth.tar")
    assert run_cli(validate.main, ["--checkpoint", str(tmp_path / "named.pth.tar"), "--num-classes", "10",
                                   "--dataset", "digits"]) == 0


def test_a_refused_run_leaves_its_folder_free_for_the_retry(tmp_path, capsys):
    """A refusal once the model is built (a usd scheme naming no layer of this model) leaves the run folder empty:
    the retry takes the same name (a claim made before the refusal sent it to NAME-1). And three --opt-betas
    values (adan) are not refused."""
    scheme = tmp_path / "scheme.yaml"
    scheme.write_text("layers:\n  foo: {n: 4, m: 16}\n")
    cfg = _cfg(tmp_path, {"method": "usd", "scheme": str(scheme), "rules": [{"target": "ff"}]}, epochs=1)
    args = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path / "out"), "--experiment", "x"]
    assert run_cli(train.main, args) == 2
    assert "not in the scheme" in capsys.readouterr().err
    assert not any((tmp_path / "out" / "x").iterdir())
    assert run_cli(train.main, [*args, "--opt", "adan", "--opt-betas", "0.98", "0.92", "0.99",
                                "--print-config"]) == 0


def test_pickled_code_checkpoint_is_refused(tmp_path):
    import argparse
    import fractions

    from sparsity.checkpoint import CheckpointError, load_checkpoint_file

    p = tmp_path / "code.pth"
    torch.save({"args": fractions.Fraction(1, 3)}, p)  # any class outside torch's allowlist
    with pytest.raises(CheckpointError, match="needs arbitrary pickled code"):
        load_checkpoint_file(p)
    torch.save({"args": argparse.Namespace(lr=0.1)}, p)  # timm's train.py stores its argparse namespace: allowed
    assert load_checkpoint_file(p)["args"] == {"lr": 0.1}


def test_sigterm_to_the_process_group_stops_gracefully_with_loader_workers(tmp_path):
    """A job scheduler signals every process of the job: the DataLoader workers too. They keep serving the step in
    flight; the run writes recovery.pth.tar at that step and exits 143, and --resume auto continues from it."""
    import signal

    cfg = _cfg(tmp_path, epochs=200)
    args = [sys.executable, "train.py", "--config", cfg, *TINY_VIT, *FAST, "-j", "2", "--output", str(tmp_path),
            "--experiment", "run"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:  # the first epoch's summary: training is under way, workers included
            if line.startswith("epoch 0 done"):
                break
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received: stopping after the current step with a recovery checkpoint" in out
    assert out.count("SIGTERM received") == 1  # the workers said nothing
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM at epoch ") and "--resume auto --experiment run" in last, err
    step = torch.load(tmp_path / "run" / "recovery.pth.tar", weights_only=True)["global_step"]
    assert 5 <= step < 1000
    resumed = _train(["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "run",
                      "--resume", "auto", "--epochs", "200"], env={"SPARSITY_FAULT": f"sigterm:{step + 2}"})
    assert resumed.returncode == 143 and f"resuming from {tmp_path / 'run' / 'recovery.pth.tar'}" in resumed.stdout
    assert torch.load(tmp_path / "run" / "recovery.pth.tar", weights_only=True)["global_step"] == step + 2


def test_a_dataset_with_set_epoch_hears_every_epoch_also_after_a_resume(tmp_path, monkeypatch):
    """timm's iterable readers (wds/, tfds/, hfids/) reshuffle their shards in ``set_epoch``: train.py calls it at
    the start of every epoch, as timm's does, a resumed run included (with the epoch it resumes at)."""
    import sparsity.trainer as trainer
    from sparsity.data import DigitsDataset

    heard = []

    class Epochs(DigitsDataset):
        def set_epoch(self, epoch):
            heard.append(("train", epoch))

    real = trainer.build_dataset
    monkeypatch.setattr(trainer, "build_dataset", lambda name, *a, **k: Epochs(
        "train", img_size=32) if a[2] else real(name, *a, **k))
    cfg = _cfg(tmp_path, {"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 4}]}, epochs=3)
    common = ["--config", cfg, *TINY_VIT, *FAST, "--output", str(tmp_path), "--experiment", "e"]
    monkeypatch.setenv("SPARSITY_FAULT", "sigterm:7")  # 5 steps an epoch: stopped inside epoch 1
    assert run_cli(train.main, common) != 0
    assert heard == [("train", 0), ("train", 1)]
    heard.clear()
    monkeypatch.delenv("SPARSITY_FAULT")
    assert run_cli(train.main, [*common, "--resume", "auto"]) == 0
    assert heard == [("train", 1), ("train", 2)]  # the resumed epoch hears its number again


class _IterableReader:
    """What the trainer meets in timm's iterable readers (wds/, tfds/): a pipeline built lazily on first
    iteration and kept with its sample-shuffle RNG, ``set_epoch``, and a length counted per DataLoader worker
    (``set_loader_cfg(num_workers=0)`` made it 0)."""

    def __init__(self, n: int) -> None:
        from PIL import Image

        self.images = [Image.new("RGB", (32, 32), color=(200 * (i % 2), 6 * i, 60)) for i in range(n)]
        self.num_workers, self.epoch, self.ds = 1, 0, None

    def set_epoch(self, count: int) -> None:
        self.epoch = count

    def set_loader_cfg(self, num_workers=None) -> None:
        if self.ds is None and num_workers is not None:
            self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.images) // max(self.num_workers, 1) * self.num_workers

    def __iter__(self):
        import random

        if self.ds is None:
            self.ds = random.Random(0)  # lives as long as the pipeline: across epochs in a process that keeps it
        order = list(range(len(self.images)))
        random.Random(self.epoch).shuffle(order)  # the shard shuffle, by epoch
        self.ds.shuffle(order)  # the sample shuffle
        for i in order:
            yield self.images[i], i % 2


def test_iterable_dataset_without_workers_trains_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """timm's iterable data sets read in the main process (--workers 0): their length was 0 (the run stopped with
    "0 images"), and their lazily built pipeline kept its shuffle RNG across epochs, so a mid-epoch resume (which
    builds it anew) replayed another order. Each epoch now starts the reader afresh, as a new worker would."""
    from timm.data import IterableImageDataset

    import sparsity.trainer as trainer_mod

    def fake(name, data_dir, split, is_training, *a, **k):
        return IterableImageDataset("", reader=_IterableReader(40 if is_training else 16))

    monkeypatch.setattr(trainer_mod, "build_dataset", fake)
    cfg = _cfg(tmp_path, {"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 4}]}, epochs=2)
    base = ["--config", cfg, *TINY_VIT, *FAST, "-b", "8", "--num-classes", "2", "--output", str(tmp_path)]
    assert run_cli(train.main, [*base, "--experiment", "full"]) == 0
    monkeypatch.setenv("SPARSITY_FAULT", "sigterm:7")  # epoch 1 (5 steps per epoch), mid-epoch
    assert run_cli(train.main, [*base, "--experiment", "cut"]) == 143
    monkeypatch.delenv("SPARSITY_FAULT")
    assert run_cli(train.main, [*base, "--experiment", "cut", "--resume", "auto"]) == 0
    a, b = (torch.load(tmp_path / d / "last.pth.tar", weights_only=True) for d in ("full", "cut"))
    assert a["global_step"] == b["global_step"] == 10
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    with open(tmp_path / "full" / "summary.csv") as f1, open(tmp_path / "cut" / "summary.csv") as f2:
        assert list(csv.DictReader(f1)) == list(csv.DictReader(f2))
