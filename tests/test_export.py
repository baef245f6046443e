"""Export formats (densified, compressed N:M / BSR), load_for_eval, accelerate_ and the export.py CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import sparsity
from sparsity.export import (
    COMPRESSED_FILE,
    CONFIG_FILE,
    DENSIFIED_FILE,
    ExportError,
    decode_weight,
    encode_weight,
    load_for_eval,
)
from sparsity.layers import MaskedLinear, SliceSpec
from sparsity.methods import frozen_masked_weight
from sparsity.surgery import set_submodule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import export as export_cli  # noqa: E402
from cli_common import run_cli  # noqa: E402

VIT = "vit_tiny_patch16_224"
VIT_KW = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}
RN_KW = {"num_classes": 10}


def _cli(argv: list[str]) -> int:
    """export.py as its process runs it: bad input -> one line on stderr, exit code 2."""
    return run_cli(export_cli.main, argv)


def _sparse_model(arch: str, kw: dict, rules: list[dict]) -> torch.nn.Module:
    torch.manual_seed(0)
    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": rules})
    model = sparsity.create_model(arch, recipe=recipe, **kw)
    sparsity.SparsityController(model, recipe, total_steps=10).step(0)
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def vit24():
    return _sparse_model(VIT, VIT_KW, [{"target": "ff", "n": 2, "m": 4}, {"target": ["q", "k", "v"], "n": 2, "m": 4}])


@pytest.fixture(scope="module")
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_block_slices_off_the_tile_grid_are_stored_as_a_bitmap_and_logged(tmp_path, caplog):
    model = _block_vit(0.75, tile=5)  # 768 x 192 is no multiple of 5: the mask conforms, BSR cannot hold it
    with caplog.at_level("INFO", logger="sparsity.export"):
        info = sparsity.export_compressed(model, tmp_path / "c", arch=VIT, create_kwargs=VIT_KW)
    assert (info["bitmap_segments"], info["bsr_segments"]) == (1, 0)
    assert "compressed export: blocks.0.mlp.fc1.weight rows 0:768 stored as bitmap (shape [768, 192] is not " \
           "divisible by tile 5)" in caplog.text
    loaded, _ = sparsity.load_compressed(tmp_path / "c")
    _assert_bit_exact(model, loaded)


def _block_vit(sparsity_: float = 0.9, tile: int = 16) -> torch.nn.Module:
    """Tiny ViT whose blocks.0.mlp.fc1 (768x192) is block-sparse: whole tile x tile tiles by magnitude."""
    torch.manual_seed(0)
    model = timm.create_model(VIT, **VIT_KW)
    layer = MaskedLinear.from_dense(model.blocks[0].mlp.fc1)
    layer.slices = (SliceSpec("ff", 0, 768, sparsity=sparsity_, tile=tile),)
    layer.method = "block"
    layer.weight_fn = frozen_masked_weight
    layer.weight_mask.copy_(sparsity.block_mask(layer.weight, sparsity_, tile))
    set_submodule(model, "blocks.0.mlp.fc1", layer)
    return model.eval()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- densified ----------------------------------------------------------------------------------------------------
def test_densified_loads_strict_into_stock_timm(vit24, x32, tmp_path):
    before = {k: v.clone() for k, v in vit24.state_dict().items()}
    info = sparsity.export_densified(vit24, tmp_path / "d", arch=VIT, create_kwargs=VIT_KW)
    assert all(torch.equal(v, before[k]) for k, v in vit24.state_dict().items())  # the source model is untouched
    assert set(info["files"]) == {DENSIFIED_FILE, CONFIG_FILE}
    state = load_file(str(tmp_path / "d" / DENSIFIED_FILE))
    assert not any(k.endswith("weight_mask") for k in state)
    stock = timm.create_model(VIT, **VIT_KW)
    stock.load_state_dict(state, strict=True)
    torch.testing.assert_close(_logits(stock, x32), _logits(vit24, x32), rtol=0, atol=1e-6)
    # masks baked in: every masked weight is W * E
    for fqn, layer in sparsity.masked_modules(vit24):
        assert torch.equal(state[f"{fqn}.weight"], layer.masked_weight())
    cfg = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    assert cfg["architecture"] == VIT and cfg["num_classes"] == 10
    assert cfg["sparsity"]["format"] == "densified"
    assert cfg["sparsity"]["create_kwargs"] == VIT_KW
    assert cfg["sparsity"]["recipe"] == vit24.sparsity_recipe.to_dict()
    layers = {r["fqn"]: r for r in cfg["sparsity"]["layers"]}
    assert layers["blocks.0.attn.qkv"]["pattern"] == "q=2:4 k=2:4 v=2:4"
    assert layers["blocks.1.mlp.fc2"]["density"] == 0.5 and layers["blocks.1.mlp.fc2"]["conforms"] is True
    # timm's own local-dir loader reads the export directory
    local = timm.create_model(f"local-dir:{tmp_path / 'd'}", pretrained=True)
    torch.testing.assert_close(_logits(local, x32), _logits(vit24, x32), rtol=0, atol=1e-6)


def test_densified_config_drops_the_stock_test_size(tmp_path):
    """A ConvNeXt trained at 32 px: its export's config.json keeps no stock test-time size (288 px, crop 1.0) or
    pool size, which timm's validate.py (use_test_size) would otherwise evaluate at."""
    from timm.data import resolve_data_config

    model = timm.create_model("convnext_atto", num_classes=10)
    sparsity.sparsify_(model, sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": "ff", "n": 2,
                                                                                     "m": 4}]}))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 0.9}  # the run's
    sparsity.export_densified(model, tmp_path / "d", arch="convnext_atto", create_kwargs={"num_classes": 10})
    pcfg = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())["pretrained_cfg"]
    assert not {"test_input_size", "test_crop_pct", "pool_size"} & set(pcfg)
    local = timm.create_model(f"local-dir:{tmp_path / 'd'}", pretrained=True)
    cfg = resolve_data_config({}, model=local, use_test_size=True)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == 0.9


