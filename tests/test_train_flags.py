"""timm train.py flags beyond the basics: --grad-accum-steps, --clip-mode, --layer-decay, --opt-kwargs,
--model-ema-warmup, --pretrained/--pretrained-path. The accumulation math is checked on small tensors against
one large batch; the flags end to end through train.py on the digits data."""

import csv

import pytest
import timm
import torch
import yaml
from torch import nn

import sparsity
import train
from cli_common import run_cli
from sparsity.engine import TrainState, train_one_epoch
from sparsity.layers import current_loss_divisor, current_loss_scale, loss_scale

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32",
            "depth=2", "num_heads=2"]
VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
FAST = ["--dataset", "digits", "-b", "256", "--workers", "0", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs",
        "0", "--hflip", "0", "--scale", "0.8", "1.0", "--log-interval", "100", "--epochs", "1"]


def _net(method: str, lam: float = 0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    block = {"method": method, "rules": [{"target": "linear", "n": 2, "m": 4}]}
    if method == "srste":
        block["srste_lambda"] = lam
    recipe = sparsity.recipe_from_dict(block)
    sparsity.sparsify_(model, recipe)
    return model, sparsity.SparsityController(model, recipe, total_steps=100)


def _train(method: str, batches, accum: int) -> tuple[nn.Module, TrainState]:
    model, ctl = _net(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = TrainState()
    train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(), state, controller=ctl, accum_steps=accum,
                    log_interval=1000)
    return model, state


def _data(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 16, generator=g), torch.randint(0, 8, (n,), generator=g)) for n in sizes]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a.state_dict().values(),
                                                                         b.state_dict().values()))


@pytest.mark.parametrize("method", ["ste", "srste"])
def test_accumulated_batches_step_like_one_large_batch(method):
    """Two batches of 4 accumulated are one step on the batch of 8 (mean losses of equal halves average to the
    whole's); SR-STE's decay term lambda * W * (1 - E) enters that step once, not once per batch."""
    b1, b2 = _data([4, 4])
    whole = [(torch.cat([b1[0], b2[0]]), torch.cat([b1[1], b2[1]]))]
    acc, st = _train(method, [b1, b2], accum=2)
    big, _ = _train(method, whole, accum=1)
    assert st.global_step == 1
    assert _max_diff(acc, big) < 1e-6
    if method == "srste":  # the decay term is large here: counted twice, the weights would differ by ~0.1
        plain, _ = _train("ste", whole, accum=1)
        assert _max_diff(big, plain) > 0.05


def test_the_epochs_last_shorter_window_is_averaged_over_its_own_size():
    """Three batches with --grad-accum-steps 2: two optimizer steps, the second on the third batch alone at full
    weight (timm divides the last window's losses by its own size)."""
    b1, b2, b3 = _data([4, 4, 4])
    acc, st = _train("srste", [b1, b2, b3], accum=2)
    ref, st_ref = _train("srste", [(torch.cat([b1[0], b2[0]]), torch.cat([b1[1], b2[1]])), b3], accum=1)
    assert st.global_step == st_ref.global_step == 2
    assert _max_diff(acc, ref) < 1e-6


def test_loss_scale_divides_the_methods_terms():
    like = torch.zeros(3)
    assert current_loss_scale(like) is None and current_loss_divisor() == 1
    with loss_scale(None, divisor=4):
        assert current_loss_scale(like) is None and current_loss_divisor() == 4
    with loss_scale(torch.tensor(1024.0), divisor=2):
        assert float(current_loss_scale(like)) == 1024.0 and current_loss_divisor() == 2
    assert current_loss_divisor() == 1
    with pytest.raises(ValueError, match="divisor must be at least 1"):
        with loss_scale(None, divisor=0):
            pass


