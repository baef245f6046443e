"""Every recipe under configs/: header, training keys, sparsity block, and the layers it selects on the real model.

Models are built at full size on the meta device (no memory, no init cost), so the check sees the real layer widths:
a pattern that a layer cannot take shows up as a skipped layer and fails here.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import sparsity
import train
from cli_common import parse_with_config
from sparsity.compare import published_top1
from sparsity.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HAND_WRITTEN = {"quickstart/vit_digits_2of4.yaml", "quickstart/resnet_digits_2of4.yaml"}
EXPERIMENTS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
BASES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("_*.yaml"))
PGF_DIRS = ("srste", "mdgf_exp", "mdgf_linear", "sdgf_sparsify", "sdgf_fine")
NM_METHODS = ("ste", "srste", "mdgf", "oneshot", "gumbel")
FF = re.compile(r".*\.mlp\.fc[12]$")
QKV = re.compile(r".*\.attn\.qkv$")
PROJ = re.compile(r".*\.attn\.proj$")
SRSTE_PUBLISHED = {"imagenet/resnet50/srste_2of4.yaml": 77.0, "imagenet/resnet50/srste_4of8.yaml": 77.4,
                   "imagenet/resnet50/srste_1of4.yaml": 75.9, "imagenet/resnet50/srste_2of8.yaml": 76.4,
                   "imagenet/resnet18/srste_2of4.yaml": 71.2, "imagenet/resnet18/dense.yaml": 71.3}

_MODELS: dict[tuple, nn.Module] = {}


def _generator():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "_generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _model(args) -> nn.Module:
    """Full-size model on the meta device, one per (name, kwargs, classes); recipes sparsify and densify it back."""
    classes = {"digits": 10, "torch/cifar100": 100}.get(args.dataset, 1000)
    key = (args.model, repr(sorted(args.model_kwargs.items())), classes)
    if key not in _MODELS:
        with torch.device("meta"):
            _MODELS[key] = timm.create_model(args.model, num_classes=classes, **args.model_kwargs)
    return _MODELS[key]


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def _intended(rel: str, model_name: str, method: str, layers: dict[str, nn.Module]) -> set[str]:
    """The layers a recipe means to make sparse, from its file name and model family (not from its rules)."""
    if method == "dense":
        return set()
    if model_name.startswith("resnet"):  # every conv but the stem; fc dense
        return {n for n, m in layers.items() if isinstance(m, nn.Conv2d) and n != "conv1"}
    if model_name.startswith("convnext"):  # MLP linears and ungrouped convs; stem, depthwise convs and head dense
        return {n for n, m in layers.items()
                if FF.match(n) or (isinstance(m, nn.Conv2d) and m.groups == 1 and not n.startswith("stem"))}
    stem = Path(rel).stem
    where = re.match(r"(ff_qkv|ff|qkv|linear)_", stem)
    if where:
        parts = where.group(1).split("_")
    elif method in ("usd", "oneshot", "gmp", "supermask"):
        parts = ["ff", "qkv", "proj"]
    else:
        parts = ["ff", "qkv"]
    if parts == ["linear"]:
        return {n for n, m in layers.items() if isinstance(m, nn.Linear)}
    regex = {"ff": FF, "qkv": QKV, "proj": PROJ}
    return {n for n in layers if any(regex[p].match(n) for p in parts)}


def _check_header(rel: str, text: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith("# Source: "), f"{rel}: first line must name its source ('# Source: ...')"
    pub = [ln for ln in lines if ln.startswith("# Published top-1:")]
    assert len(pub) == 1, f"{rel}: needs one '# Published top-1:' line"
    assert re.fullmatch(r"# Published top-1: (no published figure|\d+(\.\d+)?)", pub[0]), pub[0]


def _check_patterns(rel: str, recipe, masked: dict) -> None:
    stem = Path(rel).stem
    nm = re.search(r"(\d+)of(\d+)", stem)
    for fqn, layer in masked.items():
        specs = layer.slices
        if QKV.match(fqn):
            assert [s.label for s in specs] == ["q", "k", "v"], (rel, fqn)
            assert specs[0].start == 0 and specs[-1].stop == layer.weight.shape[0], (rel, fqn)
        if recipe.method in NM_METHODS:
            assert nm, f"{rel}: N:M recipes are named <...>_<n>of<m>"
            assert {(s.n, s.m) for s in specs} == {(int(nm.group(1)), int(nm.group(2)))}, (rel, fqn)
        elif recipe.method == "supermask":
            tile = re.search(r"tile(\d+)", stem)
            expected = (0.9, int(tile.group(1))) if tile else (0.75, 8)
            assert {(s.sparsity, s.tile) for s in specs} == {expected}, (rel, fqn)
    if recipe.method == "usd":
        assert (recipe.options.m, recipe.options.target_sparsity) == (16, 0.75), rel
    if recipe.method == "gmp":
        assert recipe.options.final_sparsity == 0.75, rel


def _check_method_dir(rel: str, recipe) -> None:
    method_dir = Path(rel).parent.name
    opts = recipe.options
    if method_dir not in PGF_DIRS:
        return
    if method_dir.startswith("mdgf"):
        assert recipe.method == "mdgf" and opts.structure_decay == "none"
        assert (opts.decay.type, opts.decay.coef) == (("exp", 1e-4) if method_dir == "mdgf_exp" else ("linear", 2e-4))
    else:
        assert recipe.method == "srste"
        assert opts.structure_decay == (method_dir.split("_")[1] if method_dir.startswith("sdgf") else "none")


def _check_training(rel: str, args) -> None:
    if rel.startswith("cifar100/"):
        assert (args.dataset, args.dataset_download, args.img_size) == ("torch/cifar100", False, 32), rel
        if not args.model.startswith("resnet"):
            assert args.model_kwargs.get("img_size") == 32, rel
    if rel.startswith("imagenet/"):
        assert args.dataset == "" and args.data_dir, rel
    parts = Path(rel).parts
    if rel.startswith("imagenet/") and parts[1] in ("vit_b16", "deit_s16", "deit_b16") and (
            parts[2] in PGF_DIRS or parts[2] == "dense.yaml"):  # the PGF ViT-B recipe
        got = (args.epochs, args.batch_size, args.opt, args.lr, args.weight_decay, args.warmup_epochs, args.amp,
               args.amp_dtype, args.bce_loss)
        assert got == (350, 256, "adamw", 1e-3, 0.01, 15, True, "bfloat16", True), rel
        assert args.mixup > 0 and args.aa.startswith("rand-"), rel
    if re.fullmatch(r"imagenet/resnet(18|50)/(srste_\dof\d|dense)\.yaml", rel):  # the SR-STE recipe
        got = (args.epochs, args.sched, args.lr, args.warmup_epochs, args.weight_decay)
        assert got == (120, "cosine", 0.1, 5, 5e-5), rel
    if "gumbel" in rel and rel.startswith("imagenet/"):
        assert args.initial_checkpoint, rel
        assert args.epochs in ((10, 30) if "convnext" in args.model else (1, 9)), rel


@pytest.mark.parametrize("rel", EXPERIMENTS)
def test_recipe(rel):
    path = CONFIGS / rel
    if rel not in HAND_WRITTEN:
        _check_header(rel, path.read_text())
    args, blocks = parse_with_config(train.build_parser(), ["--config", str(path)])  # training keys are train.py's
    recipe = load_recipe(path)
    _check_training(rel, args)
    _check_method_dir(rel, recipe)
    model = _model(args)
    intended = _intended(rel, args.model, recipe.method, _layers(model))
    try:
        sparsity.sparsify_(model, recipe)
        assert model.sparsity_skipped == {}, f"{rel}: layers left dense: {model.sparsity_skipped}"
        masked = dict(sparsity.masked_modules(model))
        assert set(masked) == intended, (f"{rel}: unexpected {sorted(set(masked) - intended)[:5]}, "
                                         f"missing {sorted(intended - set(masked))[:5]}")
        if args.model.startswith("resnet"):
            assert "conv1" not in masked and "fc" not in masked
        _check_patterns(rel, recipe, masked)
    finally:
        sparsity.densify_(model)


def test_published_figures():
    for rel, top1 in SRSTE_PUBLISHED.items():
        assert published_top1(CONFIGS / rel) == top1, rel
    assert published_top1(CONFIGS / "imagenet/vit_b16/srste/ff_2of4.yaml") is None


def test_grid_is_complete():
    def count(pattern: str) -> int:
        return len(list(CONFIGS.glob(pattern)))

    assert count("imagenet/vit_b16/*/*_*of*.yaml") == 75  # 5 methods x 3 locations x 5 patterns
    assert count("imagenet/deit_b16/*/*_*of*.yaml") == 75
    assert count("imagenet/deit_s16/*/*_*of*.yaml") == 72  # sdgf_fine 1:32 needs 256 | 384: not generated
    assert count("imagenet/swinv2_t/*/*_*of*.yaml") == 27  # sdgf_fine 1:8 needs 64 | 96: not generated
    assert count("imagenet/resnet50/srste_*.yaml") == 4
    assert count("imagenet/*/usd_75_m16.yaml") == 5 and count("cifar100/*/usd_75_m16.yaml") == 5
    assert count("imagenet/*/oneshot_2of4_permute.yaml") == 2
    assert count("imagenet/vit_b16/supermask/*.yaml") == 2
    assert count("imagenet/*/gumbel_2of4_*ep.yaml") == 10
    for name in ("imagenet/resnet18/srste_2of4.yaml", "imagenet/convnext_t/ste_2of4.yaml",
                 "imagenet/convnext_t/srste_2of4.yaml", "cifar100/resnet50/srste_2of4.yaml",
                 "cifar100/vit_b16/sdgf_fine/ff_qkv_1of32.yaml"):
        assert (CONFIGS / name).is_file(), name
    readme = (CONFIGS / "README.md").read_text()
    assert "deit_s16/sdgf_fine/ff_1of32.yaml" in readme  # the gaps are documented


def test_quickstart_per_method():
    methods = {load_recipe(CONFIGS / rel).method for rel in EXPERIMENTS if rel.startswith("quickstart/")}
    assert set(sparsity.METHODS) <= methods
    for method in ("ste", "srste", "mdgf", "sdgf", "oneshot", "gumbel"):
        for nm in ("2of4", "1of8"):
            assert (CONFIGS / f"quickstart/{method}_digits_{nm}.yaml").is_file()


def test_bases_are_used_and_readme_lists_every_recipe():
    used = set()
    for rel in EXPERIMENTS:
        path = CONFIGS / rel
        while True:
            m = re.search(r"^base: (.+)$", path.read_text(), re.M)
            if not m:
                break
            path = (path.parent / m.group(1).strip()).resolve()
            used.add(path.relative_to(CONFIGS).as_posix())
    assert set(BASES) <= used, f"unused base files: {sorted(set(BASES) - used)}"
    readme = (CONFIGS / "README.md").read_text()
    missing = [rel for rel in EXPERIMENTS if f"]({rel})" not in readme]
    assert not missing, missing


def test_generated_tree_is_up_to_date():
    gen = _generator()
    assert gen.write(gen.build(), check=True) == [], "run: python configs/_generate.py"
