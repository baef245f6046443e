#!/usr/bin/env python3
"""Sparsity-aware training on timm: ``python train.py --config configs/quickstart/vit_digits_2of4.yaml``.

Flags keep timm's names; an experiment YAML holds flat training keys plus one ``sparsity:`` block.
Precedence: defaults < YAML < command line (a true/false key set in the YAML is turned off with ``--no-<flag>``,
e.g. ``--no-amp``). Multi-process: ``./distributed_train.sh NUM_PROC --config ...``.
"""

from __future__ import annotations

import argparse

from cli_common import SWITCH, ParseKwargs, float_or_none, parse_with_config, run_cli
from sparsity.optim import OPT_IMPLS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="experiment YAML (training keys + sparsity: block)")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", type=str, help="timm model name")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra timm.create_model kwargs")
    g.add_argument("--num-classes", type=int, default=None, help="classes (default: from the data set)")
    g.add_argument("--initial-checkpoint", default="", type=str, help="dense or sparse weights to start from")
    g.add_argument("--pretrained", **SWITCH, help="start from timm's pretrained weights for --model (downloaded by "
                   "timm, or read from --pretrained-path)")
    g.add_argument("--pretrained-path", default=None, type=str,
                   help="local file of pretrained weights (.pth/.bin/.safetensors; implies --pretrained), as "
                        "timm's train.py (a new classifier for another --num-classes)")
    g.add_argument("--drop-path", type=float, default=None, help="drop path rate")
    g.add_argument("--drop-block", type=float, default=None, help="DropBlock rate (timm's ResNets)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="ImageFolder root or timm dataset root")
    g.add_argument("--dataset", default=None,
                   help="digits (embedded), '' (ImageFolder) or a timm dataset name (default: '' with --data-dir, "
                        "else digits)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--dataset-download", **SWITCH, help="let timm/torchvision download the data set")
    g.add_argument("--img-size", type=int, default=None, help="input image size")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="", type=str, help="eval resize interpolation (default: the model's)")
    g.add_argument("--train-interpolation", default="random", type=str,
                   help="training crop interpolation, as timm's train.py (random: bilinear or bicubic per image)")
    g.add_argument("-b", "--batch-size", type=int, default=64)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("-j", "--workers", type=int, default=2)
    g.add_argument("--pin-mem", **SWITCH)
    g.add_argument("--on-bad-image", default="fail", choices=["fail", "skip"], help="corrupt image in the data")
    g.add_argument("--aug-repeats", type=float, default=0,
                   help="torchrun: each image this many times per epoch, on different ranks with their own "
                        "augmentations (timm's RepeatAugSampler, as DeiT)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--color-jitter-prob", type=float, default=None, help="probability of any color jitter (timm's)")
    g.add_argument("--grayscale-prob", type=float, default=None, help="probability of random grayscale (timm's)")
    g.add_argument("--gaussian-blur-prob", type=float, default=None, help="probability of gaussian blur (timm's)")
    g.add_argument("--train-crop-mode", type=str, default=None, choices=["rrc", "rkrc", "rkrr"],
                   help="training crop: random-resized (rrc, the default) or keep-ratio resize then center (rkrc) "
                        "or random (rkrr) crop")
    g.add_argument("--aa", type=str, default=None, help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", choices=["pixel", "rand", "const"],
                   help="random erasing fill: per-pixel noise (timm's train.py), per-channel noise, or zeros")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--resplit", **SWITCH,
                   help="do not erase the first augmentation split")
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="cutmix box size as a fraction of the image, drawn in [MIN, MAX] (turns cutmix on, as timm)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup/cutmix off from this epoch on (0: never)")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--bce-loss", **SWITCH)
    g.add_argument("--bce-target-thresh", type=float, default=None,
                   help="BCE: soft targets at or above this become 1, below 0 (0.2 in timm's ResNet recipes)")
    g.add_argument("--bce-sum", **SWITCH, help="BCE: sum over the classes instead of the mean")
    g.add_argument("--bce-pos-weight", type=float, default=None, help="BCE: weight of the positive class")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="sgd", type=str)
    g.add_argument("--opt-eps", default=None, type=float)
    g.add_argument("--opt-betas", default=None, type=float, nargs="+")
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra optimizer arguments, key=value (e.g. amsgrad=True)")
    g.add_argument("--opt-impl", default="auto", choices=OPT_IMPLS,
                   help="auto: torch's fused kernel where it has one for --opt on this device (adam, adamw, sgd; "
                        "several times faster on CPU), else timm's default")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float_or_none, default=None,
                   help="clip gradients at this norm/value/factor (none: no clipping, e.g. over a recipe's value)")
    g.add_argument("--clip-mode", type=str, default="norm", choices=["norm", "value", "agc"],
                   help="gradient clipping mode, as timm's train.py")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay: each layer's lr times this to the power of its depth below the top")
    g.add_argument("--layer-decay-min-scale", type=float, default=0.0, help="floor of --layer-decay's lr scales")
    g.add_argument("--layer-decay-no-opt-scale", type=float, default=None,
                   help="freeze the layers whose --layer-decay lr scale falls below this")
    g.add_argument("--grad-accum-steps", type=int, default=1,
                   help="accumulate gradients over this many batches per optimizer step (the global batch and the "
                        "lr from --lr-base count them)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: --lr-base scaled to the global batch, as timm's train.py)")
    g.add_argument("--lr-base", type=float, default=0.1, help="lr for a global batch of --lr-base-size")
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument("--lr-base-scale", type=str, default="", choices=["", "linear", "sqrt"],
                   help="how --lr-base scales with the batch (default: sqrt for ada*/lamb optimizers, else linear)")
    g.add_argument("--sched", type=str, default="cosine",
                   choices=("cosine", "tanh", "step", "multistep", "plateau", "poly", "none"),
                   help="timm's LR schedulers; none: constant LR (no warm-up)")
    g.add_argument("--sched-on-updates", **SWITCH)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--warmup-prefix", **SWITCH)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-rate", type=float, default=0.1)
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau: epochs without improvement before a decay")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None,
                   help="noisy lr from this point of the schedule on (one value) or between two, as fractions "
                        "of it (0.5 0.9: from half way to 90%%)")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, help="the noise's limit, a fraction of the lr")
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--lr-cycle-mul", type=float, default=1.0, help="each restart's cycle is this times longer")
    g.add_argument("--lr-cycle-decay", type=float, default=0.5, help="each restart's peak lr is this times lower")
    g.add_argument("--lr-cycle-limit", type=int, default=1,
                   help="cycles of a cosine/tanh/poly schedule (more than 1: warm restarts; the run grows by them)")
    g.add_argument("--lr-k-decay", type=float, default=1.0, help="k-decay of the cosine/poly schedules")
    g.add_argument("--epochs", type=int, default=10)
    g = p.add_argument_group("training")
    g.add_argument("--amp", **SWITCH, help="mixed precision (bf16 on CPU, --amp-dtype on GPU)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    g.add_argument("--model-ema", **SWITCH)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", **SWITCH, help="ramp the EMA decay up over the first steps (timm's warm-up)")
    g.add_argument("--channels-last", **SWITCH)
    g.add_argument("--grad-checkpointing", **SWITCH,
                   help="recompute activations in the backward (timm's set_grad_checkpointing): less memory")
    g.add_argument("--sync-bn", **SWITCH, help="torchrun on GPUs: batch norm over the global batch (SyncBatchNorm)")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
                   help="torchrun: after every epoch, average the ranks' batch-norm running statistics (reduce) or "
                        "take rank 0's (broadcast); '' leaves each rank its own")
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor")
    g.add_argument("--torchcompile-mode", type=str, default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="inductor's compile mode")
    g.add_argument("--device", default=None, type=str, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--deterministic", **SWITCH, help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--skip-nonfinite", type=int, default=0, help="skip up to N steps with a non-finite loss")
    g = p.add_argument_group("output and resume")
    g.add_argument("--output", default="output", type=str, help="parent folder of the run folder")
    g.add_argument("--experiment", default="", type=str, help="run folder name (default: date-model)")
    g.add_argument("--resume", default="", type=str, help="checkpoint to resume, or 'auto' (newest in the run dir)")
    g.add_argument("--no-resume-opt", action="store_true")
    g.add_argument("--checkpoint-hist", type=int, default=2, help="epoch checkpoints kept")
    g.add_argument("--recovery-interval", type=int, default=0, help="recovery checkpoint every K steps (0: off)")
    g.add_argument("--eval-metric", default="top1", choices=["top1", "top5", "loss"],
                   help="ranks epochs for model_best/checkpoint-N (loss: lower is better)")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--log-wandb", **SWITCH)
    g.add_argument("--mask-check-interval", type=int, default=0, help="DDP: compare mask checksums every K steps")
    return p


def main(argv: list[str] | None = None) -> int:
    args, blocks = parse_with_config(build_parser(), argv)
    from sparsity.trainer import run_training

    return run_training(args, blocks.get("sparsity"), config_path=args.config)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