def _rows(run):
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_grad_accum_steps_end_to_end(tmp_path, capsys):
    """1437 digits / 256 = 5 batches: with --grad-accum-steps 2, 3 optimizer steps per epoch, and the lr from
    --lr-base counts the accumulated batch (as timm's train.py)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sparsity": {"method": "srste", "rules": [{"target": "ff", "n": 2, "m": 4}]}}))
    args = ["--config", str(recipe), *TINY_VIT, *FAST, "--output", str(tmp_path), "--grad-accum-steps", "2"]
    assert run_cli(train.main, [*args, "--experiment", "acc", "--epochs", "2"]) == 0
    assert [int(r["step"]) for r in _rows(tmp_path / "acc")] == [3, 6]
    ck = torch.load(tmp_path / "acc" / "last.pth.tar", weights_only=True)
    assert ck["steps_per_epoch"] == 3 and ck["args"]["grad_accum_steps"] == 2
    capsys.readouterr()
    # another accumulation changes the steps per epoch: the resume is refused, naming the flag
    assert run_cli(train.main, [*args[:-1], "1", "--experiment", "acc", "--resume", "auto", "--epochs", "2"]) == 2
    assert "another -b, --grad-accum-steps or number of processes" in capsys.readouterr().err
    assert run_cli(train.main, ["--opt", "sgd", "-b", "64", "--grad-accum-steps", "4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == pytest.approx(0.1)  # 0.1 x 64 x 4 / 256


def test_layer_decay_groups_and_the_mean_lr_column(tmp_path, capsys):
    """--layer-decay: timm's layer-wise groups (lr_scale per depth, the scores of supermask sharing their layer's
    scale, no weight decay on them), and summary.csv's lr is the mean over the groups, as timm writes it."""
    model = timm.create_model("vit_tiny_patch16_224", **VIT_KW, num_classes=10)
    recipe = sparsity.recipe_from_dict({"method": "supermask", "rules": [{"target": "ff", "sparsity": 0.5,
                                                                           "tile": 8}]})
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    groups = ctl.param_groups(0.05, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 2 blocks: embeddings at depth 0, block i at i + 1, head (and final norm) at the top: 0.5 ** (3 - depth)
    assert scale[id(named["pos_embed"])] == (0.125, 0.0)
    assert scale[id(named["blocks.0.mlp.fc1.weight"])] == (0.25, 0.05)
    score = next(n for n in named if n.startswith("blocks.1.mlp.fc1.") and n != "blocks.1.mlp.fc1.weight"
                 and not n.endswith("bias"))
    assert scale[id(named[score])] == (0.5, 0.0)
    assert scale[id(named["head.weight"])] == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(named)

    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": {"method": "dense"}}))
    args = ["--config", str(cfg), *TINY_VIT, *FAST, "--output", str(tmp_path)]
    for sched in ("none", "cosine"):  # a constant lr takes the scales too (timm's schedulers apply them)
        assert run_cli(train.main, [*args, "--sched", sched, "--experiment", sched, "--layer-decay", "0.5"]) == 0
        groups = torch.load(tmp_path / sched / "last.pth.tar", weights_only=True)["optimizer"]["param_groups"]
        scales = [g["lr_scale"] for g in groups]
        assert len(groups) == 8 and min(scales) == 0.125 and max(scales) == 1.0
        if sched == "none":
            assert [g["lr"] for g in groups] == pytest.approx([1e-3 * x for x in scales])
        # epoch 0's lr (cosine's is the base lr then): the mean over the groups, as timm writes it
        assert float(_rows(tmp_path / sched)[0]["lr"]) == pytest.approx(1e-3 * sum(scales) / len(scales))
    assert "conforms    n/a: no layer is selected (a dense run)" in capsys.readouterr().out


def test_clip_mode_opt_kwargs_and_ema_warmup_reach_the_run(tmp_path, monkeypatch):
    """--clip-mode goes to timm's dispatch_clip_grad (agc without the classifier's two tensors), --opt-kwargs to
    the optimizer, --model-ema-warmup to timm's ModelEmaV3."""
    import timm.utils

    seen = []
    real = timm.utils.dispatch_clip_grad

    def spy(params, value, mode="norm", **kw):
        params = list(params)
        seen.append((len(params), value, mode))
        return real(params, value, mode=mode, **kw)

    monkeypatch.setattr(timm.utils, "dispatch_clip_grad", spy)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": {"method": "dense"}}))
    args = ["--config", str(cfg), *TINY_VIT, *FAST, "--output", str(tmp_path), "--clip-grad", "0.02", "--clip-mode",
            "agc", "--opt-kwargs", "amsgrad=True", "--model-ema", "--model-ema-warmup", "--experiment", "c"]
    assert run_cli(train.main, args) == 0
    n_params = len(list(timm.create_model("vit_tiny_patch16_224", **VIT_KW, num_classes=10).parameters()))
    assert seen and set(seen) == {(n_params - 2, 0.02, "agc")}
    ck = torch.load(tmp_path / "c" / "last.pth.tar", weights_only=True)
    assert all(g["amsgrad"] for g in ck["optimizer"]["param_groups"])
    assert any("max_exp_avg_sq" in s for s in ck["optimizer"]["state"].values())
    assert ck["args"]["model_ema_warmup"] is True


def test_ema_warmup_decay_ramps_up():
    """timm's warm-up: the EMA copies the model at first and reaches --model-ema-decay only later."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(nn.Linear(2, 2), decay=0.9998, use_warmup=True)
    assert ema.get_decay(1) == 0.0 and 0.5 < ema.get_decay(10) < 0.9 and ema.get_decay(10 ** 9) == 0.9998


def test_pretrained_path_loads_the_file_through_timm(tmp_path, capsys, caplog):
    """--pretrained-path: a 1000-class file for a 10-class run keeps every tensor but the classifier (timm's
    adaptation); a file of the run's own class count keeps that too; --lr 0 leaves the weights as loaded."""
    torch.manual_seed(5)
    imagenet = timm.create_model("vit_tiny_patch16_224", **VIT_KW)
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "in1k.pth.tar")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": {"method": "dense"}}))
    args = ["--config", str(cfg), *TINY_VIT, *FAST, "--lr", "0", "--output", str(tmp_path), "--sched", "none"]
    with caplog.at_level("INFO", logger="sparsity.factory"):  # the CLI's handler prints it to stdout
        assert run_cli(train.main, [*args, "--pretrained-path", str(tmp_path / "in1k.pth.tar"), "--experiment",
                                    "p"]) == 0
    assert f"pretrained weights: {tmp_path / 'in1k.pth.tar'}" in capsys.readouterr().out
    sd = torch.load(tmp_path / "p" / "last.pth.tar", weights_only=True)["state_dict"]
    assert torch.equal(sd["pos_embed"], imagenet.pos_embed.detach())
    assert torch.equal(sd["blocks.1.mlp.fc2.weight"], imagenet.blocks[1].mlp.fc2.weight.detach())
    assert sd["head.weight"].shape == (10, 32)
    torch.manual_seed(6)
    own = timm.create_model("vit_tiny_patch16_224", **VIT_KW, num_classes=10)
    torch.save(own.state_dict(), tmp_path / "own.pth")
    assert run_cli(train.main, [*args, "--pretrained", "--pretrained-path", str(tmp_path / "own.pth"),
                                "--experiment", "q"]) == 0
    sd = torch.load(tmp_path / "q" / "last.pth.tar", weights_only=True)["state_dict"]
    assert torch.equal(sd["head.weight"], own.head.weight.detach())
    # weights for 64 px inputs: --pretrained-path resamples the position embedding (timm's adaptation), and
    # --initial-checkpoint, which loads as is, says to use it
    big = timm.create_model("vit_tiny_patch16_224", **{**VIT_KW, "img_size": 64}, num_classes=10)
    torch.save(big.state_dict(), tmp_path / "big.pth")
    assert run_cli(train.main, [*args, "--pretrained-path", str(tmp_path / "big.pth"), "--experiment", "r"]) == 0
    sd = torch.load(tmp_path / "r" / "last.pth.tar", weights_only=True)["state_dict"]
    assert sd["pos_embed"].shape == (1, 17, 32) and torch.equal(sd["head.weight"], big.head.weight.detach())
    capsys.readouterr()
    assert run_cli(train.main, [*args, "--initial-checkpoint", str(tmp_path / "big.pth"), "--experiment", "s"]) == 2
    assert "(weights for another input size? build the model for theirs (--model-kwargs img_size=...), or, to " \
        "train at this size, pass the file to train.py as --pretrained-path" in capsys.readouterr().err


