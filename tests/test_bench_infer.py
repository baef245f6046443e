"""benchmark.py --bench infer: magnitude-masked models from a spec, the dense vs accelerated grid, the MLP-linear
microbenchmark, byte counts of sparse layouts and the CLI's outputs and errors. Nothing here is timed: on CPU
nothing runs sparse, so the tests check the bookkeeping (rows, throughput from latency, logits unchanged, memory
fields) and leave speed to runs on a GPU (docs/export.md)."""

import json

import pytest
import timm
import torch

import benchmark
import sparsity
from sparsity.accelerate import SparseLinear
from sparsity.bench_infer import _tensor_bytes, bench_infer, bench_layers, sparse_model, weight_bytes
from sparsity.layers import MaskedLinear

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=32, patch_size=4, depth=2, num_classes=10)
TOKENS = (32 // 4) ** 2 + 1  # patches + class token


@pytest.fixture(scope="module")
def vit_ff24():
    return sparse_model(VIT, targets=["ff"], nm=(2, 4), **VIT_KW)


def test_sparse_model_nm_masks_exactly_the_targets(vit_ff24):
    masked = dict(sparsity.masked_modules(vit_ff24))
    assert sorted(masked) == [f"blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    torch.manual_seed(0)  # sparse_model's seed: the same timm initialisation, before pruning
    init = timm.create_model(VIT, **VIT_KW)
    for fqn, layer in masked.items():
        assert sparsity.is_nm(layer.weight_mask, 2, 4, dim=1)
        assert layer.weight_mask.float().mean().item() == 0.5
        w0 = init.get_submodule(fqn).weight.detach()
        assert torch.equal(layer.weight.detach(), w0 * layer.weight_mask)  # kept weights as initialised, rest 0
        # magnitude: every kept weight is at least as large as every pruned one of its group of 4
        w = w0.abs().reshape(-1, 4)
        keep = layer.weight_mask.reshape(-1, 4)
        kept_min = torch.where(keep, w, torch.inf).min(1).values
        pruned_max = torch.where(keep, -torch.inf, w).max(1).values
        assert bool((kept_min >= pruned_max).all())
    assert not isinstance(vit_ff24.blocks[0].attn.qkv, MaskedLinear)


def test_sparse_model_block_masks_keep_whole_tiles():
    model = sparse_model(VIT, targets=["ff", "qkv"], sparsity=0.75, tile=16, **VIT_KW)
    for name, layer in sparsity.masked_modules(model):
        out_f, in_f = layer.weight.shape
        tiles = layer.weight_mask.reshape(out_f // 16, 16, in_f // 16, 16).permute(0, 2, 1, 3).flatten(2)
        per_tile = tiles.float().mean(-1)
        assert bool(((per_tile == 0) | (per_tile == 1)).all()), name  # all-or-nothing tiles
        if name.endswith("qkv"):  # q, k and v each keep a quarter of their own tiles
            assert [per_tile[i * 12:(i + 1) * 12].mean().item() for i in range(3)] == [0.25] * 3
        else:
            assert per_tile.mean().item() == 0.25


def test_bench_infer_grid_on_cpu_reports_consistent_rows(vit_ff24):
    res = bench_infer(vit_ff24, batch_sizes=(2, 4), dtypes=(torch.float32, torch.bfloat16), modes=("eager",),
                      device="cpu", warmup=0, iters=2)
    rows = res["rows"]
    assert [(r["dtype"], r["batch_size"]) for r in rows] == [("float32", 2), ("float32", 4), ("bfloat16", 2),
                                                            ("bfloat16", 4)]
    dense_mib = sum(p.numel() for p in vit_ff24.parameters()) * 4 / 2**20
    for r in rows:
        assert r["converted"] == 0 and r["max_abs_diff"] == 0.0  # CPU: the "sparse" model is the dense one
        assert r["dense_peak_mib"] is None and r["sparse_peak_mib"] is None  # peak memory is CUDA's counter
        # img/s is rounded to 0.1 (a slow, loaded machine gives single digits); ms to 4 decimals
        assert r["dense_img_s"] == pytest.approx(r["batch_size"] / r["dense_ms"] * 1e3, rel=1e-3, abs=0.051)
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"], rel=1e-3)
        scale = 1 if r["dtype"] == "float32" else 0.5
        assert r["dense_weights_mib"] == pytest.approx(dense_mib * scale, abs=0.01)
        assert r["sparse_weights_mib"] == r["dense_weights_mib"]
    assert len(res["layers"]) == 20 and res["settings"]["img_size"] == 32  # the plan of each dtype
    assert [r["dtype"] for r in res["layers"]] == ["float32"] * 10 + ["bfloat16"] * 10
    fc1 = {r["dtype"]: r["reason"] for r in res["layers"] if r["fqn"] == "blocks.0.mlp.fc1"}
    assert "2:4 kernels need float16/bfloat16" in fc1["float32"]  # fp32: the dtype is a reason
    assert "otherwise eligible" in fc1["bfloat16"]  # bf16: only the device is
    assert all("compute capability 8.0+" in r["reason"] for r in res["layers"])
    assert isinstance(vit_ff24.blocks[0].mlp.fc1, MaskedLinear)  # the caller's model is untouched


def test_bench_infer_compiled_rows_match_eager_logits(vit_ff24):
    res = bench_infer(vit_ff24, batch_sizes=(2,), dtypes=(torch.float32,), modes=("eager", "compiled"),
                      device="cpu", warmup=1, iters=1, compile_backend="eager")
    assert [r["mode"] for r in res["rows"]] == ["eager", "compiled"]
    assert all(r["max_abs_diff"] == 0.0 for r in res["rows"])
    assert res["settings"]["compile_backend"] == "eager"
    with pytest.raises(ValueError, match="modes must be among"):
        bench_infer(vit_ff24, modes=("graph",), device="cpu")


def test_bench_layers_times_each_mlp_shape_once_with_the_model_input_sizes(vit_ff24):
    res = bench_layers(vit_ff24, batch_size=3, dtype=torch.float32, device="cpu", warmup=0, iters=2)
    rows = res["rows"]
    assert [(r["layer"], r["count"], r["weight"], r["rows"]) for r in rows] == [
        ("blocks.0.mlp.fc1", 2, "768x192", 3 * TOKENS), ("blocks.0.mlp.fc2", 2, "192x768", 3 * TOKENS)]
    assert all(r["max_abs_diff"] == 0.0 and r["converted"] is False for r in rows)
    assert all("CUDA" in r["reason"] for r in rows)  # why it stays dense here, as accelerate_ says
    total = res["total"]
    assert total["count"] == 4
    assert total["dense_ms"] == pytest.approx(sum(2 * r["dense_ms"] for r in rows), abs=1e-3)
    assert total["sparse_ms"] == pytest.approx(sum(2 * r["sparse_ms"] for r in rows), abs=1e-3)


def test_bench_layers_on_a_model_without_mlp_linears_says_so():
    from sparsity.errors import UserError

    with pytest.raises(UserError, match="--layers times a transformer's ff linears; resnet18 has none"):
        bench_layers("resnet18", batch_size=1, dtype=torch.float32, device="cpu", warmup=0, iters=1)


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_weight_bytes_counts_bsr_components():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w *= sparsity.block_mask(w, 0.75, 16)  # 8 of 32 tiles kept
    bsr = w.to_sparse_bsr((16, 16))
    expected = 8 * 16 * 16 * 4 + (4 + 1) * 8 + 8 * 8  # values fp32 + crow (int64) + col (int64)
    assert _tensor_bytes(bsr) == expected
    layer = SparseLinear(bsr, torch.zeros(64), 128, 64, "bsr")
    assert weight_bytes(torch.nn.Sequential(layer)) == expected + 64 * 4
    assert expected < w.numel() * 4 / 3


def test_benchmark_cli_infer_writes_files(tmp_path, capsys):
    out = tmp_path / "bi"
    rc = benchmark.main(["--bench", "infer", "--model", VIT, "--model-kwargs", "img_size=32", "patch_size=4",
                         "depth=2", "--targets", "ff", "qkv", "proj", "-b", "2", "4", "--dtype", "float32",
                         "--steps", "1", "--warmup", "0", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "float32: 0 of 10 Linear/Conv2d layers run sparse" in printed and "nothing runs sparse" in printed
    data = json.loads((out / "bench_infer.json").read_text())
    assert [r["batch_size"] for r in data["rows"]] == [2, 4]
    assert data["settings"]["model"] == VIT and data["settings"]["backend"] == "semi_structured"  # not the class
    if not torch.cuda.is_available():  # nothing converted: no 2:4 kernel ran, so none is recorded
        assert data["settings"]["semi_kernel"] is None
    plan = (out / "infer_layers_plan.csv").read_text().splitlines()
    assert plan[0] == "dtype,fqn,shape,pattern,eligible,converted,reason" and len(plan) == 11
    assert sum("q=2:4 k=2:4 v=2:4" in line for line in plan) == 2 and sum("attn.proj" in line for line in plan) == 2
    csv_rows = (out / "bench_infer.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and "max_abs_diff" in csv_rows[0]

    rc = benchmark.main(["--bench", "infer", "--model", VIT, "--model-kwargs", "img_size=32", "patch_size=4",
                         "depth=2", "--tile", "16", "-b", "2", "--dtype", "float32", "--steps", "1", "--warmup", "0",
                         "--layers", "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "bench_infer_layers.json").read_text())
    assert data["settings"]["backend"] == "bsr" and [t["count"] for t in data["totals"]] == [4]


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model_or_dir"], "neither a timm model name nor an existing"),
    (["--model", VIT, "--nm", "5:4"], "N must be between 1 and M"),
    (["--model", VIT, "--nm", "2of4"], "--nm must look like 2:4"),
    (["--model", VIT, "--tile", "16", "--sparsity", "1.5"], "--sparsity is the fraction of zeros"),
])
def test_benchmark_cli_infer_bad_input_is_one_line(argv, message, capsys):
    assert benchmark.main(["--bench", "infer", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_benchmark_cli_infer_refuses_mask_flags_for_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "model.pth.tar"
    ckpt.write_bytes(b"")
    assert benchmark.main(["--bench", "infer", "--model", str(ckpt), "--targets", "ff"]) == 2
    assert "keeps the masks it was trained with" in capsys.readouterr().err
    assert benchmark.main(["--bench", "train", "--model", "resnet18", "--methods", "ste", "-b", "2", "4"]) == 2
    assert "takes one --batch-size" in capsys.readouterr().err


def _gpu_sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_sm80(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_bench_infer_on_gpu_runs_sparse_and_matches_within_bf16():
    model = sparse_model(VIT, targets=["ff", "qkv", "proj"], nm=(2, 4), **VIT_KW)
    res = bench_infer(model, batch_sizes=(64,), dtypes=(torch.bfloat16,), modes=("eager",), device="cuda",
                      warmup=2, iters=5)
    row = res["rows"][0]
    assert row["converted"] == 8  # fc1, fc2, qkv, proj of both blocks: all meet either kernel's shape multiples
    assert row["max_abs_diff"] < 0.1 and row["sparse_peak_mib"] > row["sparse_weights_mib"] > 0
    layers = bench_layers(model, batch_size=64, dtype=torch.bfloat16, device="cuda", warmup=2, iters=5)
    assert all(r["converted"] and r["max_abs_diff"] < 0.1 for r in layers["rows"])


def test_timings_are_taken_in_turns():
    """Dense and sparse forwards alternate (warm-up rounds too), so a load change on the machine cannot land on
    one of them only; the medians are of each function's own calls."""
    from sparsity.bench_infer import time_calls

    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    ms = time_calls(fns, "cpu", warmup=2, iters=3)
    assert calls == ["a", "b"] * 5 and len(ms) == 2


def test_bench_infer_channels_last_runs_a_cnn_in_that_layout(monkeypatch):
    """channels_last=True: both models and the input in channels-last memory (what the 1x1 conv path wants)."""
    import sparsity.bench_infer as bi

    seen = []
    real = bi.time_calls
    monkeypatch.setattr(bi, "time_calls", lambda fns, *a: (seen.append(fns), real(fns, *a))[1])
    model = timm.create_model("resnet10t", num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
    res = bench_infer(model, batch_sizes=(2,), dtypes=(torch.float32,), img_size=32, device="cpu", warmup=0, iters=1,
                      channels_last=True)
    assert res["settings"]["channels_last"] is True and res["rows"][0]["max_abs_diff"] == 0.0
    x = seen[0][0].__defaults__[1]  # the timed input
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dense = seen[0][0].__defaults__[0]
    assert dense.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