# ---- compressed ----------------------------------------------------------------------------------------------------
def _assert_bit_exact(src: torch.nn.Module, loaded: torch.nn.Module) -> None:
    src_masked = dict(sparsity.masked_modules(src))
    loaded_sd = loaded.state_dict()
    for k, v in src.state_dict().items():
        fqn = k.rpartition(".")[0]
        if k.endswith(".weight") and fqn in src_masked:
            assert torch.equal(loaded_sd[k], src_masked[fqn].masked_weight()), k
        elif k in loaded_sd:
            assert torch.equal(loaded_sd[k], v), k


def test_compressed_round_trip_per_slice_patterns_and_col_grouping(x32, tmp_path):
    rules = [
        {"target": "q", "n": 2, "m": 4},
        {"target": "k", "n": 1, "m": 4},
        {"target": "v", "skip": True},  # rows outside every slice: a dense segment
        {"target": "ff", "n": 2, "m": 8, "sparse_dim": "col"},
    ]
    model = _sparse_model(VIT, VIT_KW, rules)
    sparsity.export_compressed(model, tmp_path / "c", arch=VIT, create_kwargs=VIT_KW)
    loaded, meta = sparsity.load_compressed(tmp_path / "c")
    _assert_bit_exact(model, loaded)
    for fqn, layer in sparsity.masked_modules(model):
        back = loaded.get_submodule(fqn)
        assert isinstance(back, MaskedLinear)
        assert torch.equal(back.weight_mask, layer.weight_mask), fqn
        assert back.slices == layer.slices
        assert torch.equal(meta["masks"][fqn], layer.weight_mask)
    assert [r["pattern"] for r in sparsity.sparsity_report(loaded)] == \
           [r["pattern"] for r in sparsity.sparsity_report(model)]
    torch.testing.assert_close(_logits(loaded, x32), _logits(model, x32), rtol=0, atol=1e-6)
    # the stored layout: q 2:4 and k 1:4 along the input dim, v dense, ff grouped along the output dim
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / COMPRESSED_FILE), "pt") as f:
        layout = json.loads(f.metadata()["sparsity.layout"])
        qkv = layout["blocks.0.attn.qkv.weight"]["segments"]
        assert [(s["format"], s.get("n"), s.get("m"), s.get("dim")) for s in qkv] == \
               [("nm", 2, 4, 1), ("nm", 1, 4, 1), ("dense", None, None, None)]
        assert f.get_slice("blocks.0.attn.qkv.weight@1.indices").get_shape() == [192, 48, 1]
        fc1 = layout["blocks.0.mlp.fc1.weight"]["segments"]
        assert fc1[0]["dim"] == 0 and f.get_slice("blocks.0.mlp.fc1.weight@0.values").get_shape() == [192, 96, 2]
    # masked=False: the stock timm model, same as the densified export
    stock, _ = sparsity.load_compressed(tmp_path / "c", masked=False)
    assert not sparsity.masked_modules(stock)
    _assert_bit_exact(model, stock)


def test_compressed_conv_groups_along_input_channels(tmp_path):
    model = _sparse_model("resnet18", RN_KW, [{"target": "conv", "n": 2, "m": 4}])
    assert "conv1" in model.sparsity_skipped  # 3 input channels: not divisible by 4
    x = torch.randn(1, 3, 32, 32)
    sparsity.export_compressed(model, tmp_path / "c", arch="resnet18", create_kwargs=RN_KW)
    loaded, _ = sparsity.load_compressed(tmp_path / "c")
    _assert_bit_exact(model, loaded)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=1e-5)
    with __import__("safetensors").safe_open(str(tmp_path / "c" / COMPRESSED_FILE), "pt") as f:
        # layer1.0.conv1: (64, 64, 3, 3) viewed (O, kh, kw, I) -> groups of 4 input channels, 2 kept
        assert f.get_slice("layer1.0.conv1.weight@0.values").get_shape() == [64, 3, 3, 16, 2]
        idx = f.get_tensor("layer1.0.conv1.weight@0.indices")
        assert idx.dtype == torch.uint8 and int(idx.max()) <= 3


def test_nm_fillers_and_nonconforming_masks_stay_exact():
    layer = MaskedLinear(16, 8)
    layer.slices = (SliceSpec("all", 0, 8, n=2, m=4),)
    mask = sparsity.linear_nm_mask(layer.weight, 2, 4)
    mask[0, :4] = torch.tensor([False, False, True, False])  # a group keeping fewer than n: a zero filler
    layer.weight_mask.copy_(mask)
    tensors, entry = encode_weight(layer, "w")
    assert entry["segments"][0]["format"] == "nm" and entry["segments"][0].get("mask_bits")
    w, m = decode_weight(tensors, "w", entry)
    assert torch.equal(w, layer.masked_weight()) and torch.equal(m, layer.weight_mask)
    layer.weight_mask[1, :4] = True  # a group keeping more than n: not N:M, stored as values + mask bitmap
    tensors, entry = encode_weight(layer, "w")
    assert entry["segments"][0]["format"] == "bitmap" and "not 2:4" in entry["segments"][0]["note"]
    assert tensors["w@0.values"].numel() == int(layer.weight_mask.sum())
    w, m = decode_weight(tensors, "w", entry)
    assert torch.equal(w, layer.masked_weight()) and torch.equal(m, layer.weight_mask)
    layer.weight_mask.fill_(True)  # too dense for a bitmap to pay: dense values plus the mask bits
    layer.weight_mask[0, 0] = False
    tensors, entry = encode_weight(layer, "w")
    assert entry["segments"][0]["format"] == "dense" and entry["segments"][0]["mask_bits"]
    w, m = decode_weight(tensors, "w", entry)
    assert torch.equal(w, layer.masked_weight()) and torch.equal(m, layer.weight_mask)


