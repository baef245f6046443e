#!/usr/bin/env python3
"""Regenerate every experiment YAML under configs/ and configs/README.md: ``python configs/_generate.py``.

Each experiment file is a few lines on top of a ``base:`` file (names starting with ``_`` are bases, not
experiments) and starts with a header::

    # Source: <the published set-up it reproduces, or 'none' for our own>
    # Published top-1: <number from the source> | no published figure
    # <what the file trains, and any deviation from the source>

The two hand-written quickstarts (quickstart/vit_digits_2of4.yaml, quickstart/resnet_digits_2of4.yaml) are not
touched. Running the script twice gives identical files (tests/test_configs.py checks the tree is up to date).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
HAND_WRITTEN = ("quickstart/vit_digits_2of4.yaml", "quickstart/resnet_digits_2of4.yaml")
HAND_WRITTEN_ROWS = [("quickstart/vit_digits_2of4.yaml", "vit_tiny (4 blocks, 96 wide)", "ff + q/k/v 2:4"),
                     ("quickstart/resnet_digits_2of4.yaml", "resnet18", "conv 2:4 (stem, fc dense)")]
NONE = "no published figure"

PGF = ('Bambhaniya et al., "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers" (2024), '
       "reference repo abhibambhaniya/progressive_gradient_flow_nm_sparsity, vit_base_training.yaml")
SRSTE = ('Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch" (ICLR 2021), '
         "reference repo aojunzz/NM-sparsity, classification/configs/config_resnet50_2by4.yaml")
SWIN = "Swin-Transformer (microsoft/Swin-Transformer config.py defaults, swinv2_tiny_patch4_window8_256)"
CONVNEXT = 'Liu et al., "A ConvNet for the 2020s" (CVPR 2022), ImageNet-1k training recipe'
SUPERBLOCK = "SuperBlock (pytorch-labs/superblock) README: vit_b_16, --sparsity-linear 0.9 --sp-linear-tile-size T"
GUMBEL = ('"Inducing Semi-Structured Sparsity by Masking for Efficient Model Inference in Convolutional Networks" '
          "(arXiv:2411.00288): gumbel_2x4 masks fine-tuned from a dense model")
USD = "USD (unstructured then structured dynamic N:M search): --M 16 --target_sparsity 0.75, from a dense model"
ONESHOT = "NVIDIA ASP-style one-shot 2:4 pruning of a trained dense model with channel permutation, then retraining"

# The PGF grid: where the N:M pattern goes, which patterns, which gradient-flow variant.
LOCATIONS = {"ff": ["ff"], "qkv": ["qkv"], "ff_qkv": ["ff", "qkv"]}
LOCATION_TEXT = {"ff": "ff", "qkv": "q/k/v", "ff_qkv": "ff + q/k/v"}
PATTERNS = [(2, 4), (1, 4), (1, 8), (1, 16), (1, 32)]
PGF_METHODS = {
    "srste": ({"method": "srste"}, "srste"),
    "mdgf_exp": ({"method": "mdgf", "decay": {"type": "exp", "coef": 1.0e-4}}, "mdgf (exp, coef 1e-4)"),
    "mdgf_linear": ({"method": "mdgf", "decay": {"type": "linear", "coef": 2.0e-4}}, "mdgf (linear, coef 2e-4)"),
    "sdgf_sparsify": ({"method": "srste", "structure_decay": "sparsify"}, "sdgf sparsify (srste)"),
    "sdgf_fine": ({"method": "srste", "structure_decay": "fine"}, "sdgf fine (srste)"),
}
# Grouped (input) dims of the layers each location touches: a ladder whose M's lcm does not divide one of them
# would leave that layer dense, so such files are not generated (listed in the README instead).
GROUPED_DIMS = {
    "vit_base_patch16_224": {"ff": [768, 3072], "qkv": [768]},
    "deit_small_patch16_224": {"ff": [384, 1536], "qkv": [384]},
    "deit_base_patch16_224": {"ff": [768, 3072], "qkv": [768]},
    "swinv2_tiny_window8_256": {"ff": [96, 192, 384, 768, 384, 768, 1536, 3072], "qkv": [96, 192, 384, 768]},
}


@dataclass
class Experiment:
    path: str  # relative to configs/
    source: str
    published: str  # a number as text, or NONE
    notes: list[str]
    base: str
    body: dict
    model: str
    data: str
    method: str
    pattern: str


@dataclass
class Tree:
    bases: dict[str, tuple[list[str], dict]] = field(default_factory=dict)
    experiments: list[Experiment] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def base(self, path: str, comments: list[str], body: dict) -> None:
        self.bases[path] = (comments, body)

    def add(self, path: str, *, source: str, base: str, body: dict, model: str, data: str, method: str,
            pattern: str, published: str = NONE, notes: tuple[str, ...] = ()) -> None:
        rel_base = os.path.relpath(base, os.path.dirname(path))
        self.experiments.append(Experiment(path, source, published, list(notes), rel_base, body, model, data,
                                           method, pattern))


# ---------------------------------------------------------------------------------------------------------------------
# YAML writing: flat keys, flow-style rules, comments first
# ---------------------------------------------------------------------------------------------------------------------
def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n...\n").strip()  # scalars end with a document-end marker


def _dump(body: dict, indent: int = 0) -> list[str]:
    pad = " " * indent
    lines = []
    for key, value in body.items():
        if key == "rules":
            lines.append(f"{pad}rules:")
            lines += [f"{pad}  - {_flow(rule)}" for rule in value]
        elif isinstance(value, dict) and key == "sparsity":
            lines.append(f"{pad}{key}:")
            lines += _dump(value, indent + 2)
        else:
            lines.append(f"{pad}{key}: {_flow(value)}")
    return lines


def render(comments: list[str], body: dict, base: str | None = None) -> str:
    lines = []
    for c in comments:  # long notes wrap onto indented comment lines
        parts = textwrap.wrap(c, 114, break_on_hyphens=False)
        lines += [("# " if i == 0 else "#   ") + part for i, part in enumerate(parts)]
    if base:
        lines.append(f"base: {base}")
    lines += _dump(body)
    return "\n".join(lines) + "\n"


def render_experiment(e: Experiment) -> str:
    comments = [f"Source: {e.source}", f"Published top-1: {e.published}", *e.notes]
    return render(comments, e.body, e.base)


# ---------------------------------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------------------------------
def nm_rules(where: list[str], n: int, m: int) -> list[dict]:
    return [{"target": "ff" if w == "ff" else ["q", "k", "v"], "n": n, "m": m} for w in where]


CNN_DENSE_ENDS = [{"target": "stem", "skip": True}, {"target": "head", "skip": True}]
CONVNEXT_DENSE = CNN_DENSE_ENDS + [{"target": "re:.*conv_dw", "skip": True}]


def ladder_lcm(n: int, m: int, mode: str) -> int:
    if mode == "fine":
        return 8 * m
    return m


# ---------------------------------------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------------------------------------
def build() -> Tree:
    t = Tree()
    _quickstart(t)
    _imagenet_bases(t)
    _imagenet_pgf(t)
    _imagenet_cnn(t)
    _imagenet_other(t)
    _cifar100(t)
    return t


def _quickstart(t: Tree) -> None:
    common = {
        "dataset": "digits", "img_size": 32, "batch_size": 64, "workers": 0, "sched": "cosine", "warmup_epochs": 1,
        "sched_on_updates": True, "smoothing": 0.1, "scale": [0.8, 1.0], "ratio": [0.9, 1.1], "hflip": 0.0,
        "color_jitter": 0.0, "log_interval": 100, "checkpoint_hist": 1,
    }
    t.base("quickstart/_vit_digits.yaml", [
        "Base (not an experiment): the small ViT of vit_digits_2of4.yaml on the embedded digits data, no sparsity.",
    ], {"model": "vit_tiny_patch16_224",
        "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
        **common, "epochs": 20, "opt": "adamw", "lr": 3.0e-3, "weight_decay": 0.05, "clip_grad": 1.0})
    t.base("quickstart/_resnet_digits.yaml", [
        "Base (not an experiment): ResNet-18 of resnet_digits_2of4.yaml on the embedded digits data, no sparsity.",
    ], {"model": "resnet18", **common, "epochs": 10, "opt": "sgd", "lr": 0.1, "momentum": 0.9,
        "weight_decay": 5.0e-5})
    src = "none (our quickstart on the embedded digits data, about a minute on a laptop CPU)"
    vit, rn = "quickstart/_vit_digits.yaml", "quickstart/_resnet_digits.yaml"
    tiny_vit, r18 = "vit_tiny (4 blocks, 96 wide)", "resnet18"
    dense_vit_ckpt = "output/dense_digits/last.pth.tar"
    dense_rn_ckpt = "output/dense_resnet_digits/last.pth.tar"
    two_step = "Needs a dense checkpoint first: python train.py --config configs/quickstart/{} --output output " \
               "--experiment {} (or pass --initial-checkpoint PATH)."

    def q(name, base, body, model, method, pattern, notes=()):
        t.add(f"quickstart/{name}.yaml", source=src, base=base, body=body, model=model, data="digits",
              method=method, pattern=pattern, notes=notes)

    q("dense_digits", vit, {"sparsity": {"method": "dense"}}, tiny_vit, "dense", "dense",
      ["Dense baseline; its last.pth.tar is the starting point of the oneshot and supermask quickstarts."])
    q("dense_resnet_digits", rn, {"sparsity": {"method": "dense"}}, r18, "dense", "dense",
      ["Dense ResNet-18 baseline; its last.pth.tar is the starting point of the gumbel quickstarts."])
    for n, m in ((2, 4), (1, 8)):
        nm = f"{n}of{m}"
        rules = nm_rules(["ff", "qkv"], n, m)
        pat = f"ff + q/k/v {n}:{m}"
        q(f"ste_digits_{nm}", vit, {"sparsity": {"method": "ste", "finetune_fraction": 0.1, "rules": rules}},
          tiny_vit, "ste", pat)
        q(f"srste_digits_{nm}", vit, {"sparsity": {"method": "srste", "finetune_fraction": 0.1, "rules": rules}},
          tiny_vit, "srste", pat)
        q(f"mdgf_digits_{nm}", vit, {"sparsity": {
            "method": "mdgf", "decay": {"type": "exp", "coef": 0.01}, "finetune_fraction": 0.1, "rules": rules}},
          tiny_vit, "mdgf (exp, coef 0.01)", pat,
          ["beta_t = exp(-0.01 t): about 550 steps in this run, so beta reaches ~0.01 by the fine-tune phase."])
        q(f"sdgf_digits_{nm}", vit, {"sparsity": {
            "method": "srste", "structure_decay": "sparsify", "finetune_fraction": 0.1, "rules": rules}},
          tiny_vit, "sdgf sparsify (srste)", pat,
          [f"Structure decay 'sparsify': {'3:4 then 2:4' if m == 4 else '7:8, 4:8, 2:8, 1:8'} over the sparse window."])
        q(f"oneshot_digits_{nm}", vit, {"initial_checkpoint": dense_vit_ckpt, "epochs": 10, "lr": 5.0e-4,
                                        "warmup_epochs": 0, "sparsity": {
                                            "method": "oneshot", "permute": True, "permute_time_limit": 2.0,
                                            "rules": [{"target": ["ff", "qkv", "proj"], "n": n, "m": m}]}},
          tiny_vit, "oneshot (permute)", f"ff + qkv + proj {n}:{m}",
          [two_step.format("dense_digits.yaml", "dense_digits")])
        q(f"gumbel_digits_{nm}", rn, {"initial_checkpoint": dense_rn_ckpt, "epochs": 3, "lr": 0.01,
                                      "warmup_epochs": 0, "sparsity": {
                                          "method": "gumbel", "init": "magnitude", "finetune_fraction": 0.34,
                                          "rules": CNN_DENSE_ENDS + [{"target": "conv", "n": n, "m": m}]}},
          r18, "gumbel (magnitude init)", f"conv {n}:{m} (stem, fc dense)",
          [two_step.format("dense_resnet_digits.yaml", "dense_resnet_digits"),
           "Logits start from the dense weights' magnitudes (init: magnitude) and the last epoch trains the argmax",
           "masks (BatchNorm statistics gathered under sampled masks do not fit them). With the reference's uniform",
           "init, 3 epochs at this lr leave the logits near uniform and the argmax masks arbitrary: top-1 13 to 21 %."])
    q("usd_digits_75", vit, {"sparsity": {
        "method": "usd", "m": 16, "target_sparsity": 0.75, "update_interval": 10, "finetune_epochs": 5,
        "rules": [{"target": ["ff", "qkv", "proj"]}]}},
      tiny_vit, "usd", "75% (M=16, per-layer N:16)",
      ["Trains from scratch here (the reference starts from a dense model: add --initial-checkpoint to do so)."])
    q("gmp_digits_75", vit, {"sparsity": {
        "method": "gmp", "final_sparsity": 0.75, "start_fraction": 0.1, "end_fraction": 0.7, "update_interval": 20,
        "rules": [{"target": ["ff", "qkv", "proj"]}]}},
      tiny_vit, "gmp", "75% unstructured")
    q("supermask_digits_75", vit, {"initial_checkpoint": dense_vit_ckpt, "epochs": 10, "lr": 5.0e-4,
                                   "warmup_epochs": 0, "sparsity": {
                                       "method": "supermask", "sparsity_linear": 0.75, "tile_linear": 8,
                                       "rules": [{"target": ["ff", "qkv", "proj"]}]}},
      tiny_vit, "supermask", "75% tiles 8 (ff, qkv, proj)", [two_step.format("dense_digits.yaml", "dense_digits")])


def _imagenet_bases(t: Tree) -> None:
    data = {"dataset": "", "data_dir": "data/imagenet", "train_split": "train", "val_split": "val", "workers": 8,
            "pin_mem": True}
    data_note = "ImageNet-1k as an ImageFolder: data/imagenet/{train,val}/<class>/<image> (or pass --data-dir)."
    t.base("imagenet/_pgf_vit.yaml", [
        "Base (not an experiment): the ViT-B/16 from-scratch recipe of the progressive-gradient-flow (PGF) reference",
        "(vit_base_training.yaml): 350 epochs, 256 images per GPU, AdamW, lr 1e-3 for a global batch of 4096 (16 GPUs;",
        "timm's lr_base 1e-3 / lr_base_size 4096, sqrt-scaled for AdamW if your global batch differs), weight decay",
        "0.01, 15 warm-up epochs, bf16, mixup 0.5, RandAugment rand-m15-n2-p1-mstd0, BCE loss, grad clip 1.0.",
        data_note,
    ], {**data, "epochs": 350, "batch_size": 256, "opt": "adamw", "opt_eps": 1.0e-8, "lr": 1.0e-3,
        "weight_decay": 0.01, "sched": "cosine", "warmup_epochs": 15, "warmup_lr": 1.0e-7, "min_lr": 1.0e-7,
        "cooldown_epochs": 2, "clip_grad": 1.0, "drop": 0.1, "drop_path": 0.1, "amp": True, "amp_dtype": "bfloat16",
        "aa": "rand-m15-n2-p1-mstd0", "mixup": 0.5, "cutmix": 0.0, "smoothing": 0.0, "bce_loss": True,
        "checkpoint_hist": 3})
    t.base("imagenet/_swinv2.yaml", [
        "Base (not an experiment): Swin-V2-T (window 8, 256 px) with the Swin repo's default recipe, as the PGF",
        "reference did for Swin: 300 epochs, AdamW, lr 1e-3 for a global batch of 1024 (8 GPUs x 128; Swin's 5e-4",
        "per 512), weight decay 0.05, 20 warm-up epochs, grad clip 5.0, drop path 0.2, rand-m9-mstd0.5-inc1, mixup",
        "0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25.", data_note,
    ], {**data, "img_size": 256, "epochs": 300, "batch_size": 128, "opt": "adamw", "opt_eps": 1.0e-8, "lr": 1.0e-3,
        "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 20, "warmup_lr": 1.0e-6, "min_lr": 1.0e-5,
        "clip_grad": 5.0, "drop_path": 0.2, "amp": True, "amp_dtype": "bfloat16", "aa": "rand-m9-mstd0.5-inc1",
        "color_jitter": 0.4, "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "interpolation": "bicubic",
        "checkpoint_hist": 3})
    t.base("imagenet/_srste_resnet.yaml", [
        "Base (not an experiment): the SR-STE ResNet recipe (config_resnet50_2by4.yaml): 120 epochs, batch 256,",
        "SGD momentum 0.9 (plain, timm 'momentum'), lr 0.1 cosine to 0, 5 warm-up epochs from 0, weight decay 5e-5,",
        "standard crop + flip augmentation, no label smoothing.", data_note,
    ], {**data, "epochs": 120, "batch_size": 256, "opt": "momentum", "momentum": 0.9, "lr": 0.1,
        "weight_decay": 5.0e-5, "sched": "cosine", "warmup_epochs": 5, "warmup_lr": 0.0, "min_lr": 0.0,
        "color_jitter": 0.0, "smoothing": 0.0, "checkpoint_hist": 3})
    t.base("imagenet/_convnext.yaml", [
        "Base (not an experiment): the ConvNeXt ImageNet-1k recipe: 300 epochs, AdamW, lr 4e-3 for a global batch of",
        "4096, weight decay 0.05, 20 warm-up epochs, drop path 0.1 (T), rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0,",
        "label smoothing 0.1, random erasing 0.25, EMA.", data_note,
    ], {**data, "epochs": 300, "batch_size": 128, "opt": "adamw", "lr": 4.0e-3, "weight_decay": 0.05,
        "sched": "cosine", "warmup_epochs": 20, "min_lr": 1.0e-6, "drop_path": 0.1, "amp": True,
        "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
        "interpolation": "bicubic", "model_ema": True, "model_ema_decay": 0.9999, "checkpoint_hist": 3})
    t.base("imagenet/_superblock_vit.yaml", [
        "Base (not an experiment): SuperBlock's vit_b_16 command (torchvision reference recipe) in timm terms: 300",
        "epochs, 512 images per GPU (8 GPUs), AdamW lr 3e-3, weight decay 0.3, 30 linear warm-up epochs from",
        "lr x 0.033, amp, label smoothing 0.11, mixup 0.2, cutmix 1.0, RandAugment, grad clip 1, EMA.",
        "Approximations: torchvision's 'ra' policy -> timm rand-m9-n2-mstd0; --ra-sampler (3 repeats) -> timm's",
        "RepeatAugSampler, aug_repeats: 3 (torchrun only: pass --aug-repeats 0 on one process); torchvision's EMA",
        "schedule has no equivalent flag here.", data_note,
    ], {**data, "epochs": 300, "batch_size": 512, "opt": "adamw", "lr": 3.0e-3, "weight_decay": 0.3,
        "sched": "cosine", "warmup_epochs": 30, "warmup_lr": 9.9e-5, "min_lr": 0.0, "clip_grad": 1.0, "amp": True,
        "amp_dtype": "float16", "aa": "rand-m9-n2-mstd0", "mixup": 0.2, "cutmix": 1.0, "smoothing": 0.11,
        "aug_repeats": 3, "model_ema": True, "checkpoint_hist": 3})
    finetune_note = ("Starts from a dense checkpoint: replace initial_checkpoint or pass --initial-checkpoint PATH "
                     "(a stock timm state dict works).")
    t.base("imagenet/_finetune_cnn.yaml", [
        "Base (not an experiment): short fine-tune of a trained dense CNN (our hyper-parameters: SGD momentum,",
        "lr 0.01 cosine, weight decay 1e-4, batch 256, no warm-up).", finetune_note, data_note,
    ], {**data, "initial_checkpoint": "checkpoints/dense/MODEL.pth", "batch_size": 256, "opt": "momentum",
        "momentum": 0.9, "lr": 0.01, "weight_decay": 1.0e-4, "sched": "cosine", "warmup_epochs": 0, "min_lr": 0.0,
        "smoothing": 0.0, "color_jitter": 0.0, "checkpoint_hist": 2})
    t.base("imagenet/_finetune_vit.yaml", [
        "Base (not an experiment): fine-tune of a trained dense transformer (our hyper-parameters: AdamW lr 1e-4,",
        "weight decay 0.05, cosine, 2 warm-up epochs, bf16, rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, smoothing",
        "0.1, drop path 0.1).", finetune_note, data_note,
    ], {**data, "initial_checkpoint": "checkpoints/dense/MODEL.pth", "batch_size": 128, "opt": "adamw",
        "lr": 1.0e-4, "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 2, "min_lr": 1.0e-6,
        "drop_path": 0.1, "amp": True, "amp_dtype": "bfloat16", "aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8,
        "cutmix": 1.0, "smoothing": 0.1, "interpolation": "bicubic", "checkpoint_hist": 2})


PGF_MODELS = {
    "vit_b16": ("vit_base_patch16_224", "ViT-B/16"),
    "deit_s16": ("deit_small_patch16_224", "DeiT-S/16"),
    "deit_b16": ("deit_base_patch16_224", "DeiT-B/16"),
}


def _pgf_grid(t: Tree, root: str, model: str, title: str, base: str, data: str, source: str, locations, patterns,
              extra_notes=()) -> None:
    for mdir, (sp, mlabel) in PGF_METHODS.items():
        for loc in locations:
            for n, m in patterns:
                path = f"{root}/{mdir}/{loc}_{n}of{m}.yaml"
                mode = sp.get("structure_decay", "none")
                dims = GROUPED_DIMS.get(model)
                bad = [d for w in LOCATIONS[loc] for d in (dims or {}).get(w, []) if d % ladder_lcm(n, m, mode)]
                if bad:
                    t.skipped.append((path, f"the '{mode}' ladder for {n}:{m} needs grouped dims divisible by "
                                            f"{ladder_lcm(n, m, mode)}; {model} has {sorted(set(bad))}"))
                    continue
                body = {"model": model, "sparsity": {**sp, "rules": nm_rules(LOCATIONS[loc], n, m)}}
                t.add(path, source=source, base=base, body=body, model=title, data=data, method=mlabel,
                      pattern=f"{LOCATION_TEXT[loc]} {n}:{m}",
                      notes=[f"{title}, {mlabel}, N:M {n}:{m} on {LOCATION_TEXT[loc]}; other layers dense.",
                             *extra_notes])


def _imagenet_pgf(t: Tree) -> None:
    for short, (model, title) in PGF_MODELS.items():
        src = PGF if short == "vit_b16" else PGF + " (its ViT-B recipe applied to " + title + ")"
        t.add(f"imagenet/{short}/dense.yaml", source=src, base="imagenet/_pgf_vit.yaml",
              body={"model": model, "sparsity": {"method": "dense"}}, model=title, data="ImageNet-1k",
              method="dense", pattern="dense", notes=[f"{title} dense baseline under the same recipe."])
        _pgf_grid(t, f"imagenet/{short}", model, title, "imagenet/_pgf_vit.yaml", "ImageNet-1k", src, LOCATIONS,
                  PATTERNS)
    src = f"{SWIN}; N:M methods of {PGF}"
    t.add("imagenet/swinv2_t/dense.yaml", source=SWIN, base="imagenet/_swinv2.yaml",
          body={"model": "swinv2_tiny_window8_256", "sparsity": {"method": "dense"}}, model="Swin-V2-T",
          data="ImageNet-1k", method="dense", pattern="dense", published="81.8",
          notes=["Swin-V2-T/8 (256 px) dense baseline; 81.8 is the Swin-V2 model zoo figure."])
    _pgf_grid(t, "imagenet/swinv2_t", "swinv2_tiny_window8_256", "Swin-V2-T", "imagenet/_swinv2.yaml",
              "ImageNet-1k", src, LOCATIONS, [(2, 4), (1, 8)])


SRSTE_PUBLISHED = {("resnet50", 2, 4): "77.0", ("resnet50", 4, 8): "77.4", ("resnet50", 1, 4): "75.9",
                   ("resnet50", 2, 8): "76.4", ("resnet18", 2, 4): "71.2"}


def _imagenet_cnn(t: Tree) -> None:
    for model, title, pats, dense_pub in (("resnet50", "ResNet-50", [(2, 4), (4, 8), (1, 4), (2, 8)], NONE),
                                          ("resnet18", "ResNet-18", [(2, 4)], "71.3")):
        t.add(f"imagenet/{model}/dense.yaml", source=SRSTE, base="imagenet/_srste_resnet.yaml",
              body={"model": model, "sparsity": {"method": "dense"}}, model=title, data="ImageNet-1k",
              method="dense", pattern="dense", published=dense_pub,
              notes=[f"{title} dense baseline under the SR-STE recipe."])
        for n, m in pats:
            t.add(f"imagenet/{model}/srste_{n}of{m}.yaml", source=SRSTE, base="imagenet/_srste_resnet.yaml",
                  body={"model": model, "sparsity": {"method": "srste", "srste_lambda": 2.0e-4, "rules": CNN_DENSE_ENDS
                                                     + [{"target": "conv", "n": n, "m": m}]}},
                  model=title, data="ImageNet-1k", method="srste", pattern=f"conv {n}:{m} (stem, fc dense)",
                  published=SRSTE_PUBLISHED[(model, n, m)],
                  notes=[f"{title}, SR-STE {n}:{m} on every conv but the first (stem) and the fc (head), which stay "
                         "dense as in the paper."])
    t.add("imagenet/convnext_t/dense.yaml", source=CONVNEXT, base="imagenet/_convnext.yaml",
          body={"model": "convnext_tiny", "sparsity": {"method": "dense"}}, model="ConvNeXt-T", data="ImageNet-1k",
          method="dense", pattern="dense", published="82.1", notes=["ConvNeXt-T dense baseline (paper: 82.1)."])
    for method in ("ste", "srste"):
        t.add(f"imagenet/convnext_t/{method}_2of4.yaml", source=f"{CONVNEXT}; {method} from {SRSTE}",
              base="imagenet/_convnext.yaml",
              body={"model": "convnext_tiny", "sparsity": {"method": method, "rules": CONVNEXT_DENSE + [
                  {"target": ["ff", "conv"], "n": 2, "m": 4}]}},
              model="ConvNeXt-T", data="ImageNet-1k", method=method, pattern="ff + conv 2:4 (stem, dw, head dense)",
              notes=[f"ConvNeXt-T, {method} 2:4 on the MLP linears and the downsampling convs; stem, depthwise 7x7 "
                     "convs (1 input channel per group) and head dense."])


def _imagenet_other(t: Tree) -> None:
    # Supermask (SuperBlock) ViT-B/16 from scratch
    for tile in (32, 64):
        t.add(f"imagenet/vit_b16/supermask/linear_90_tile{tile}.yaml", source=SUPERBLOCK,
              base="imagenet/_superblock_vit.yaml",
              body={"model": "vit_base_patch16_224", "sparsity": {
                  "method": "supermask", "sparsity_linear": 0.9, "tile_linear": tile, "rules": [{"target": "linear"}]}},
              model="ViT-B/16", data="ImageNet-1k", method="supermask", pattern=f"linear 90% tiles {tile}",
              notes=[f"Learned {tile}x{tile} tile masks at 90% on every Linear (head included, as without "
                     "--skip-last-layer-sparsity); the patch-embedding conv stays dense.",
                     "The SuperBlock README's Acc@1 0.088 line is an evaluation-script example, not a result."])
    # Gumbel 2:4 fine-tunes from dense CNNs
    gumbel_note = ("Reference defaults kept: tau 1.0, uniform logits, trainable all, grouped convs ignored. "
                   "Training hyper-parameters are ours.")
    for model, title, budgets, base in (
            ("resnet18", "ResNet-18", (1, 9), "imagenet/_finetune_cnn.yaml"),
            ("resnet34", "ResNet-34", (1, 9), "imagenet/_finetune_cnn.yaml"),
            ("resnet50", "ResNet-50", (1, 9), "imagenet/_finetune_cnn.yaml"),
            ("convnext_tiny", "ConvNeXt-T", (10, 30), "imagenet/_finetune_vit.yaml"),
            ("convnext_small", "ConvNeXt-S", (10, 30), "imagenet/_finetune_vit.yaml")):
        short = model.replace("convnext_tiny", "convnext_t").replace("convnext_small", "convnext_s")
        conv = model.startswith("convnext")
        rules = (CONVNEXT_DENSE + [{"target": ["ff", "conv"], "n": 2, "m": 4}] if conv
                 else CNN_DENSE_ENDS + [{"target": "conv", "n": 2, "m": 4}])
        for epochs in budgets:
            notes = [f"{title} fine-tuned {epochs} epochs from a dense checkpoint with Gumbel 2:4 masks; " +
                     ("MLP linears and downsampling convs masked (the reference skips nn.Linear unless "
                      "--override-ignore-linear), stem, depthwise convs and head dense." if conv
                      else "every conv but the stem masked, fc dense."), gumbel_note]
            if model == "convnext_small":
                notes.append("Budgets as ConvNeXt-T (the paper's ConvNeXt-S budget is not restated here).")
            t.add(f"imagenet/{short}/gumbel_2of4_{epochs}ep.yaml", source=GUMBEL, base=base,
                  body={"model": model, "initial_checkpoint": f"checkpoints/dense/{model}.pth", "epochs": epochs,
                        "sparsity": {"method": "gumbel", "tau": 1.0, "init": "uniform", "trainable": "all",
                                     "ignore_grouped": True, "rules": rules}},
                  model=title, data="ImageNet-1k", method="gumbel",
                  pattern="ff + conv 2:4" if conv else "conv 2:4 (stem, fc dense)", notes=notes)
    # USD and one-shot from dense
    for short, model, title in USD_MODELS:
        cnn = model.startswith("resnet")
        t.add(f"imagenet/{short}/usd_75_m16.yaml", source=USD,
              base="imagenet/_finetune_cnn.yaml" if cnn else "imagenet/_finetune_vit.yaml",
              body={"model": model, "initial_checkpoint": f"checkpoints/dense/{model}.pth", **USD_SCHEDULE,
                    "sparsity": usd_block(cnn)},
              model=title, data="ImageNet-1k", method="usd", pattern="75% (M=16, per-layer N:16)", notes=USD_NOTES)
    for short, model, title, rules, pattern in (
            ("resnet50", "resnet50", "ResNet-50", CNN_DENSE_ENDS + [{"target": "conv", "n": 2, "m": 4}],
             "conv 2:4 (stem, fc dense)"),
            ("vit_b16", "vit_base_patch16_224", "ViT-B/16", [{"target": ["ff", "qkv", "proj"], "n": 2, "m": 4}],
             "ff + qkv + proj 2:4")):
        cnn = model.startswith("resnet")
        t.add(f"imagenet/{short}/oneshot_2of4_permute.yaml", source=ONESHOT,
              base="imagenet/_finetune_cnn.yaml" if cnn else "imagenet/_finetune_vit.yaml",
              body={"model": model, "initial_checkpoint": f"checkpoints/dense/{model}.pth", "epochs": 30,
                    "sparsity": {"method": "oneshot", "permute": True, "permute_time_limit": 30.0, "rules": rules}},
              model=title, data="ImageNet-1k", method="oneshot (permute)", pattern=pattern,
              notes=[f"{title}: prune a trained dense model to 2:4 once (after channel permutation), then retrain "
                     "30 epochs with the mask frozen (budget ours)."])


USD_MODELS = [("resnet50", "resnet50", "ResNet-50"), ("deit_s16", "deit_small_patch16_224", "DeiT-S/16"),
              ("deit_b16", "deit_base_patch16_224", "DeiT-B/16"), ("vit_b16", "vit_base_patch16_224", "ViT-B/16"),
              ("swin_t", "swin_tiny_patch4_window7_224", "Swin-T")]
USD_SCHEDULE = {"epochs": 90, "sched": "multistep", "decay_milestones": [30, 60], "decay_rate": 0.1}
USD_NOTES = ["USD search to 75% with M=16 (N per layer from 16, 8, 4, 2, 1), weight penalty on, 15 fine-tune "
             "epochs (--epoch_rfap 15), lr x0.1 at epochs 30 and 60 (the reference's --schedule default); the "
             "other training hyper-parameters are ours."]


def usd_block(cnn: bool) -> dict:
    rules = CNN_DENSE_ENDS + [{"target": "conv"}] if cnn else [{"target": ["ff", "qkv", "proj"]}]
    return {"method": "usd", "m": 16, "target_sparsity": 0.75, "update_interval": 100, "erk": True,
            "alpha_target_sparsity": 0.9, "with_weight_penalty": True, "finetune_epochs": 15, "rules": rules}


def _cifar100(t: Tree) -> None:
    data = {"dataset": "torch/cifar100", "data_dir": "data/cifar100", "dataset_download": False, "img_size": 32,
            "crop_pct": 1.0, "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762],
            "scale": [0.5, 1.0], "workers": 4}
    data_note = ("CIFAR-100 through torchvision at data/cifar100; dataset_download is false: pass "
                 "--dataset-download to fetch it where a network exists.")
    t.base("cifar100/_vit.yaml", [
        "Base (not an experiment): the PGF reference's CIFAR ViT-B recipe (vit_b_train.yaml, CIFAR-10) on CIFAR-100",
        "at 32x32: 100 epochs, batch 64, AdamW lr 1e-4, weight decay 0.05, 10 warm-up epochs, mixup 0.5,",
        "rand-m15-n2-p1-mstd0, BCE, grad clip 1.0. Models use model_kwargs img_size 32, patch_size 4 (8x8 tokens).",
        data_note,
    ], {**data, "epochs": 100, "batch_size": 64, "opt": "adamw", "opt_eps": 1.0e-8, "lr": 1.0e-4,
        "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 10, "warmup_lr": 5.0e-7, "min_lr": 5.0e-7,
        "cooldown_epochs": 5, "clip_grad": 1.0, "drop": 0.1, "drop_path": 0.1, "amp": True, "amp_dtype": "bfloat16",
        "aa": "rand-m15-n2-p1-mstd0", "mixup": 0.5, "smoothing": 0.0, "bce_loss": True, "checkpoint_hist": 2})
    t.base("cifar100/_resnet.yaml", [
        "Base (not an experiment): the SR-STE ResNet recipe (120 epochs, batch 256, SGD momentum, lr 0.1 cosine,",
        "5 warm-up epochs, weight decay 5e-5) on CIFAR-100 at 32x32 with timm's ImageNet stem (expect lower accuracy",
        "than CIFAR-specific ResNets).", data_note,
    ], {**data, "epochs": 120, "batch_size": 256, "opt": "momentum", "momentum": 0.9, "lr": 0.1,
        "weight_decay": 5.0e-5, "sched": "cosine", "warmup_epochs": 5, "warmup_lr": 0.0, "min_lr": 0.0,
        "color_jitter": 0.0, "smoothing": 0.0, "checkpoint_hist": 2})
    vit_kwargs = {"img_size": 32, "patch_size": 4}
    src_vit = "adapted from " + PGF.replace("vit_base_training.yaml", "vit_b_train.yaml (CIFAR)")
    src_rn = "adapted from " + SRSTE
    for short, model, title in (("vit_b16", "vit_base_patch16_224", "ViT-B (4x4 patches)"),
                                ("deit_s16", "deit_small_patch16_224", "DeiT-S (4x4 patches)"),
                                ("deit_b16", "deit_base_patch16_224", "DeiT-B (4x4 patches)")):
        t.add(f"cifar100/{short}/dense.yaml", source=src_vit, base="cifar100/_vit.yaml",
              body={"model": model, "model_kwargs": vit_kwargs, "sparsity": {"method": "dense"}}, model=title,
              data="CIFAR-100", method="dense", pattern="dense", notes=[f"{title} dense baseline at 32x32."])
    t.add("cifar100/swin_t/dense.yaml", source=src_vit, base="cifar100/_vit.yaml",
          body={"model": "swin_tiny_patch4_window7_224", "model_kwargs": {"img_size": 32, "window_size": 4},
                "sparsity": {"method": "dense"}},
          model="Swin-T (window 4)", data="CIFAR-100", method="dense", pattern="dense",
          notes=["Swin-T dense baseline at 32x32 (4x4 patches, window 4)."])
    for mdir, (sp, mlabel) in PGF_METHODS.items():
        for n, m in PATTERNS:
            t.add(f"cifar100/vit_b16/{mdir}/ff_qkv_{n}of{m}.yaml", source=src_vit, base="cifar100/_vit.yaml",
                  body={"model": "vit_base_patch16_224", "model_kwargs": vit_kwargs,
                        "sparsity": {**sp, "rules": nm_rules(["ff", "qkv"], n, m)}},
                  model="ViT-B (4x4 patches)", data="CIFAR-100", method=mlabel, pattern=f"ff + q/k/v {n}:{m}",
                  notes=[f"ViT-B on 32x32 CIFAR-100, {mlabel}, N:M {n}:{m} on ff and q/k/v."])
    for model, title, pats in (("resnet50", "ResNet-50", [(2, 4), (4, 8), (1, 4), (2, 8)]),
                               ("resnet18", "ResNet-18", [(2, 4)])):
        t.add(f"cifar100/{model}/dense.yaml", source=src_rn, base="cifar100/_resnet.yaml",
              body={"model": model, "sparsity": {"method": "dense"}}, model=title, data="CIFAR-100",
              method="dense", pattern="dense", notes=[f"{title} dense baseline on CIFAR-100."])
        for n, m in pats:
            t.add(f"cifar100/{model}/srste_{n}of{m}.yaml", source=src_rn, base="cifar100/_resnet.yaml",
                  body={"model": model, "sparsity": {"method": "srste", "rules": CNN_DENSE_ENDS + [
                      {"target": "conv", "n": n, "m": m}]}},
                  model=title, data="CIFAR-100", method="srste", pattern=f"conv {n}:{m} (stem, fc dense)",
                  notes=[f"{title}, SR-STE {n}:{m} on every conv but the stem; fc dense."])
    for short, model, title in USD_MODELS:
        cnn = model.startswith("resnet")
        kwargs = {} if cnn else ({"model_kwargs": {"img_size": 32, "window_size": 4}} if "swin" in model
                                 else {"model_kwargs": vit_kwargs})
        t.add(f"cifar100/{short}/usd_75_m16.yaml", source=USD,
              base="cifar100/_resnet.yaml" if cnn else "cifar100/_vit.yaml",
              body={"model": model, **kwargs, "initial_checkpoint": f"output/cifar100-{short}-dense/last.pth.tar",
                    **USD_SCHEDULE, "lr": 0.01 if cnn else 5.0e-5, "warmup_epochs": 0, "sparsity": usd_block(cnn)},
              model=title, data="CIFAR-100", method="usd", pattern="75% (M=16, per-layer N:16)",
              notes=[*USD_NOTES, f"Dense start: train cifar100/{short}/dense.yaml with --output output --experiment "
                                 f"cifar100-{short}-dense first (or pass --initial-checkpoint)."])


# ---------------------------------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------------------------------
SECTIONS = [("quickstart/", "Quick starts (embedded digits data, CPU)"), ("imagenet/", "ImageNet-1k"),
            ("cifar100/", "CIFAR-100")]


def readme(tree: Tree) -> str:
    head = (ROOT / "_readme_head.md").read_text()
    lines = [head.rstrip(), ""]
    lines.append(f"## Every recipe ({len(tree.experiments) + len(HAND_WRITTEN)} files)")
    lines.append("")
    for prefix, title in SECTIONS:
        exps = [e for e in tree.experiments if e.path.startswith(prefix)]
        lines += [f"### {title}", "", "| model | data | method | pattern | published top-1 | file |",
                  "|---|---|---|---|---|---|"]
        if prefix == "quickstart/":  # the two hand-written quick starts come first
            lines += [f"| {model} | digits | srste | {pattern} | — | [{rel}]({rel}) |"
                      for rel, model, pattern in HAND_WRITTEN_ROWS]
        for e in exps:
            pub = e.published if e.published != NONE else "—"
            lines.append(f"| {e.model} | {e.data} | {e.method} | {e.pattern} | {pub} | [{e.path}]({e.path}) |")
        lines.append("")
    if tree.skipped:
        lines += ["## Combinations not generated", "",
                  "These grid points cannot be realized as written: some selected layers would stay dense, so the "
                  "file would not train what its name says.", "", "| file | why |", "|---|---|"]
        lines += [f"| {p} | {why} |" for p, why in tree.skipped]
        lines.append("")
    return "\n".join(lines)


def write(tree: Tree, check: bool = False) -> list[str]:
    """Write (or with ``check`` only compare) every generated file; returns the paths that differ."""
    outputs = {p: render(c, b) for p, (c, b) in tree.bases.items()}
    outputs.update({e.path: render_experiment(e) for e in tree.experiments})
    outputs["README.md"] = readme(tree)
    stale = []
    for rel, text in outputs.items():
        path = ROOT / rel
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    generated = set(outputs) | set(HAND_WRITTEN)
    for path in ROOT.rglob("*.yaml"):  # generated files that the grid no longer produces
        rel = path.relative_to(ROOT).as_posix()
        if rel not in generated and path.read_text().startswith(("# Source:", "# Base (not an experiment)")):
            stale.append(rel)
            if not check:
                path.unlink()
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if any generated file is stale")
    args = p.parse_args(argv)
    tree = build()
    stale = write(tree, check=args.check)
    if args.check:
        for rel in stale:
            print(f"stale: configs/{rel}")
        return 1 if stale else 0
    n = len(tree.experiments)
    print(f"configs/: {n} experiments, {len(tree.bases)} base files, README.md "
          f"({len(stale)} files changed, {len(tree.skipped)} grid points not generated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
