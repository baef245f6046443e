"""The flags of a run beyond what argparse checks: what timm's train.py derives from them (the lr from
``--lr-base``) and the values timm or torch would refuse only mid-run, in a traceback, or accept and train on as
nonsense. :mod:`sparsity.trainer` calls both before anything is built or written."""

from __future__ import annotations

import logging

import torch

from .errors import UserError

__all__ = ["resolve_lr", "check_args", "check_dist_args"]

_logger = logging.getLogger("train")


def resolve_lr(args, world_size: int, log: bool = True) -> None:
    """As timm's train.py: without ``--lr``, the lr is ``--lr-base`` scaled by the global batch over
    ``--lr-base-size``, linearly (square root for the ada*/lamb optimizers, or as ``--lr-base-scale`` says)."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * world_size * max(args.grad_accum_steps, 1)
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    args.lr = args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)
    if log:
        _logger.info("lr %g: --lr-base %g for a batch of %d, %s-scaled to the global batch of %d (pass --lr to set "
                     "it)", args.lr, args.lr_base, args.lr_base_size, scale, global_batch)


_INTERPOLATIONS = ("", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def check_args(args) -> None:
    """Values timm/torch would only refuse mid-run, in a traceback (or accept and train on nonsense): refused
    here, before anything is built or written, naming the flag."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}")
    need(args.batch_size >= 1, f"-b must be at least 1, got {args.batch_size}")
    need(args.validation_batch_size is None or args.validation_batch_size >= 1,
         f"-vb must be at least 1, got {args.validation_batch_size}")
    need(args.workers >= 0, f"-j/--workers must be 0 or more, got {args.workers}")
    need(args.lr is None or args.lr >= 0, f"--lr must be 0 or more, got {args.lr}")
    need(args.weight_decay >= 0, f"--weight-decay must be 0 or more, got {args.weight_decay}")
    need(args.log_interval >= 1, f"--log-interval must be at least 1, got {args.log_interval}")
    need(args.aug_repeats == 0 or args.aug_repeats >= 1,
         f"--aug-repeats must be 0 (off) or at least 1 (3 in DeiT), got {args.aug_repeats}")
    need(args.grad_accum_steps >= 1, f"--grad-accum-steps must be at least 1, got {args.grad_accum_steps}")
    need(args.clip_grad is None or args.clip_grad > 0,
         f"--clip-grad must be above 0 (--clip-grad none, or leaving it out, for no clipping), got {args.clip_grad}")
    need(args.layer_decay is None or 0 < args.layer_decay <= 1,
         f"--layer-decay must be in (0, 1] (0.65 to 0.75 is usual for ViT fine-tuning), got {args.layer_decay}")
    need(0 <= args.layer_decay_min_scale <= 1,
         f"--layer-decay-min-scale must be in [0, 1], got {args.layer_decay_min_scale}")
    need(args.layer_decay_no_opt_scale is None or 0 < args.layer_decay_no_opt_scale <= 1,
         f"--layer-decay-no-opt-scale must be in (0, 1], got {args.layer_decay_no_opt_scale}")
    need(args.layer_decay is not None or (not args.layer_decay_min_scale and args.layer_decay_no_opt_scale is None),
         "--layer-decay-min-scale and --layer-decay-no-opt-scale act on --layer-decay's scales; add --layer-decay "
         "or drop them")
    need(args.lr_noise is None or (len(args.lr_noise) in (1, 2) and all(0 <= v <= 1 for v in args.lr_noise)
                                   and args.lr_noise == sorted(args.lr_noise)),
         f"--lr-noise takes one or two increasing fractions of the schedule in [0, 1] (timm multiplies them by its "
         f"length), got {args.lr_noise}")
    need(args.lr_noise_pct >= 0 and args.lr_noise_std >= 0,
         f"--lr-noise-pct and --lr-noise-std must be 0 or more, got {args.lr_noise_pct} and {args.lr_noise_std}")
    need(args.lr_cycle_limit >= 1, f"--lr-cycle-limit must be at least 1, got {args.lr_cycle_limit}")
    need(args.lr_cycle_mul > 0, f"--lr-cycle-mul must be above 0, got {args.lr_cycle_mul}")
    need(args.lr_cycle_decay > 0, f"--lr-cycle-decay must be above 0, got {args.lr_cycle_decay}")
    need(args.lr_k_decay > 0, f"--lr-k-decay must be above 0, got {args.lr_k_decay}")
    need(args.drop_block is None or 0 <= args.drop_block < 1, f"--drop-block must be in [0, 1), got {args.drop_block}")
    need(args.mixup_off_epoch >= 0, f"--mixup-off-epoch must be 0 (never) or more, got {args.mixup_off_epoch}")
    lo, hi = args.cutmix_minmax or (0.25, 0.75)
    need(0 < lo < hi <= 1, f"--cutmix-minmax takes MIN MAX with 0 < MIN < MAX <= 1 (fractions of the image side), "
                           f"got {lo} {hi}")
    need(args.bce_target_thresh is None or 0 <= args.bce_target_thresh <= 1,
         f"--bce-target-thresh must be in [0, 1], got {args.bce_target_thresh}")
    need(args.bce_pos_weight is None or args.bce_pos_weight > 0,
         f"--bce-pos-weight must be above 0, got {args.bce_pos_weight}")
    need(args.bce_loss or (args.bce_target_thresh is None and not args.bce_sum and args.bce_pos_weight is None),
         "--bce-target-thresh, --bce-sum and --bce-pos-weight shape the BCE loss; add --bce-loss or drop them")
    need(0 <= args.smoothing < 1, f"--smoothing must be in [0, 1), got {args.smoothing}")
    need(0 <= (args.drop or 0) < 1, f"--drop must be in [0, 1), got {args.drop}")
    need(args.drop_path is None or 0 <= args.drop_path < 1, f"--drop-path must be in [0, 1), got {args.drop_path}")
    need(0 <= args.model_ema_decay <= 1, f"--model-ema-decay must be in [0, 1], got {args.model_ema_decay}")
    for key in ("hflip", "vflip", "reprob", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob"):
        value = getattr(args, key, None)
        need(value is None or 0 <= value <= 1, f"--{key.replace('_', '-')} is a probability: it must be in [0, 1], "
                                               f"got {value}")
    for flag in ("warmup_epochs", "cooldown_epochs", "patience_epochs", "recovery_interval", "skip_nonfinite",
                 "mask_check_interval"):
        need(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    need(args.color_jitter >= 0, f"--color-jitter must be 0 or more, got {args.color_jitter}")
    need(0 < args.scale[0] <= args.scale[1] <= 1, f"--scale must be 0 < min <= max <= 1, got {args.scale}")
    need(0 < args.ratio[0] <= args.ratio[1], f"--ratio must be 0 < min <= max, got {args.ratio}")
    for flag in ("mean", "std"):
        v = getattr(args, flag)
        need(v is None or len(v) in (1, 3), f"--{flag} takes 1 or 3 values (one per channel), got {v}")
    need(args.std is None or all(x > 0 for x in args.std), f"--std values must be above 0, got {args.std}")
    need(args.opt_betas is None or len(args.opt_betas) >= 2,
         f"--opt-betas takes 2 values (3 for adan), got {args.opt_betas}")
    need(args.sched != "step" or args.decay_epochs > 0, f"--decay-epochs must be above 0, got {args.decay_epochs}")
    need(args.interpolation in _INTERPOLATIONS,
         f"--interpolation must be one of {', '.join(_INTERPOLATIONS[1:])}, got {args.interpolation!r}")
    need(args.train_interpolation in (*_INTERPOLATIONS, "random"),
         f"--train-interpolation must be random or one of {', '.join(_INTERPOLATIONS[1:])}, got "
         f"{args.train_interpolation!r}")
    need(args.torchcompile_mode is None or args.torchcompile == "inductor",
         f"--torchcompile-mode {args.torchcompile_mode} is inductor's: use it with --torchcompile (inductor, the "
         f"default backend), not {args.torchcompile or 'without --torchcompile'}")
    check_compile_backend(args.torchcompile)


def check_compile_backend(backend: str | None) -> None:
    """``--torchcompile NAME`` names a torch.compile backend (an unknown one fails at the first step otherwise)."""
    if backend:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise UserError(f"--torchcompile {backend}: not a torch.compile backend; use one of {', '.join(backends)}")


def check_dist_args(args, dist) -> None:
    """The flags that depend on the process count and the device (known once the process group is up)."""
    if args.aug_repeats and not dist.distributed:
        raise UserError(f"--aug-repeats {args.aug_repeats:g} needs several processes (torchrun, "
                        "distributed_train.sh): timm's sampler sends an image's repeats to different ranks; drop it "
                        "on one process")
    if args.sync_bn and dist.distributed and dist.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel); drop it: --dist-bn "
                        "reduce (the default) averages the ranks' batch-norm statistics after every epoch")
    if args.sync_bn and not dist.distributed:
        _logger.info("--sync-bn: one process, nothing to synchronise (it applies under torchrun, as in timm)")