def test_unstructured_slices_store_a_bitmap(x32, tmp_path):
    model = timm.create_model(VIT, **VIT_KW).eval()
    layer = MaskedLinear.from_dense(model.blocks[1].mlp.fc2)
    layer.slices = (SliceSpec("ff", 0, 192, sparsity=0.8),)
    layer.weight_fn = frozen_masked_weight
    layer.weight_mask.copy_(sparsity.unstructured_mask(layer.weight, 0.8))
    set_submodule(model, "blocks.1.mlp.fc2", layer)
    info = sparsity.export_compressed(model, tmp_path / "c", arch=VIT, create_kwargs=VIT_KW)
    assert (info["layers"], info["bitmap_segments"], info["nm_segments"], info["bsr_segments"]) == (1, 1, 0, 0)
    f = load_file(str(tmp_path / "c" / COMPRESSED_FILE))
    layer_bytes = sum(_nbytes(t) for k, t in f.items() if k.startswith("blocks.1.mlp.fc2.weight@"))
    assert layer_bytes == round(0.2 * 192 * 768) * 4 + 192 * 768 // 8  # 0.231 of dense
    loaded, _ = sparsity.load_compressed(tmp_path / "c")
    _assert_bit_exact(model, loaded)
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight_mask, layer.weight_mask)


