"""Targets and surgery on tiny timm ViT, Swin (v1, v2), ResNet and ConvNeXt."""

import copy

import pytest
import timm
import torch

import sparsity
from sparsity.layers import MaskedConv2d, MaskedLinear
from tests.conftest import TINY, tiny_model

FF_QKV = [{"target": "ff", "n": 1, "m": 8}, {"target": ["q", "k", "v"], "n": 2, "m": 4}]
CONV = [{"target": "stem", "skip": True}, {"target": "head", "skip": True}, {"target": "conv", "n": 2, "m": 4}]

CASES = {
    "vit": FF_QKV,
    "swin": FF_QKV,
    "swinv2": FF_QKV,
    "resnet": CONV,
    "convnext": [{"target": "ff", "n": 1, "m": 8}, {"target": "conv_kxk", "n": 2, "m": 4},
                 {"target": "stem", "skip": True}],
}


def _expected(kind, model):
    """Computed on the dense model: what each rule set must select."""
    mods = dict(model.named_modules())
    ff = {n for n in mods if n.endswith(("mlp.fc1", "mlp.fc2"))}
    if kind in ("vit", "swin", "swinv2"):
        return ff | {n for n in mods if n.endswith("attn.qkv")}
    convs = {n for n, m in mods.items() if type(m) is torch.nn.Conv2d}
    if kind == "convnext":  # dense kxk convs (downsamples); depthwise convs are skipped (1 input channel per group)
        return ff | {n for n in convs if mods[n].kernel_size != (1, 1) and mods[n].groups == 1 and n != "stem.0"}
    return convs - {"conv1"}


@pytest.mark.parametrize("kind", list(CASES))
def test_selection_conformance_and_timm_roundtrip(kind):
    model = tiny_model(kind)
    stock = copy.deepcopy(model.state_dict())
    expected = _expected(kind, model)
    recipe = sparsity.recipe_from_dict({"method": "srste", "rules": CASES[kind]})
    sparsity.sparsify_(model, recipe)
    selected = {fqn for fqn, _ in sparsity.masked_modules(model)}
    assert selected == expected
    if kind == "convnext":  # depthwise 7x7 convs cannot take 2:4 along 1 input channel: skipped with a reason
        assert all("not divisible" in why for why in model.sparsity_skipped.values())
        assert any("conv_dw" in k for k in model.sparsity_skipped)
    # stock (dense) checkpoint loads strictly into the sparsified model: only weight_mask buffers are new
    model.load_state_dict(stock, strict=True)
    extra = set(model.state_dict()) - set(stock)
    assert extra and all(k.endswith("weight_mask") for k in extra)
    ctl = sparsity.SparsityController(model, recipe, total_steps=10)
    ctl.step(0)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()  # gradients flow through every masked layer
    rows = sparsity.sparsity_report(model)
    masked_rows = [r for r in rows if r["method"] == "srste"]
    assert masked_rows and all(r["conforms"] for r in masked_rows)
    for r in masked_rows:
        if "ff=1:8" in r["pattern"]:
            assert r["density"] == pytest.approx(1 / 8)
        if "q=2:4" in r["pattern"]:
            assert r["density"] == pytest.approx(0.5)
    # densify_: plain layers, stock keys, strict load into a fresh timm model, same logits
    model.eval()
    with torch.no_grad():
        ref = model(x)
    sparsity.densify_(model)
    assert not sparsity.masked_modules(model)
    name, kw = TINY[kind]
    fresh = timm.create_model(name, **kw).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, atol=1e-5)


def test_qkv_rules_never_leak_into_ff():
    model = tiny_model("vit")
    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": [
        {"target": ["q", "k"], "n": 1, "m": 4}, {"target": "v", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, recipe)
    assert not isinstance(model.blocks[0].mlp.fc1, MaskedLinear)
    assert not isinstance(model.blocks[0].attn.proj, MaskedLinear)
    qkv = model.blocks[0].attn.qkv
    assert [(s.label, s.n, s.m) for s in qkv.slices] == [("q", 1, 4), ("k", 1, 4), ("v", 2, 4)]
    sparsity.SparsityController(model, recipe, total_steps=1).step(0)
    d = qkv.weight.shape[0] // 3
    dens = [float(qkv.weight_mask[i * d:(i + 1) * d].float().mean()) for i in range(3)]
    assert dens == [0.25, 0.25, 0.5]


def test_first_match_wins_and_skip():
    model = tiny_model("vit")
    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": [
        {"target": "re:blocks\\.0\\..*", "skip": True}, {"target": "ff", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, recipe)
    assert not isinstance(model.blocks[0].mlp.fc1, MaskedLinear)
    assert isinstance(model.blocks[1].mlp.fc1, MaskedLinear)