def test_pretrained_failures_are_one_message(tmp_path, capsys, monkeypatch):
    """No network (the download fails), a file of another model, a model timm has no weights for: one line each,
    nothing written."""
    import timm.models._builder as builder

    import sparsity.factory as factory

    def offline(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    monkeypatch.setattr(factory, "_hub_unreachable", lambda: None)  # the hub resolves; the download fails
    out = tmp_path / "out"
    base = [*TINY_VIT, *FAST, "--output", str(out)]
    assert run_cli(train.main, [*base, "--pretrained"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not load timm's pretrained weights into 'vit_tiny_patch16_224' (ConnectionError" \
        in err[0] and "pass --pretrained-path FILE" in err[0], err
    monkeypatch.undo()
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    assert run_cli(train.main, [*base, "--pretrained-path", str(tmp_path / "r18.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--pretrained-path {tmp_path / 'r18.pth'} does not fit 'vit_tiny_patch16_224': 30 of " \
        "its tensors are not in the file (cls_token, pos_embed, " in err[0], err
    monkeypatch.setattr(timm.models, "is_model_pretrained", lambda name: False)
    assert run_cli(train.main, [*base, "--pretrained"]) == 2
    assert "timm has no pretrained weights for 'vit_tiny_patch16_224'" in capsys.readouterr().err
    assert not out.exists()


def test_pretrained_without_network_reads_the_hub_cache_and_fails_fast_otherwise(tmp_path, capsys, monkeypatch):
    """The hub's host name does not resolve: no request is made (huggingface_hub's retries took about 50 s before
    failing); weights in the Hugging Face cache load, missing ones are one message naming the hub id."""
    import socket

    from huggingface_hub import constants
    from safetensors.torch import save_file

    import sparsity.factory as factory

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for var in factory._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    args = ["--model", "resnet10t", "--pretrained", *FAST, "--output", str(out)]
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Hugging Face Hub is out of reach (huggingface.co does not resolve" in err[0] \
        and "(timm/resnet10t.c3_in1k) are not in its local cache" in err[0], err
    assert not out.exists() and constants.HF_HUB_OFFLINE is False  # offline only for the attempt
    torch.manual_seed(3)
    ref = timm.create_model("resnet10t")
    repo, rev = tmp_path / "hub" / "models--timm--resnet10t.c3_in1k", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, repo / "snapshots" / rev / "model.safetensors")
    model = factory._create_pretrained("resnet10t", None, {})
    assert torch.equal(model.conv1[0].weight, ref.conv1[0].weight) and torch.equal(model.fc.bias, ref.fc.bias)


CKPT_RECIPES = {
    "ste": {"method": "ste", "rules": [{"target": "ff", "n": 2, "m": 4}]},
    "srste": {"method": "srste", "rules": [{"target": ["ff", "q", "k", "v"], "n": 2, "m": 4}]},
    "mdgf": {"method": "mdgf", "decay": {"type": "exp", "coef": 0.5}, "rules": [{"target": "ff", "n": 1, "m": 4}]},
    "supermask": {"method": "supermask", "rules": [{"target": "ff", "sparsity": 0.5, "tile": 8}]},
    "gumbel": {"method": "gumbel", "rules": [{"target": "ff", "n": 2, "m": 4}]},
    "gmp": {"method": "gmp", "final_sparsity": 0.5, "update_interval": 1, "rules": [{"target": "ff"}]},
    "usd": {"method": "usd", "m": 4, "target_sparsity": 0.5, "update_interval": 1, "finetune_epochs": 0,
            "rules": [{"target": "ff"}]},
}


@pytest.mark.parametrize("method", list(CKPT_RECIPES))
def test_grad_checkpointing_recomputes_the_same_forward(method):
    """timm's set_grad_checkpointing reruns each block in the backward: the masked layers give the same forward
    weights there (the native kernel's cached W~, SR-STE's and supermask's backward, Gumbel's step-seeded noise,
    drop-path's generator state), so the loss and every gradient equal those of the plain backward."""
    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", **VIT_KW, num_classes=10, drop_path_rate=0.2)
        recipe = sparsity.recipe_from_dict(CKPT_RECIPES[method])
        sparsity.sparsify_(model, recipe)
        ctl = sparsity.SparsityController(model, recipe, total_steps=10, steps_per_epoch=5)
        model.set_grad_checkpointing(checkpointing)
        calls = []
        model.blocks[0].mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
        ctl.step(6)  # past gmp's first pruning step
        assert not all(bool(m.weight_mask.all()) for _, m in sparsity.masked_modules(model))  # something pruned
        torch.manual_seed(1)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    loss, grads, calls = run(False)
    loss_ck, grads_ck, calls_ck = run(True)
    assert (calls, calls_ck) == (1, 2)  # the masked layer did run again in the backward
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and "blocks.1.mlp.fc1.weight" in grads
    extra = [n for n in grads if n.startswith("blocks.0.mlp.fc1.") and n not in ("blocks.0.mlp.fc1.weight",
                                                                                  "blocks.0.mlp.fc1.bias")]
    assert (len(extra) == 1) == (method in ("supermask", "gumbel"))  # the scores / logits get theirs too
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=0, atol=1e-7, msg=name)


def test_layer_decay_min_and_no_opt_scales():
    """--layer-decay-min-scale floors timm's per-depth scales; --layer-decay-no-opt-scale freezes what falls below
    (with two blocks and 0.5: embeddings 0.125, block 0 0.25, block 1 0.5, head 1)."""
    model = timm.create_model("vit_tiny_patch16_224", **VIT_KW, num_classes=10)
    recipe = sparsity.recipe_from_dict(CKPT_RECIPES["ste"])
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    floored = ctl.param_groups(0.05, layer_decay=0.5, layer_decay_min_scale=0.3)
    assert sorted({g["lr_scale"] for g in floored}) == [0.3, 0.5, 1.0]
    kept = ctl.param_groups(0.05, layer_decay=0.5, layer_decay_no_opt_scale=0.2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert sorted({g["lr_scale"] for g in kept}) == [0.25, 0.5, 1.0]
    assert sum(len(g["params"]) for g in kept) == len(list(model.parameters())) - len(frozen)


def test_lr_cycles_noise_and_k_decay_follow_timms_scheduler(tmp_path, caplog, capsys):
    """--lr-cycle-limit 2 makes a 2-epoch cosine schedule a 4-epoch run (the sparsity schedule spans both cycles),
    and every epoch's lr is what timm's CosineLRScheduler gives for the same flags, its noise included. The run
    also trains with --grad-checkpointing and --layer-decay-min-scale."""
    from timm.scheduler import CosineLRScheduler

    cfg = tmp_path / "ste.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": CKPT_RECIPES["ste"]}))
    sched = ["--sched", "cosine", "--lr-cycle-limit", "2", "--lr-cycle-decay", "0.5", "--lr-k-decay", "2",
             "--lr-noise", "0.5", "--lr-noise-pct", "0.3", "--lr-noise-std", "0.5", "--min-lr", "1e-5"]
    args = ["--config", str(cfg), *TINY_VIT, *FAST, "--epochs", "2", *sched, "--output", str(tmp_path),
            "--experiment", "cyc", "--grad-checkpointing", "--layer-decay", "0.5", "--layer-decay-min-scale", "0.3"]
    with caplog.at_level("INFO", logger="sparsity.factory"):
        assert run_cli(train.main, args) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing: on" in out and "training 4 epochs" in out
    rows = _rows(tmp_path / "cyc")
    ck = torch.load(tmp_path / "cyc" / "last.pth.tar", weights_only=True)
    scales = [g["lr_scale"] for g in ck["optimizer"]["param_groups"]]
    assert min(scales) == 0.3 and ck["controller"]["global_step"] == 4 * ck["steps_per_epoch"] == 20

    def timm_lrs(**noise):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        ref = CosineLRScheduler(opt, t_initial=2, lr_min=1e-5, cycle_decay=0.5, cycle_limit=2, k_decay=2,
                                noise_seed=42, **noise)
        lrs = []
        for epoch in range(4):
            if epoch:
                ref.step(epoch)
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    noisy = timm_lrs(noise_range_t=1.0, noise_pct=0.3, noise_std=0.5)  # 0.5 of the 2-epoch cycle
    assert timm_lrs() != pytest.approx(noisy)  # the noise moves some epoch's lr
    mean_scale = sum(scales) / len(scales)
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr * mean_scale for lr in noisy], rel=1e-6)
    assert float(rows[2]["lr"]) < float(rows[0]["lr"])  # the second cycle restarts at half the peak


def test_distributed_flags_check_the_process_count_and_device(caplog):
    """--aug-repeats needs torchrun; --sync-bn needs CUDA under torchrun (torch's SyncBatchNorm has no CPU kernel)
    and does nothing on one process, as in timm; the converted model keeps timm's state-dict keys and its masks."""
    from types import SimpleNamespace

    from timm.layers import convert_sync_batchnorm

    from sparsity.errors import UserError
    from sparsity.run_args import check_dist_args

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    one = SimpleNamespace(distributed=False, device=cpu)
    with pytest.raises(UserError, match="--sync-bn needs CUDA GPUs"):
        check_dist_args(SimpleNamespace(aug_repeats=0, sync_bn=True), SimpleNamespace(distributed=True, device=cpu))
    check_dist_args(SimpleNamespace(aug_repeats=3, sync_bn=True), SimpleNamespace(distributed=True, device=gpu))
    with pytest.raises(UserError, match="--aug-repeats 3 needs several processes"):
        check_dist_args(SimpleNamespace(aug_repeats=3, sync_bn=False), one)
    with caplog.at_level("INFO", logger="train"):
        check_dist_args(SimpleNamespace(aug_repeats=0, sync_bn=True), one)
    assert "--sync-bn: one process, nothing to synchronise" in caplog.text

    model = timm.create_model("resnet10t", channels=[8, 16, 32, 64], stem_width=8, num_classes=10)
    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": "stem", "skip": True},
                                                                   {"target": "conv", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, recipe)
    keys, masked = list(model.state_dict()), [n for n, _ in sparsity.masked_modules(model)]
    model = convert_sync_batchnorm(model)
    assert isinstance(model.layer1[0].bn1, nn.SyncBatchNorm) and list(model.state_dict()) == keys
    assert [n for n, _ in sparsity.masked_modules(model)] == masked and len(masked) > 8


def test_grad_checkpointing_on_a_model_without_it_is_one_message():
    from sparsity.errors import ModelError
    from sparsity.factory import set_grad_checkpointing

    with pytest.raises(ModelError, match="--grad-checkpointing: timm's 'inception_v3' does not support gradient "
                                         "checkpointing; drop the flag"):
        set_grad_checkpointing(timm.create_model("inception_v3", num_classes=10), "inception_v3", log=False)
    with pytest.raises(ModelError, match="'plain' does not support"):
        set_grad_checkpointing(nn.Sequential(nn.Linear(2, 2)), "plain", log=False)


def test_the_input_size_probe_builds_no_graph():
    """check_input_size's blank forward runs without autograd (no graph kept alive, no gradient state touched)."""
    from sparsity.factory import check_input_size

    model = timm.create_model("vit_tiny_patch16_224", **VIT_KW, num_classes=10)
    seen = []
    model.head.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    check_input_size(model, (3, 32, 32), "vit")
    assert seen == [False] and model.training


def test_bce_flags_shape_timms_binary_cross_entropy():
    """--bce-target-thresh turns soft targets into 0/1 at the threshold (timm's ResNet recipes use 0.2 with
    mixup), --bce-sum sums over the classes, --bce-pos-weight weighs the positives: the loss train.py builds
    equals binary_cross_entropy_with_logits on those targets."""
    from sparsity.trainer import _loss_fns

    args = train.build_parser().parse_args(["--bce-loss", "--bce-target-thresh", "0.2", "--bce-sum",
                                            "--bce-pos-weight", "2.0"])
    loss_fn, _ = _loss_fns(args, mixup_active=True)
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0],
                         [0.19, 0.0, 0.0, 0.0, 0.81]])
    hard = (soft >= 0.2).float()  # [1,1,0,0,0], [0,1,0,0,0], [0,0,1,1,0], [0,0,0,0,1]
    expected = nn.functional.binary_cross_entropy_with_logits(logits, hard, pos_weight=torch.tensor(2.0),
                                                               reduction="none").sum(1).mean()
    assert float(loss_fn(logits, soft)) == pytest.approx(float(expected), rel=1e-6)
    plain, _ = _loss_fns(train.build_parser().parse_args(["--bce-loss"]), mixup_active=True)
    assert float(plain(logits, soft)) != pytest.approx(float(expected), rel=1e-3)  # the flags changed something