# ---- sizes ---------------------------------------------------------------------------------------------------------
def test_size_ratio_2of4_ff_and_qkv(vit24, tmp_path):
    info = sparsity.export_compressed(vit24, tmp_path / "c", arch=VIT, create_kwargs=VIT_KW)
    dense_bytes = sum(_nbytes(v) for k, v in vit24.state_dict().items() if not k.endswith("weight_mask"))
    sparse_bytes = sum(_nbytes(layer.weight) for _, layer in sparsity.masked_modules(vit24))
    # 2:4 in fp32: half the values (4 B each) + one uint8 index per kept value = 0.5 * 5/4 = 0.625 of the layer
    expected = dense_bytes - sparse_bytes + 0.625 * sparse_bytes
    assert expected <= info["compressed_bytes"] <= expected + 16_384  # + safetensors header with the layout
    assert dense_bytes <= info["densified_bytes"] <= dense_bytes + 16_384
    assert info["ratio"] < 0.68  # 811k of the 914k parameters are 2:4
    assert info["files"][COMPRESSED_FILE] == info["compressed_bytes"]
    assert (tmp_path / "c" / COMPRESSED_FILE).stat().st_size == info["compressed_bytes"]


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_size_ratio_block_sparse_90(x32, tmp_path):
    model = _block_vit(0.9, 16)
    layer = model.blocks[0].mlp.fc1
    info = sparsity.export_compressed(model, tmp_path / "c", arch=VIT, create_kwargs=VIT_KW)
    f = load_file(str(tmp_path / "c" / COMPRESSED_FILE))
    kept = round(0.1 * (768 // 16) * (192 // 16))  # 58 of 576 tiles
    assert f["blocks.0.mlp.fc1.weight@0.values"].shape == (kept, 16, 16)
    layer_bytes = sum(_nbytes(t) for k, t in f.items() if k.startswith("blocks.0.mlp.fc1.weight@"))
    # values 58*256*4 + col_indices 58*4 + crow_indices 49*4 bytes: 0.102 of the dense 768*192*4
    assert layer_bytes == kept * 256 * 4 + kept * 4 + 49 * 4
    assert layer_bytes / _nbytes(layer.weight) < 0.105
    # same components as torch's own BSR conversion of the masked weight
    ref = layer.masked_weight().to_sparse_bsr((16, 16))
    assert torch.equal(f["blocks.0.mlp.fc1.weight@0.crow_indices"].long(), ref.crow_indices())
    assert torch.equal(f["blocks.0.mlp.fc1.weight@0.col_indices"].long(), ref.col_indices())
    assert torch.equal(f["blocks.0.mlp.fc1.weight@0.values"], ref.values())
    assert "blocks.0.mlp.fc1.weight@0.mask_bits" not in f  # a whole-tile mask is implied by the layout
    saved = info["densified_bytes"] - info["compressed_bytes"]
    assert abs(saved - (_nbytes(layer.weight) - layer_bytes)) < 16_384
    loaded, _ = sparsity.load_compressed(tmp_path / "c")
    _assert_bit_exact(model, loaded)
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight_mask, layer.weight_mask)
    torch.testing.assert_close(_logits(loaded, x32), _logits(model, x32), rtol=0, atol=1e-6)


# ---- damaged and edited files ---------------------------------------------------------------------------------------
def _flip_data_byte(file: Path, at: float) -> None:
    """Flip one bit of the tensor data (past safetensors' 8-byte length and JSON header), ``at`` of the way in."""
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + int(at * (len(raw) - start - 1))] ^= 0x10
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("fmt", ["densified", "compressed"])
def test_a_damaged_export_is_refused_naming_the_tensor(vit24, tmp_path, fmt, capsys):
    """safetensors checks only its header: a flipped bit in the values would load and evaluate wrong weights. The
    per-tensor CRC-32 in the metadata refuses the file, naming the tensor; validate.py says so in one line."""
    out = tmp_path / fmt
    (sparsity.export_densified if fmt == "densified" else sparsity.export_compressed)(
        vit24, out, arch=VIT, create_kwargs=VIT_KW)
    file = out / (DENSIFIED_FILE if fmt == "densified" else COMPRESSED_FILE)
    load_for_eval(out)  # intact: loads
    _flip_data_byte(file, 0.5)
    with pytest.raises(ExportError, match=r"is corrupt: tensor \S+ does not match its checksum"):
        load_for_eval(out)
    import validate

    assert run_cli(validate.main, ["--checkpoint", str(out), "--dataset", "digits", "-b", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is corrupt: tensor" in err and "re-export the model" in err


def test_an_edited_compressed_layout_is_refused_not_decoded_into_garbage(vit24, tmp_path):
    """The layout JSON is checksummed like the tensors (a changed dim still decodes, into wrong weights). Without
    the checksums, a layout whose segments leave rows out would leave torch.empty's memory in the weight and one
    whose positions point past the group would fail in scatter: both are one ExportError naming the layer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sparsity.export_compressed(vit24, tmp_path / "c", arch=VIT, create_kwargs=VIT_KW)
    file = tmp_path / "c" / COMPRESSED_FILE
    with safe_open(str(file), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    layout = json.loads(meta["sparsity.layout"])
    key = "blocks.0.mlp.fc1.weight"

    def rewrite(edit_layout=None, edit_tensors=None):
        lay, ts = copy.deepcopy(layout), dict(tensors)
        if edit_layout:
            edit_layout(lay[key])
        if edit_tensors:
            edit_tensors(ts)
        save_file(ts, str(file), metadata={**meta, "sparsity.layout": json.dumps(lay), "sparsity.crc32": "{}"})

    lay = copy.deepcopy(layout)
    lay[key]["segments"][0]["dim"] = 0  # a flipped digit that still decodes (into wrong weights)
    save_file(tensors, str(file), metadata={**meta, "sparsity.layout": json.dumps(lay)})  # the exported checksums
    with pytest.raises(ExportError, match="is corrupt: its 'sparsity.layout' metadata does not match its checksum"):
        sparsity.load_compressed(tmp_path / "c")
    rewrite(edit_layout=lambda e: e["segments"][0].update(start=1))  # row 0 never written
    with pytest.raises(ExportError, match=rf"the compressed layout of {key} does not decode \(ValueError: "
                                          r"segments \[\(1, 768\)\] do not cover rows 0 to 768"):
        sparsity.load_compressed(tmp_path / "c")

    def bad_index(ts):
        idx = ts[f"{key}@0.indices"].clone()
        idx.view(-1)[0] = 9  # a position past the group of 4
        ts[f"{key}@0.indices"] = idx

    rewrite(edit_tensors=bad_index)
    with pytest.raises(ExportError, match=rf"the compressed layout of {key} does not decode \(RuntimeError"):
        sparsity.load_compressed(tmp_path / "c")
    rewrite()  # the file as exported (no checksums): loads, bit-exact
    _assert_bit_exact(vit24, sparsity.load_compressed(tmp_path / "c")[0])


# ---- checkpoint, CLI, load_for_eval --------------------------------------------------------------------------------
@pytest.fixture()
def fake_checkpoint(vit24, tmp_path):
    path = tmp_path / "run" / "model_best.pth.tar"
    ema = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in vit24.state_dict().items()}
    sparsity.save_atomic({
        "arch": VIT, "create_kwargs": VIT_KW, "recipe": vit24.sparsity_recipe.to_dict(),
        "state_dict": vit24.state_dict(), "state_dict_ema": ema, "epoch": 3, "global_step": 30,
    }, path)
    return path


def test_cli_exports_both_formats_and_load_for_eval_agrees(vit24, x32, fake_checkpoint, tmp_path, capsys):
    ref = _logits(vit24, x32)
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "densified"]) == 0
    out = capsys.readouterr().out
    assert "ratio 0." in out and DENSIFIED_FILE in out
    dens_dir = fake_checkpoint.parent / "model_best-densified"
    assert (dens_dir / DENSIFIED_FILE).is_file()
    comp_dir = tmp_path / "comp"
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "compressed",
                            "--output", str(comp_dir)]) == 0
    cfg = json.loads((comp_dir / CONFIG_FILE).read_text())["sparsity"]
    assert cfg["epoch"] == 3 and cfg["compressed_bytes"] < cfg["densified_bytes"]
    for path, kind in ((fake_checkpoint, "checkpoint"), (dens_dir, "densified"),
                       (dens_dir / DENSIFIED_FILE, "densified"), (comp_dir, "compressed")):
        model, meta = load_for_eval(path)
        assert meta["kind"] == kind and meta["arch"] == VIT and meta["num_classes"] == 10
        assert not model.training
        rows = sparsity.sparsity_report(model)  # every kind can be checked for conformance
        assert len(rows) == 6 and all(r["conforms"] and r["density"] == 0.5 for r in rows), kind
        torch.testing.assert_close(_logits(model, x32), ref, rtol=0, atol=1e-6, msg=str(path))


def test_cli_use_ema_exports_the_ema_weights(vit24, fake_checkpoint, tmp_path):
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "densified", "--use-ema",
                            "--output", str(tmp_path / "ema")]) == 0
    state = load_file(str(tmp_path / "ema" / DENSIFIED_FILE))
    layer = vit24.blocks[0].mlp.fc1
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], layer.masked_weight() * 0.5)


def test_cli_refuses_to_overwrite_without_force(fake_checkpoint, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / CONFIG_FILE).write_text("keep me")
    (out / "notes.txt").write_text("mine")
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "densified", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert (out / CONFIG_FILE).read_text() == "keep me" and not (out / DENSIFIED_FILE).exists()
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "densified", "--output", str(out),
                            "--force"]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["sparsity"]["format"] == "densified"
    assert (out / "notes.txt").read_text() == "mine"  # files that are not ours are never touched
    # --force into the same dir with the other format: the stale densified weights go
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "compressed", "--output", str(out),
                            "--force"]) == 0
    assert (out / COMPRESSED_FILE).is_file() and not (out / DENSIFIED_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp dirs left behind
    umask = os.umask(0)
    os.umask(umask)
    for name in (COMPRESSED_FILE, CONFIG_FILE):  # readable as any file the user writes (not 0600)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_cli_unwritable_output_is_one_line_that_names_the_flag(fake_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "densified", "--output", str(blocker / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot write the export to {blocker / 'd'} (")
    assert "choose another --output" in err and blocker.read_text() == "x"


def test_cli_bad_checkpoint_exit_code_2_one_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert _cli(["--checkpoint", str(corrupt), "--format", "compressed"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err
    assert not (tmp_path / "corrupt-compressed").exists()
    # the real process: exit status 2, one line on stderr, nothing on stdout
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(tmp_path / "missing.pth.tar"),
                           "--format", "densified"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


def test_directories_and_formats_mixed_up_get_a_hint(fake_checkpoint, tmp_path, capsys, caplog):
    """An export or run directory where a checkpoint file belongs, a compressed export into load_densified, and
    validate.py flags that a file naming its own model would silently override: one line each, naming the fix."""
    import validate

    comp = tmp_path / "comp"
    assert _cli(["--checkpoint", str(fake_checkpoint), "--format", "compressed", "--output", str(comp)]) == 0
    capsys.readouterr()
    lone = tmp_path / "lone"  # the compressed weights file without its config.json
    lone.mkdir()
    shutil.copy(comp / COMPRESSED_FILE, lone)
    cases = [
        (export_cli.main, ["--checkpoint", str(comp), "--format", "densified"],
         f"{comp} is an export directory, not a training checkpoint; pass the .pth.tar it was exported from"),
        (export_cli.main, ["--checkpoint", str(fake_checkpoint.parent), "--format", "densified"],
         f"is a run directory; pass one of its checkpoints, e.g. {fake_checkpoint}"),
        (validate.main, ["--checkpoint", str(fake_checkpoint.parent)],
         f"is a run directory; pass one of its checkpoints, e.g. {fake_checkpoint}"),
        (validate.main, ["--checkpoint", str(fake_checkpoint), "--model", "resnet18", "--num-classes", "5"],
         f"--model resnet18 (file: {VIT}); --num-classes 5 (file: 10); drop those flags"),
        (validate.main, ["--checkpoint", str(comp), "--model-kwargs", "depth=3"],
         "--model-kwargs depth=3 (file: 2); drop those flags"),
        (validate.main, ["--checkpoint", str(comp), "--use-ema"], "is an export, which holds one set of weights"),
        (validate.main, ["--checkpoint", str(lone / COMPRESSED_FILE), "--model", VIT, "--num-classes", "10"],
         "is a compressed export (kept values and indices, not a state dict): pass its folder, with the config.json"),
        (validate.main, ["--checkpoint", str(fake_checkpoint), "--data-dir", str(tmp_path / "nope")],
         f"--data-dir {tmp_path / 'nope'} does not exist"),
        # its config.json would make the training run folder look like an export
        (export_cli.main, ["--checkpoint", str(fake_checkpoint), "--format", "densified", "--output",
                           str(fake_checkpoint.parent), "--force"], "is a training run folder; export into a folder"),
    ]
    newer = tmp_path / "newer"
    newer.mkdir()
    cfg = json.loads((comp / CONFIG_FILE).read_text())
    cfg["sparsity"]["format_version"] = 99
    (newer / CONFIG_FILE).write_text(json.dumps(cfg))
    cases.append((validate.main, ["--checkpoint", str(newer)], "says format_version 99; this version reads up to 1"))
    no_ema = tmp_path / "no_ema.pth.tar"
    ckpt = torch.load(fake_checkpoint, weights_only=True)
    sparsity.save_atomic({**ckpt, "state_dict_ema": None}, no_ema)
    cases.append((validate.main, ["--checkpoint", str(no_ema), "--use-ema"], "the checkpoint holds no EMA weights"))
    for main, argv, msg in cases:
        with caplog.at_level("INFO", logger="sparsity.surgery"):  # the layer table is on (tests quiet it)
            assert run_cli(main, argv) == 2, argv
        out, err = capsys.readouterr()  # the CLI's logging writes to stdout
        assert len(err.strip().splitlines()) == 1 and msg in err, (argv, err)
        assert "sparsify_" not in out, (argv, out)  # refused before a model (and its layer table) was built
    with caplog.at_level("INFO", logger="sparsity.surgery"):  # the control: a run that builds the model shows it
        assert run_cli(validate.main, ["--checkpoint", str(fake_checkpoint), "-b", "512"]) == 0
    assert "sparsify_" in capsys.readouterr().out
    assert sorted(p.name for p in fake_checkpoint.parent.iterdir()) == ["model_best.pth.tar"]  # nothing written
    no_ema.unlink()
    with pytest.raises(ExportError, match="holds a compressed export; load it with sparsity.load_compressed"):
        sparsity.load_densified(comp)
    # flags that agree with the file are fine (the file's own values, a tag on the name)
    assert run_cli(validate.main, ["--checkpoint", str(fake_checkpoint), "--model", f"{VIT}.augreg_in21k",
                                   "--num-classes", "10", "--model-kwargs", "depth=2", "-b", "512"]) == 0


def test_load_for_eval_rejects_non_exports(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="config.json"):
        load_for_eval(tmp_path / "empty")
    with pytest.raises(sparsity.CheckpointError, match="does not exist"):
        load_for_eval(tmp_path / "nope.pth.tar")


def test_export_rejects_wrong_create_kwargs(vit24, tmp_path):
    with pytest.raises(ExportError, match="do not fit"):
        sparsity.export_densified(vit24, tmp_path / "d", arch=VIT, create_kwargs={"num_classes": 10})
    assert not (tmp_path / "d").exists()


def test_export_whose_config_names_an_unbuildable_model_is_one_error(vit24, tmp_path):
    sparsity.export_densified(vit24, tmp_path / "d", arch=VIT, create_kwargs=VIT_KW)
    cfg_file = tmp_path / "d" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architecture"] = "resnet18"  # edited by hand: ResNet takes no img_size
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="config.json asks for resnet18 with .*which timm cannot build .*img_size"):
        load_for_eval(tmp_path / "d")


# ---- accelerate_ ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU no-op path")
@pytest.mark.parametrize("backend", ["semi_structured", "bsr"])
def test_accelerate_on_cpu_changes_nothing_and_says_why(backend, x32):
    model = _sparse_model(VIT, VIT_KW, [{"target": "ff", "n": 2, "m": 4}])
    set_submodule(model, "blocks.1.mlp.fc1", _block_vit().blocks[0].mlp.fc1)
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model, x32)
    rows = sparsity.accelerate_(model, backend=backend)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, x32), ref)
    assert len(rows) == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert all(not r["converted"] and "CUDA GPU of compute capability 8.0+" in r["reason"] for r in rows)
    by_fqn = {r["fqn"]: r for r in rows}
    if backend == "semi_structured":  # the pre-flight still says what a GPU would run
        assert "otherwise eligible" in by_fqn["blocks.0.mlp.fc1"]["reason"]
        assert "not 2:4" in by_fqn["blocks.0.attn.proj"]["reason"]
        assert "Conv2d" in by_fqn["patch_embed.proj"]["reason"]
        model.blocks[0].mlp.fc1.weight_mask[0, :4] = True  # a 2:4 layer whose mask breaks its pattern
        reason = {r["fqn"]: r["reason"] for r in sparsity.accelerate_(model, backend=backend)}["blocks.0.mlp.fc1"]
        assert "its mask does not conform to its pattern ff=2:4" in reason
    else:
        assert "otherwise eligible" in by_fqn["blocks.1.mlp.fc1"]["reason"]
        assert "10% of tiles" in by_fqn["blocks.1.mlp.fc1"]["reason"]
        assert "no block pattern" in by_fqn["blocks.0.mlp.fc1"]["reason"]


def test_plan_tells_1x1_convs_from_kxk_convs():
    """A 1x1 conv is a matmul over channels (ResNet downsamples and bottlenecks): its row is judged like a Linear's
    (here its pattern, dense); a kxk conv has no kernel (im2col); a grouped 1x1 conv says why it is not a matmul."""
    model = timm.create_model("resnet10t", num_classes=10)
    model.add_module("grouped", torch.nn.Conv2d(64, 64, 1, groups=2))
    rows = {r["fqn"]: r["reason"] for r in sparsity.accelerate_(model, backend="semi_structured")}
    assert "pattern dense is not 2:4" in rows["layer2.0.downsample.1"]
    assert "would need im2col" in rows["layer1.0.conv1"]
    assert "1x1 Conv2d with groups=2" in rows["grouped"]


def test_accelerate_keeps_conv_subclasses_with_their_own_forward(monkeypatch):
    """timm's StdConv2d standardizes its weight in its forward: the raw weight is not the matmul, so its row says
    so and it stays (BiT ResNets are made of them)."""
    from timm.layers import StdConv2d

    import sparsity.accelerate as acc

    model = torch.nn.Sequential(StdConv2d(64, 64, 1), torch.nn.Conv2d(64, 64, 1))
    with torch.no_grad():
        for conv in model:
            conv.weight.view(64, 16, 4)[:, :, :2] = 0  # 2:4 zeros along the input channels
    monkeypatch.setattr(acc, "_device_problem", lambda *a: None)
    rows = acc.plan_acceleration(model, backend="semi_structured", dtype=torch.bfloat16)
    assert "StdConv2d: its own forward" in rows[0]["reason"] and not rows[0]["eligible"]
    assert rows[1]["eligible"] and rows[1]["pattern"] == "2:4 (from its zeros)", rows


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_sparse_conv1x1_is_the_conv(stride):
    """SparseConv1x1: the pixels' channels as matmul rows (strided first), NCHW out; BSR runs on CPU too."""
    from sparsity.accelerate import SparseConv1x1

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 1, stride=stride)
    w = conv.weight.detach().reshape(16, 32)
    w[:, :16] = 0  # one of the two 16x16 tiles empty
    with torch.no_grad():
        conv.weight.copy_(w.reshape(16, 32, 1, 1))
    for x in (torch.randn(2, 32, 9, 9), torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)):
        want = conv(x)
        bsr = SparseConv1x1(w.to_sparse_bsr((16, 16)), conv.bias.detach(), 32, 16, "bsr", stride=(stride, stride))
        got = bsr(x)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        # the 2:4 path's reshapes, with the dense matrix standing in for the 2:4 tensor (CUDA only)
        layer = SparseConv1x1(w, conv.bias.detach(), 32, 16, "semi_structured", stride=(stride, stride))
        semi = layer(x)
        assert torch.allclose(semi, want, atol=1e-5)
        assert torch.allclose(layer(x[0]), conv(x[0]), atol=1e-5)  # unbatched (C, H, W), as Conv2d takes it
        assert semi.is_contiguous(memory_format=torch.channels_last)  # what the next channels-last layer reads


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_accelerate_converts_a_resnets_1x1_convs(monkeypatch):
    """On a (pretended) capable GPU, accelerate_ swaps the block-sparse 1x1 convs of a ResNet (its avg-pool
    downsamples) for SparseConv1x1 and the model's logits stay those of the dense model; BSR runs on this CPU."""
    import sparsity.accelerate as acc

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    one_by_one = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert one_by_one == ["layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"]
    with torch.no_grad():
        for name in one_by_one:
            w = model.get_submodule(name).weight
            w[: w.shape[0] // 2, : w.shape[1] // 2] = 0  # a quarter of the 16x16 tiles empty
    x = torch.randn(2, 3, 64, 64)
    ref = _logits(model, x)
    monkeypatch.setattr(acc, "_device_problem", lambda *a: None)
    rows = sparsity.accelerate_(model, backend="bsr", dtype=torch.float32, blocksize=16)
    assert sorted(r["fqn"] for r in rows if r["converted"]) == one_by_one, rows
    assert all(isinstance(model.get_submodule(n), acc.SparseConv1x1) for n in one_by_one)
    assert "75% of tiles kept" in {r["fqn"]: r["reason"] for r in rows}["layer2.0.downsample.1"]
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-4, atol=1e-4)