def test_targets_stem_head_first_block_last_layer_proj():
    from sparsity.targets import find_candidates

    tags = {c.fqn: c.tags for c in find_candidates(tiny_model("vit"))}
    assert "stem" in tags["patch_embed.proj"] and "head" in tags["head"] and "last_layer" in tags["head"]
    assert "proj" in tags["blocks.0.attn.proj"] and "first_block" in tags["blocks.0.mlp.fc1"]
    assert "first_block" not in tags["blocks.1.mlp.fc1"]
    rtags = {c.fqn: c.tags for c in find_candidates(tiny_model("resnet"))}
    assert "stem" in rtags["conv1"] and "head" in rtags["fc"] and "conv1x1" in rtags["layer2.0.downsample.0"]
    assert "conv_kxk" in rtags["layer1.0.conv1"] and "first_block" in rtags["layer1.0.conv2"]
    import timm  # a distilled DeiT has two classifiers (get_classifier() returns both): both are the head

    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10)
    dtags = {c.fqn: c.tags for c in find_candidates(deit)}
    assert "head" in dtags["head"] and "head" in dtags["head_dist"] and "ff" not in dtags["head_dist"]


def test_non_divisible_layer_skipped_or_strict_error():
    model = tiny_model("resnet")
    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": "conv", "n": 2, "m": 4}]})
    sparsity.sparsify_(model, recipe)
    assert not isinstance(model.conv1, MaskedConv2d)  # 3 input channels
    assert "3 not divisible by M=4" in model.sparsity_skipped["conv1"]
    rows = {r["fqn"]: r for r in sparsity.sparsity_report(model)}
    assert rows["conv1"]["method"] == "skipped" and "not divisible" in rows["conv1"]["note"]
    strict = sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": "conv", "n": 2, "m": 4,
                                                                    "strict": True}]})
    with pytest.raises(sparsity.RecipeError, match="conv1 cannot take 2:4.*strict"):
        sparsity.sparsify_(tiny_model("resnet"), strict)


def test_recipe_that_masks_nothing_is_refused_unless_dense_on_purpose():
    """Every selected layer unfit for the pattern (M=5 divides no channel count) would train dense: refused by
    name. Layers a method leaves dense on purpose (supermask at sparsity 0) are not an error."""
    with pytest.raises(sparsity.RecipeError, match=r"the recipe in m5.yaml selects \d+ layer\(s\) but none can take "
                                                   r"its pattern \(e.g. conv1: .*not divisible by M=5\)"):
        sparsity.sparsify_(tiny_model("resnet"), sparsity.recipe_from_dict(
            {"method": "ste", "rules": [{"target": "conv", "n": 2, "m": 5}]}, source="m5.yaml"))
    on_purpose = sparsity.sparsify_(tiny_model("resnet"), sparsity.recipe_from_dict(  # passes
        {"method": "supermask", "sparsity_linear": 0.0, "sparsity_conv": 0.0, "sparsity_conv1x1": 0.0,
         "rules": [{"target": "conv"}]}))
    assert on_purpose.sparsity_skipped and not sparsity.masked_modules(on_purpose)
    partly = sparsity.sparsify_(tiny_model("resnet"), sparsity.recipe_from_dict(  # passes
        {"method": "ste", "rules": [{"target": "conv", "n": 2, "m": 4}]}))
    assert "conv1" in partly.sparsity_skipped and sparsity.masked_modules(partly)  # the stem skipped, the rest masked


def test_swinv2_qkv_mask_applies():
    model = tiny_model("swinv2").eval()
    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": ["q", "k", "v"], "n": 1, "m": 4}]})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    sparsity.sparsify_(model, recipe)
    with torch.no_grad():
        same = model(x)  # masks all True before the first controller step: unchanged function
    assert torch.allclose(dense, same, atol=1e-5)
    calls = []
    qkv = model.layers[0].blocks[0].attn.qkv
    qkv.register_forward_hook(lambda *a: calls.append(1))
    attn = model.layers[0].blocks[0].attn
    outs = []
    attn.register_forward_hook(lambda mod, inp, out: outs.append(out))
    with torch.no_grad():
        model(x)
        sparsity.SparsityController(model, recipe, total_steps=1).step(0)
        model(x)
    assert calls == [1, 1]  # Swin-V2 attention now calls the module instead of F.linear(qkv.weight)
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # and the 1:4 mask changes what attention computes


def test_create_model_takes_a_recipe_file():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "vit_digits_2of4.yaml"
    model = sparsity.create_model("vit_tiny_patch16_224", recipe=path,
                                  img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    assert model.sparsity_recipe.method == "srste" and len(sparsity.masked_modules(model)) == 12



def test_report_table_keeps_its_columns_with_long_patterns():
    from sparsity.report import format_report

    rows = [{"fqn": "blocks.0.attn.qkv", "shape": [96, 32], "pattern": "q=75% tile 8 k=75% tile 8 v=75% tile 8",
             "density": 0.25, "conforms": True, "note": "", "accel": "BSR"},
            {"fqn": "blocks.0.mlp.fc1", "shape": [128, 32], "pattern": "ff=2:4", "density": 0.5, "conforms": True,
             "note": "", "accel": "2:4"}]
    lines = format_report(rows).splitlines()
    ends = [lines[0].index("density") + 7] + [line.index(" 0.") + 6 for line in lines[1:]]  # right-aligned column
    assert len(set(ends)) == 1, lines