def test_mixup_off_epoch_drop_block_and_compile_mode_reach_the_run(tmp_path, monkeypatch):
    """--mixup-off-epoch 1: epoch 0 mixes, epoch 1 does not (timm's Mixup with mixup_enabled False); --drop-block
    builds the ResNet with timm's drop_block_rate; --torchcompile-mode goes to torch.compile."""
    import timm.data

    seen, compiled = [], []
    real = timm.data.Mixup.__call__

    def spy(self, x, target):
        seen.append(self.mixup_enabled)
        return real(self, x, target)

    monkeypatch.setattr(timm.data.Mixup, "__call__", spy)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": {"method": "ste", "rules": [
        {"target": "stem", "skip": True}, {"target": "conv", "n": 2, "m": 4}]}}))
    args = ["--config", str(cfg), "--model", "resnet10t", "--model-kwargs", "channels=[8,16,32,64]",
            "stem_width=8", *FAST, "--epochs", "2", "--mixup", "0.5", "--mixup-off-epoch", "1", "--drop-block",
            "0.1", "--bce-loss", "--bce-target-thresh", "0.2", "--torchcompile", "--torchcompile-mode",
            "reduce-overhead", "--output", str(tmp_path), "--experiment", "m"]
    assert run_cli(train.main, args) == 0
    ck = torch.load(tmp_path / "m" / "last.pth.tar", weights_only=True)
    steps = ck["steps_per_epoch"]
    assert seen == [True] * steps + [False] * steps
    assert ck["create_kwargs"]["drop_block_rate"] == 0.1
    assert compiled == [{"backend": "inductor", "mode": "reduce-overhead"}]