def test_plan_of_a_densified_model_names_the_pattern_its_zeros_show(vit24):
    """A densified export is plain timm: no masks, but 2:4 zeros that the 2:4 kernel can run; the row's pattern
    says so instead of 'dense' next to 'otherwise eligible'."""
    from sparsity.accelerate import plan_acceleration

    plain = sparsity.densify_(copy.deepcopy(vit24))
    rows = {r["fqn"]: r for r in plan_acceleration(plain)}
    fc1 = rows["blocks.0.mlp.fc1"]
    assert fc1["pattern"] == "2:4 (from its zeros)" and (fc1["eligible"] or "otherwise eligible" in fc1["reason"])
    assert rows["head"]["pattern"] == "dense"


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_sparse_linear_bsr_forward_math_on_cpu(x32):
    """The BSR module's flatten/transpose/bias logic, on torch's CPU BSR matmul (the GPU runs the same code)."""
    from sparsity.accelerate import _to_sparse

    layer = _block_vit().blocks[0].mlp.fc1
    fast = _to_sparse(layer, "bsr", torch.float32, None)
    assert fast.weight.layout == torch.sparse_bsr and fast.weight.values().shape[1:] == (16, 16)
    x = torch.randn(2, 65, 192)
    torch.testing.assert_close(fast(x), _logits(layer, x), rtol=1e-5, atol=1e-5)