def test_print_config_of_a_torchrun_recipe_on_one_process(capsys):
    """The SuperBlock recipes set aug_repeats: 3 (torchrun only); --print-config still prints them on one process
    (the process-count check runs after it)."""
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs/imagenet/vit_b16/supermask/linear_90_tile64.yaml"
    assert run_cli(train.main, ["--config", str(cfg), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["aug_repeats"] == 3


@pytest.mark.parametrize("method", ["ste", "gumbel"])
def test_channels_last_trains_every_method_layout(tmp_path, method):
    """--channels-last converts the 4-D weights and masks only: gumbel's conv logits are 5-D, which torch's own
    model.to(memory_format=channels_last) refuses ("required rank 4 tensor")."""
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": {"method": method, "rules": [
        {"target": "stem", "skip": True}, {"target": "conv", "n": 2, "m": 4}]}}))
    args = ["--config", str(cfg), "--model", "resnet10t", "--model-kwargs", "channels=[8,16,32,64]",
            "stem_width=8", *FAST, "--epochs", "1", "--channels-last", "--output", str(tmp_path), "--experiment", "c"]
    assert run_cli(train.main, args) == 0
    ck = torch.load(tmp_path / "c" / "last.pth.tar", weights_only=True)
    logits = [v for k, v in ck["state_dict"].items() if "weight_logits" in k]
    assert (len(logits) > 0 and all(v.dim() == 5 for v in logits)) == (method == "gumbel")
    with open(tmp_path / "c" / "sparsity_report.csv") as f:
        assert all(r["conforms"] == "True" for r in csv.DictReader(f))