def test_partly_skipped_layer_note_survives_export_round_trip(tmp_path):
    """A qkv whose k third cannot take its pattern is partly skipped; the reloaded model says so once."""
    model = _sparse_model(VIT, VIT_KW, [{"target": ["q", "v"], "n": 2, "m": 4}, {"target": "k", "n": 1, "m": 5}])
    before = {r["fqn"]: r["note"] for r in sparsity.sparsity_report(model)}
    assert before["blocks.0.attn.qkv"].startswith("partly skipped: k: ")
    loaders = {"densified": lambda d: sparsity.load_densified(d, masked=True), "compressed": sparsity.load_compressed}
    for fmt, export in (("densified", sparsity.export_densified), ("compressed", sparsity.export_compressed)):
        export(model, tmp_path / fmt, arch=VIT, create_kwargs=VIT_KW)
        loaded, _ = loaders[fmt](tmp_path / fmt)
        after = {r["fqn"]: r["note"] for r in sparsity.sparsity_report(loaded)}
        assert after["blocks.0.attn.qkv"] == before["blocks.0.attn.qkv"], fmt


def test_semi_kernel_choice_sets_the_shape_multiples_in_the_plan():
    """cuSPARSELt takes 2:4 bf16 weights in multiples of 16 x 16, CUTLASS 32 rows x 64 columns: a 48x48 layer
    fits one and not the other, and the plan (computed without a GPU) says which."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from sparsity.accelerate import semi_structured_class

    assert semi_structured_class("cutlass") is SparseSemiStructuredTensorCUTLASS
    assert semi_structured_class("cusparselt") is SparseSemiStructuredTensorCUSPARSELT
    layer = torch.nn.Linear(48, 48)
    with torch.no_grad():
        layer.weight *= sparsity.nm_mask(layer.weight, 2, 4, dim=1)
    model = torch.nn.Sequential(layer)
    lt = sparsity.accelerate.plan_acceleration(model, "semi_structured", torch.bfloat16, semi_kernel="cusparselt")
    assert "otherwise eligible: would run semi_structured" in lt[0]["reason"]
    cut = sparsity.accelerate.plan_acceleration(model, "semi_structured", torch.bfloat16, semi_kernel="cutlass")
    assert "the cutlass 2:4 kernel needs rows a multiple of 32, cols of 64" in cut[0]["reason"]
    with pytest.raises(ValueError, match="semi_kernel must be one of auto, cusparselt, cutlass"):
        sparsity.accelerate_(model, semi_kernel="cuBLAS")


def test_cutlass_2of4_is_refused_off_sm8x(monkeypatch):
    """torch's CUTLASS 2:4 GEMM is built for compute capability 8.x: on an H100 (9.0) it converts, then raises on
    the first forward. The plan says so up front; cuSPARSELt is fine there."""
    from torch.sparse import SparseSemiStructuredTensor

    from sparsity.accelerate import _kernel_problem

    assert "runs on compute capability 8.x only, this GPU is 9.0 (use semi_kernel='cusparselt')" in \
        _kernel_problem((9, 0), "semi_structured", "cutlass")
    assert _kernel_problem((8, 0), "semi_structured", "cutlass") is None
    assert _kernel_problem((8, 6), "semi_structured", "cutlass") is None
    assert _kernel_problem((9, 0), "bsr", "cutlass") is None
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert _kernel_problem((9, 0), "semi_structured", "auto") is None
    assert _kernel_problem((9, 0), "semi_structured", "cusparselt") is None
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)  # auto then means CUTLASS
    assert "8.x only" in _kernel_problem((9, 0), "semi_structured", "auto")
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert "this torch build has no cuSPARSELt" in _kernel_problem((9, 0), "semi_structured", "auto")
    assert "no cuSPARSELt; use semi_kernel='cutlass'" in _kernel_problem((8, 0), "semi_structured", "cusparselt")


def test_accelerate_keeps_a_layer_whose_kernel_fails_on_first_call(monkeypatch):
    """A kernel that converts but raises when called leaves the layer dense, with the error as the reason."""
    import sparsity.accelerate as acc

    layer = torch.nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight *= sparsity.nm_mask(layer.weight, 2, 4, dim=1)
    model = torch.nn.Sequential(layer)
    monkeypatch.setattr(acc, "_device_problem", lambda *a: None)  # pretend a capable GPU

    class Refuses(acc.SparseLinear):
        def forward(self, x):
            raise RuntimeError("_sparse_semi_structured_linear: Supported only on GPUs with compute capability 8.x")

    monkeypatch.setattr(acc, "_to_sparse",
                        lambda mod, *a: Refuses(mod.weight.detach(), None, 64, 64, "semi_structured"))
    rows = sparsity.accelerate_(model, backend="semi_structured")
    assert rows[0]["converted"] is False and model[0] is layer
    assert rows[0]["reason"].startswith("conversion failed: _sparse_semi_structured_linear: Supported only")


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_bsr_linear_compiles_into_one_graph_and_keeps_autograd():
    """Dynamo cannot trace sparse tensors: the BSR matmul is an opaque custom op, so a compiled model is one graph
    (it broke at every BSR layer before), gives the eager result, and gradients still reach the input."""
    import torch._dynamo.utils as dynamo_utils

    from sparsity.accelerate import SparseLinear

    torch.manual_seed(0)
    w = torch.randn(64, 32)
    w[:32] = 0  # the first two block rows of 16x16 tiles are empty
    bias = torch.randn(64)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), SparseLinear(w.to_sparse_bsr((16, 16)), bias, 32, 64, "bsr"),
                                torch.nn.ReLU())
    x = torch.randn(2, 8, 32, requires_grad=True)
    dense = torch.nn.Sequential(model[0], torch.nn.Linear(32, 64), torch.nn.ReLU())
    with torch.no_grad():
        dense[1].weight.copy_(w)
        dense[1].bias.copy_(bias)
    dense(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    model(x).square().sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-4)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), dense(x), rtol=1e-5, atol=1e-5)
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def _gpu_sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_sm80(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_accelerate_semi_structured_matches_masked_model_bf16():
    model = _sparse_model(VIT, VIT_KW, [{"target": "ff", "n": 2, "m": 4}, {"target": ["q", "k", "v"], "n": 2, "m": 4}])
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    ref = _logits(model, x).float()
    rows = sparsity.accelerate_(model, backend="semi_structured", dtype=torch.bfloat16)
    converted = {r["fqn"] for r in rows if r["converted"]}
    assert converted == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1", "mlp.fc2")}, rows
    out = _logits(model, x).float()
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
    compiled = torch.compile(model)  # the benchmarks' compiled rows: the sparse weight must survive tracing
    torch.testing.assert_close(_logits(compiled, x).float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_sm80(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_accelerate_semi_structured_runs_a_resnets_1x1_convs_bf16():
    """2:4 on every conv of a ResNet, channels-last bf16: the 1x1 downsamples run on the 2:4 kernel (the 3x3 convs
    have none), and the logits stay those of the masked model."""
    model = _sparse_model("resnet10t", RN_KW, [{"target": "stem", "skip": True}, {"target": "conv", "n": 2, "m": 4}])
    model = model.cuda().to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = _logits(model, x).float()
    rows = sparsity.accelerate_(model, backend="semi_structured", dtype=torch.bfloat16)
    converted = {r["fqn"] for r in rows if r["converted"]}
    assert converted == {f"layer{i}.0.downsample.1" for i in (2, 3, 4)}, rows
    torch.testing.assert_close(_logits(model, x).float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_sm80(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_accelerate_bsr_matches_masked_model_bf16():
    model = _block_vit().cuda().to(torch.bfloat16)
    # 16 x 65 tokens = 1040 rows, a multiple of the 16 tile: torch's Triton BSR kernel runs (the benchmarks' path),
    # not the generic fallback it takes for other row counts
    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    ref = _logits(model, x).float()
    rows = sparsity.accelerate_(model, backend="bsr", dtype=torch.bfloat16)
    assert [r["fqn"] for r in rows if r["converted"]] == ["blocks.0.mlp.fc1"], rows
    torch.testing.assert_close(_logits(model, x).float(), ref, rtol=5e-2, atol=5e-2)


def test_validate_bare_state_dict_with_model_and_recipe_reads_the_file_once(vit24, tmp_path, monkeypatch):
    """A bare state dict (no arch inside) needs --model and, for a sparse one, --config with its recipe; the file
    is read once, and the masks it holds are the ones validated."""
    import yaml

    import validate

    weights = tmp_path / "weights.pth"
    torch.save(vit24.state_dict(), weights)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"sparsity": vit24.sparsity_recipe.to_dict()}))
    reads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(Path(f)) or real(f, *a, **k))
    out = tmp_path / "val.json"
    data = ["--dataset", "digits", "--img-size", "32"]
    assert run_cli(validate.main, ["--checkpoint", str(weights), "--model", VIT, "--model-kwargs", "img_size=32",
                                   "patch_size=4", "depth=2", "--num-classes", "10", "--config", str(cfg), *data,
                                   "--results-file", str(out)]) == 0
    assert reads == [weights]
    result = json.loads(out.read_text())
    assert result["layers"] == 6 and result["layers_conforming"] == 6  # fc1, fc2, qkv of both blocks, at 2:4
    # the same weights as a train.py-style checkpoint (model named inside) score exactly the same
    named = tmp_path / "named.pth.tar"
    sparsity.save_atomic({"arch": VIT, "create_kwargs": VIT_KW, "recipe": vit24.sparsity_recipe.to_dict(),
                          "state_dict": vit24.state_dict()}, named)
    assert run_cli(validate.main, ["--checkpoint", str(named), *data, "--results-file", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == result["top1"]


def _validate_json(argv: list[str], out: Path) -> dict:
    import validate

    assert run_cli(validate.main, [*argv, "--results-file", str(out)]) == 0
    return json.loads(out.read_text())


def test_validate_accelerate_on_cpu_evaluates_as_it_is_and_says_why(fake_checkpoint, tmp_path, capsys):
    """--accelerate on a machine without the kernels: the table's reasons are printed, nothing converts, the
    figures are those of the plain evaluation, and the results file says so (0 layers, float32)."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    base = ["--checkpoint", str(fake_checkpoint), "-b", "512"]
    plain = _validate_json(base, tmp_path / "plain.json")
    acc = _validate_json([*base, "--accelerate", "semi_structured"], tmp_path / "acc.json")
    out = capsys.readouterr().out
    assert "6 not converted: these kernels need a CUDA GPU of compute capability 8.0+" in out
    assert "otherwise eligible: would run semi_structured" in out
    assert (acc["accelerate"], acc["accelerated_layers"], acc["dtype"]) == ("semi_structured", 0, "float32")
    assert (acc["top1"], acc["loss"], acc["layers_conforming"]) == (plain["top1"], plain["loss"], 6)
    assert (acc["sparsity_selected"], acc["sparsity_all"]) == (plain["sparsity_selected"], plain["sparsity_all"])


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_sm80(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_validate_accelerate_on_the_gpu_runs_the_2of4_layers_sparse(fake_checkpoint, tmp_path):
    """On an sm80+ GPU the six 2:4 layers run on the semi-structured kernel in bf16; the conformance report and the
    sparsity figures are the masked model's, and the loss stays within bf16 rounding of the fp32 evaluation. BSR
    takes none of the N:M layers: the model still runs in bf16 (autocast on), without a dtype mismatch."""
    base = ["--checkpoint", str(fake_checkpoint), "-b", "512", "--device", "cuda"]
    plain = _validate_json(base, tmp_path / "plain.json")
    acc = _validate_json([*base, "--accelerate", "semi_structured"], tmp_path / "acc.json")
    assert (acc["accelerated_layers"], acc["dtype"], acc["layers_conforming"]) == (6, "bfloat16", 6)
    assert (acc["sparsity_selected"], acc["sparsity_all"]) == (plain["sparsity_selected"], plain["sparsity_all"])
    assert abs(acc["loss"] - plain["loss"]) < 0.05
    none = _validate_json([*base, "--accelerate", "bsr"], tmp_path / "bsr.json")
    assert (none["accelerated_layers"], none["dtype"]) == (0, "bfloat16")
    assert abs(none["loss"] - plain["loss"]) < 0.05