def test_clip_grad_none_turns_off_a_recipes_clipping(tmp_path):
    from cli_common import ConfigError, parse_with_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("clip_grad: 1.0\n")
    assert parse_with_config(train.build_parser(), ["--config", str(cfg)])[0].clip_grad == 1.0
    for off in ("none", "None", "off"):
        assert parse_with_config(train.build_parser(), ["--config", str(cfg), "--clip-grad", off])[0].clip_grad is None
    assert parse_with_config(train.build_parser(), ["--clip-grad", "0.5"])[0].clip_grad == 0.5
    cfg.write_text("clip_grad: often\n")
    with pytest.raises(ConfigError, match="'clip_grad' in .* must be a number, got 'often'"):
        parse_with_config(train.build_parser(), ["--config", str(cfg)])


def test_evaluate_counts_exactly():
    """top-1 / top-5 are summed as counts: 10 of 30 right in batches of 3 is 100 * 10 / 30 exactly (percentages
    per batch in float32, 33.333336 each, summed to 33.33334; a results.json once read 10.000000052981907)."""
    from sparsity.engine import evaluate

    torch.manual_seed(0)
    logits = torch.randn(30, 7)
    targets = logits.argsort(dim=1)[:, 0].clone()  # the lowest logit: never in the top 5 of 7
    right = torch.arange(0, 30, 3)  # one per batch of 3
    targets[right] = logits[right].argmax(1)
    loader = [(logits[i:i + 3], targets[i:i + 3]) for i in range(0, 30, 3)]
    out = evaluate(nn.Identity(), loader)
    assert out["top1"] == out["top5"] == 100.0 * 10 / 30
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, targets)))


def test_an_epoch_done_and_resumed_before_its_evaluation_keeps_its_loss():
    """A checkpoint written after an epoch's steps (an unreadable validation image) holds the epoch's loss totals;
    a resume that skips the whole epoch reports the same mean, also when the last accumulation window was skipped
    for a non-finite loss (its finite batches count, without an update)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(4)]
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 4 else loss

    state = TrainState()
    done = train_one_epoch(model, batches, opt, loss_fn, state, accum_steps=2, max_nonfinite=5,
                           on_step=lambda s, b: None)
    assert state.loss_count == 6 and state.loss_sum / state.loss_count == done["loss"]
    again = TrainState(global_step=state.global_step, loss_sum=state.loss_sum, loss_count=state.loss_count)
    resumed = train_one_epoch(model, batches, opt, loss_fn, again, accum_steps=2, skip_batches=4)
    assert resumed["loss"] == done["loss"] and calls["n"] == 4  # nothing was run again
