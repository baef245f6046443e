"""Wiring behind train.py: data, model, controller, optimizer, EMA, the loop, summary, plots (the run's files,
checkpoints and resume rules are in :mod:`sparsity.run_files`).

Order (issue 3): create model -> sparsify_ -> (resume) -> controller first step -> optimizer/EMA/compile/DDP.
Everything that can be wrong with the input is checked before the run folder is created.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint_file, save_atomic
from .controller import SparsityController
from .data import (
    DataError,
    build_dataset,
    check_same_classes,
    evaluates_on_training_images,
    num_classes_of,
    resolve_data,
    resolve_dataset,
    timm_pillow_compat,
)
from .distributed import (
    DistInfo,
    bn_stats,
    check_ranks_consistent,
    has_bn_stats,
    init_distributed,
    load_bn_stats,
)
from .engine import NonFiniteLossError, TrainState, evaluate, mean_lr, train_one_epoch
from .errors import TrainingError, UserError, one_line
from .factory import check_input_size, create_model, set_grad_checkpointing
from .faults import fault_loss, fault_matches, inject_fault
from .layers import masked_modules, to_channels_last
from .optim import MaskedAdamW, attach_masks, check_optimizer, create_optimizer
from .recipe import dump_yaml, plain, recipe_from_dict
from .report import sparsity_report, target_problem
from .run_args import check_args, check_dist_args, resolve_lr
from .run_files import (
    RunLock,
    _check_same_run,
    _checkpoint_files,
    _claim_best,
    _resume_rng,
    _rng_state,
    _run_dir,
    _save_epoch,
    _seed_all,
    _set_rng_state,
    check_writable,
    claim_run_dir,
    finish_epoch_files,
    load_newest_checkpoint,
    newest_checkpoint,
    resolved_config,
    resumes_in_place,
    run_epochs,
    settle_last,
)
from .run_outputs import (
    append_summary,
    explain_write_errors,
    final_table,
    init_wandb,
    plots,
    truncate_summary,
    write_report,
)
from .stop import StopSignals, TrainingStopped

__all__ = ["run_training", "build_loaders", "resolve_data"]

_logger = logging.getLogger("train")


# ---------------------------------------------------------------------------------------------------------------------
# data and model checks
# ---------------------------------------------------------------------------------------------------------------------
def build_datasets(args):
    img = args.img_size or 32
    train_ds = build_dataset(args.dataset, args.data_dir, args.train_split, True, args.dataset_download, img,
                             args.on_bad_image)
    val_ds = build_dataset(args.dataset, args.data_dir, args.val_split, False, args.dataset_download, img,
                           args.on_bad_image)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UserError(f"data set {args.dataset or args.data_dir} has an empty split; check --data-dir and splits")
    check_same_classes(train_ds, val_ds, args.data_dir)
    if evaluates_on_training_images(args.dataset, args.data_dir, args.train_split, args.val_split):
        why = ("its --train-split and --val-split are the same folder" if args.train_split == args.val_split else
               "it has no split folders (train/ and validation/ or val/)")
        _logger.warning("--data-dir %s: %s, so every epoch is evaluated on the training images themselves and top-1 "
                        "overstates the model; add a validation/ folder of held-out images", args.data_dir, why)
    return train_ds, val_ds


def build_loaders(args, data_cfg: dict, train_ds, val_ds, dist: DistInfo):
    from timm.data import create_loader

    timm_pillow_compat()

    common = dict(input_size=data_cfg["input_size"], interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
                  std=data_cfg["std"], num_workers=args.workers, distributed=dist.distributed,
                  pin_memory=args.pin_mem, device=dist.device, use_prefetcher=False, persistent_workers=False)
    train = None
    if train_ds is not None:
        # as timm's train.py: the training crop's own interpolation (random by default), timm's erasing flags
        interp = data_cfg["interpolation"] if args.no_aug or not args.train_interpolation else args.train_interpolation
        newer = {k: getattr(args, k) for k in ("color_jitter_prob", "grayscale_prob", "gaussian_blur_prob",
                                               "train_crop_mode") if getattr(args, k, None) is not None}
        try:
            train = create_loader(train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
                                  re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                                  re_split=args.resplit, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                                  vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
                                  num_aug_repeats=args.aug_repeats, **newer, **{**common, "interpolation": interp})
        except (AssertionError, KeyError, ValueError) as e:  # timm's own checks of the augmentation settings
            raise UserError(f"timm cannot build the training transform from these settings ({type(e).__name__}: "
                            f"{str(e).strip() or 'rejected'}); check --aa {args.aa!r}, --reprob/--remode, --scale, "
                            "--ratio, --hflip/--vflip, --color-jitter and the --*-prob settings") from None
    val = create_loader(val_ds, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                        crop_pct=data_cfg["crop_pct"], **common)
    if args.workers == 0:  # timm's iterable readers (wds/, tfds/) count their length per worker: with no workers
        for ds in (train_ds, val_ds):  # it read 0 (and the run stopped: "0 images"); the main process is the one
            if ds is not None and hasattr(ds, "set_loader_cfg"):  # worker that reads them, so say so
                ds.set_loader_cfg(num_workers=1)
    return train, val


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------
def _loss_fns(args, mixup_active: bool):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active:  # as timm's train.py: smoothing is in the mixed soft targets
        train = BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    elif args.bce_loss:
        train = BinaryCrossEntropy(smoothing=args.smoothing, **bce)
    elif args.smoothing:
        train = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train = nn.CrossEntropyLoss()
    return train, nn.CrossEntropyLoss()


def _results_of(run_dir: Path, final_ckpt: dict) -> bool:
    """Whether ``run_dir/results.json`` is the one the end of training wrote after ``final_ckpt`` (last.pth.tar):
    both carry the same wall time, one figure. A crash between the two writes leaves an older file or none."""
    import json

    try:
        saved = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return saved.get("wall_time_s") == final_ckpt.get("wall_time_s")


def _check_same_ema(resume: dict, path: str, args) -> None:
    """A resume in the run's own folder keeps the run's ``--model-ema`` setting: without the flag the EMA weights
    would be dropped from its checkpoints; either way model_best's ranking (by the EMA's metric or the live one)
    would start over, so the next epoch would replace model_best whatever it scores, and a finished run (nothing
    left to train) would rewrite last.pth.tar, model_best and results.json. Resuming into another ``--experiment``
    writes elsewhere and may change it."""
    had_ema = isinstance(resume.get("state_dict_ema"), dict)
    if had_ema == bool(args.model_ema):
        return
    if had_ema:
        raise CheckpointError(f"--resume {path} was trained with --model-ema: resuming it in its folder without the "
                              "flag would drop the EMA weights from its checkpoints and re-rank model_best by the live "
                              "weights; add --model-ema (with the run's --model-ema-decay), or resume into another "
                              "--experiment")
    raise CheckpointError(f"--resume {path} was trained without --model-ema: resuming it in its folder with the flag "
                          "would start model_best's ranking over (the next epoch would replace it whatever it scores) "
                          "and rewrite the run's results around the EMA; drop --model-ema, or resume into another "
                          "--experiment")


def _optimizer(args, ctl: SparsityController, is_main: bool, distributed: bool = False):
    from timm.optim import optimizer_kwargs

    kwargs = {k: v for k, v in optimizer_kwargs(cfg=args).items() if not k.startswith("layer_decay")}  # in groups
    groups = ctl.param_groups(args.weight_decay, layer_decay=args.layer_decay,
                              layer_decay_min_scale=args.layer_decay_min_scale,
                              layer_decay_no_opt_scale=args.layer_decay_no_opt_scale)
    optimizer, impl = create_optimizer(groups, impl=args.opt_impl, **kwargs, **(args.opt_kwargs or {}))
    # SR-STE's decay joins the optimizer's pass unless clipping reads the gradient in between (no scaler on CPU)
    # or gradients are summed (DDP, accumulation: bit for bit the same training only with the decay per backward)
    why = attach_masks(optimizer, ctl, srste_decay=not args.clip_grad and not distributed
                       and args.grad_accum_steps == 1)
    if why is None:
        decay = getattr(optimizer, "_decay_for", None) is not None
        note = f", the next masks{' and SR-STE decay' if decay else ''} computed in its pass"
    elif getattr(ctl.method, "optimizer_masks", None) is not None and all(
            layer.weight.device.type == "cpu" for _, layer in ctl.layers):
        note = f"; masks in their own pass ({why})"  # an N:M run on CPU that could have had them in the optimizer's
    else:
        note = ""
    if is_main:
        _logger.info("optimizer: %s (%s implementation, --opt-impl %s)%s",
                     "AdamW" if why is None else type(optimizer).__name__, impl, args.opt_impl, note)
    return optimizer


def _num_classes(args, train_ds) -> int:
    found = num_classes_of(train_ds)
    n = args.num_classes or found
    if not n:
        raise UserError("cannot infer the number of classes from the data set; pass --num-classes")
    if found and n < found:
        raise UserError(f"--num-classes {n} is fewer than the {found} classes of the training data; drop it (the "
                        "data's count is the default) or pass at least that many")
    return n


def run_training(args, sparsity_block: dict | None, config_path: str | None = None) -> int:
    lock = RunLock()  # one process per run folder: held while the checkpoint to resume is chosen, to the end
    try:
        return _run_training(args, sparsity_block, config_path, lock)
    except BaseException:
        lock.discard_unused_folder()  # a new run that failed before writing anything of its own leaves no folder
        raise
    finally:
        lock.release()  # a run refused before its first write there leaves no lock file behind


def _run_training(args, sparsity_block: dict | None, config_path: str | None, lock: RunLock) -> int:
    from cli_common import setup_logging

    dist = init_distributed(args.device)
    setup_logging(dist.is_main)
    recipe = recipe_from_dict(sparsity_block or {}, source=config_path or "the command line")
    resolve_dataset(args)
    resolve_lr(args, dist.world_size, dist.is_main and not args.print_config)
    check_args(args)
    if args.print_config:
        print(dump_yaml(resolved_config(args, recipe), sort_keys=False))
        return 0
    check_dist_args(args, dist)  # after --print-config: a torchrun recipe prints on one process too
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    # one seed on every rank: model, EMA copy and method state start identical; every epoch reseeds per rank below
    _seed_all(args.seed)

    # ---- everything that can fail on bad input, before anything is written -------------------------------------
    train_ds, val_ds = build_datasets(args)
    num_classes = _num_classes(args, train_ds)
    create_kwargs = dict(args.model_kwargs or {})
    create_kwargs["num_classes"] = num_classes
    for flag, key, value in (("--drop", "drop_rate", args.drop or None), ("--drop-path", "drop_path_rate",
                                                                           args.drop_path),
                             ("--drop-block", "drop_block_rate", args.drop_block)):
        if value is None:
            continue
        if key in create_kwargs and create_kwargs[key] != value:  # timm's create_model would refuse the pair too
            raise UserError(f"{flag} {value} and model_kwargs {key}={create_kwargs[key]} disagree; set one of them")
        create_kwargs[key] = value
    # what can be refused from the flags and files alone is refused before the model (and its layer table) is built
    check_optimizer(args.opt, args.opt_impl, args.opt_kwargs)
    if args.initial_checkpoint and not args.resume and not Path(args.initial_checkpoint).exists():
        raise CheckpointError(f"initial_checkpoint {args.initial_checkpoint} does not exist: pass --initial-checkpoint "
                              "PATH, or train the model it names first (a quickstart recipe's comment says how)")
    if args.resume == "auto" and not args.experiment:
        raise UserError("--resume auto needs --experiment NAME: the run folder to continue (without it every run "
                        "gets a new, time-stamped folder, and nothing would ever be resumed)")
    n_epochs = run_epochs(args, recipe)
    resume_path = args.resume if args.resume and args.resume != "auto" else None
    run_dir = _run_dir(args, resume_path)
    in_place = resumes_in_place(args, resume_path)
    if in_place and dist.is_main and run_dir.is_dir():  # the checkpoint to resume is chosen under the run's lock:
        lock.acquire(run_dir)  # a job still writing there (a requeue racing it) is refused before anything is read
    resume = load_checkpoint_file(resume_path) if resume_path else None
    if args.resume == "auto":
        found = load_newest_checkpoint(run_dir) if (dist.is_main and run_dir.exists()) else None
        if dist.distributed:  # rank 0 chose, under the lock; every rank resumes that file
            shared = [str(found[0]) if found else ""]
            torch.distributed.broadcast_object_list(shared, src=0)
            if not dist.is_main and shared[0]:
                found = (Path(shared[0]), load_checkpoint_file(shared[0]))
        if found:
            resume_path, resume = str(found[0]), found[1]
            _logger.info("--resume auto: resuming from %s", resume_path)
        elif run_dir.exists() and (unreadable := _checkpoint_files(run_dir)):
            names = ", ".join(p.name for p in unreadable)
            raise CheckpointError(f"--resume auto: no checkpoint in {run_dir} can be read ({names}); a new run there "
                                  "would overwrite them: move them away (or delete them) to start over, or use "
                                  "another --experiment")
        else:
            _logger.info("--resume auto: no checkpoint in %s yet; starting a new run there", run_dir)
    if resume is not None:
        if resume.get("arch") != args.model:
            raise CheckpointError(f"--resume {resume_path} is a checkpoint of '{resume.get('arch')}', not "
                                  f"'{args.model}'; resume with the same --model/--config")
        if "controller" not in resume or "next_epoch" not in resume:
            raise CheckpointError(f"--resume {resume_path} is not a checkpoint of this train.py (no sparsity or epoch "
                                  "state: a timm train.py checkpoint or bare weights?); start a run from its weights "
                                  f"with --initial-checkpoint {resume_path}")
        _check_same_run(resume, resume_path, recipe, args, n_epochs)
        if in_place:
            _check_same_ema(resume, resume_path, args)
    if resume is not None and args.initial_checkpoint:  # recipes that fine-tune name one: a resume does not need it
        _logger.info("resuming: --initial-checkpoint %s is not read (the resumed checkpoint holds the weights)",
                     args.initial_checkpoint)
    initial = load_checkpoint_file(args.initial_checkpoint) if (args.initial_checkpoint and resume is None) else None
    # as timm's train.py (load_checkpoint's use_ema=True): the EMA weights when the file holds them
    initial_ema = initial is not None and any(isinstance(initial.get(k), dict) for k in ("state_dict_ema", "model_ema"))
    pretrained = args.pretrained or bool(args.pretrained_path)  # a path alone asks for its weights too
    if pretrained and resume is not None:
        _logger.info("resuming: the pretrained weights are not loaded (the resumed checkpoint holds the weights)")
    elif pretrained and initial is not None:
        _logger.info("--initial-checkpoint %s replaces the pretrained weights it covers", args.initial_checkpoint)
    model = create_model(args.model, recipe=recipe, checkpoint=args.initial_checkpoint if initial else None,
                         use_ema=initial_ema, ckpt=initial, fresh_head=True, pretrained=pretrained and resume is None,
                         pretrained_path=args.pretrained_path, **create_kwargs)
    if resume is not None:
        try:
            model.load_state_dict(resume["state_dict"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"--resume {resume_path} does not fit this model/recipe: {str(e)[:300]}") from None
    data_cfg = resolve_data(args, model)
    side = min(data_cfg["input_size"][1:])
    if args.cutmix_minmax and int(side * args.cutmix_minmax[0]) >= int(side * args.cutmix_minmax[1]):
        raise UserError(f"--cutmix-minmax {args.cutmix_minmax[0]} {args.cutmix_minmax[1]} gives boxes of "
                        f"{int(side * args.cutmix_minmax[0])} to {int(side * args.cutmix_minmax[1])} pixels at "
                        f"{side}x{side} inputs, an empty range; widen it")
    loader_train, loader_val = build_loaders(args, data_cfg, train_ds, val_ds, dist)
    if args.aug_repeats and len(loader_train) < 1:
        per_rank = len(loader_train.sampler)
        raise UserError(f"--aug-repeats: timm's sampler gives each process {per_rank} images per epoch (the "
                        f"{len(train_ds)} training images rounded down to a multiple of 256, over {dist.world_size} "
                        f"processes), fewer than -b {args.batch_size}; lower -b or drop --aug-repeats")
    if len(loader_train) < 1:
        raise UserError(f"batch size {args.batch_size} x {dist.world_size} process(es) exceeds the training set "
                        f"({len(train_ds)} images; the last partial batch is dropped): lower -b")
    # optimizer steps per epoch, as timm's train.py counts them with --grad-accum-steps (a shorter last window)
    steps_per_epoch = -(-len(loader_train) // args.grad_accum_steps)
    if resume is not None and resume.get("steps_per_epoch") not in (None, steps_per_epoch):
        raise CheckpointError(f"--resume {resume_path} was written with {resume['steps_per_epoch']} steps per epoch, "
                              f"this run has {steps_per_epoch} (another -b, --grad-accum-steps or number of "
                              "processes): the schedules would jump; resume with the run's batch size, accumulation "
                              "and process count")
    if resume is not None and in_place:  # every check a resume passes is behind it (same run, same settings)
        # the run's last.pth.tar after the end of training, at this run's length (a dense run may be extended with
        # more --epochs), and the results.json written after it: running the end again would only rewrite them
        done = [resume.get("final") is not None and Path(resume_path).name == "last.pth.tar"
                and int(resume.get("next_epoch", 0)) >= n_epochs and _results_of(run_dir, resume)]
        if dist.distributed:  # one answer for every rank: rank 0's
            torch.distributed.broadcast_object_list(done, src=0)
        if done[0]:
            if dist.is_main:
                final = resume["final"]
                metric = f"EMA top-1 {final['ema_top1']:.2f} %" if "ema_top1" in final else \
                    f"top-1 {final.get('top1', float('nan')):.2f} %"
                _logger.info("%s: run %s finished (%s; see its results.json); nothing left to train, nothing "
                             "rewritten", resume_path, run_dir.name, metric)
            if dist.distributed:
                torch.distributed.destroy_process_group()
            return 0
    model.to(dist.device)
    if args.channels_last:
        to_channels_last(model)
    check_input_size(model, data_cfg["input_size"], args.model, dist.device, args.channels_last, args.batch_size)
    if args.grad_checkpointing:
        set_grad_checkpointing(model, args.model, dist.is_main)
    if args.sync_bn and dist.distributed:  # as timm's train.py: after the move to the device, before DDP and EMA
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
        if dist.is_main:
            _logger.info("--sync-bn: batch norm statistics over the global batch (--dist-bn is not needed)")
    if dist.is_main:
        check_writable(run_dir)
        if in_place:  # already held where the folder existed; a new run takes it when it claims its folder
            lock.acquire(run_dir)
            if args.resume == "auto" and resume is None and _checkpoint_files(run_dir):
                raise UserError(f"another run wrote checkpoints into {run_dir} while this one was starting; start "
                                "this one again to resume from them")
        if in_place and resume is not None:
            lock.wrote = True  # the run's first write into its folder: from here on the lock file stays
            finish_epoch_files(run_dir, resume_path, resume, newest=args.resume == "auto")
    if n_epochs != args.epochs and dist.is_main:
        longer, off = [], []  # what lengthens the run, and the flags that would not
        if args.cooldown_epochs:
            longer.append(f"--cooldown-epochs {args.cooldown_epochs}")
            off.append("--cooldown-epochs 0")
        if (args.lr_cycle_limit or 1) > 1:
            longer.append(f"--lr-cycle-limit {args.lr_cycle_limit}")
            off.append("--lr-cycle-limit 1")
        if getattr(args, "warmup_prefix", False):
            longer.append("--warmup-prefix")
            off.append("--no-warmup-prefix")
        _logger.info("training %d epochs, the length of the lr schedule timm builds from --epochs %d with %s, as "
                     "timm's train.py does; %s trains exactly --epochs", n_epochs, args.epochs,
                     " and ".join(longer) or "these settings", " ".join(off) or "another schedule")
    if args.warmup_epochs >= n_epochs and dist.is_main:
        _logger.warning("--warmup-epochs %d covers the whole %d-epoch run: the lr never leaves its warm-up ramp (from "
                        "--warmup-lr %g); lower --warmup-epochs for a short run", args.warmup_epochs, n_epochs,
                        args.warmup_lr)
    total_steps = n_epochs * steps_per_epoch
    ctl = SparsityController(model, recipe, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    ctl.method.output_dir = str(run_dir) if dist.is_main else None
    state = TrainState()
    next_epoch, skip_batches = 0, 0
    if resume is not None:
        ctl.load_state_dict(resume["controller"])
        state.global_step = int(resume["global_step"])
        state.skipped_nonfinite = int(resume.get("skipped_nonfinite", 0))
        state.loss_sum, state.loss_count = float(resume.get("loss_sum", 0.0)), int(resume.get("loss_count", 0))
        state.extra["best"], state.extra["hist"] = resume.get("best"), resume.get("hist", [])
        ranked_by = "ema" if args.model_ema else "model"
        if state.extra["best"] is not None and resume.get("metric_model", "model") != ranked_by:
            # --model-ema turned on or off (or a checkpoint from before EMA ranking): the saved ranking compares
            # the other model's metric; start a new one (checkpoint-<epoch> files already written stay)
            _logger.info("resume: model_best is ranked by the %s metric from now on; the checkpoint's ranking "
                         "(%s metric) starts over", ranked_by, resume.get("metric_model", "model"))
            state.extra["best"], state.extra["hist"] = None, []
        next_epoch, skip_batches = int(resume["next_epoch"]), int(resume.get("skip_batches", 0))
        if skip_batches:  # mid-epoch: the reference the uninterrupted epoch would compare against
            ctl.set_metric_reference(resume.get("metric_reference") or {"masks": resume.get("flip_reference")})
    ctl.step(state.global_step)  # before optimizer/EMA: a method may rewrite weights at its first step

    optimizer = _optimizer(args, ctl, dist.is_main, distributed=dist.distributed)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    scaler = torch.amp.GradScaler("cuda") if (args.amp and amp_dtype == torch.float16 and
                                              dist.device.type == "cuda") else None
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    lr_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=steps_per_epoch)
    if lr_scheduler is None:  # timm's schedulers apply --layer-decay's lr_scale; a constant lr takes it once here
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
    if resume is not None:
        if not args.no_resume_opt:
            saved_opt = (resume.get("args") or {}).get("opt")
            if saved_opt not in (None, args.opt):  # torch loads another optimizer's state and fails at its step
                raise CheckpointError(f"--resume {resume_path} was trained with --opt {saved_opt}, not {args.opt}; "
                                      "resume with the run's optimizer, or pass --no-resume-opt to start a fresh one")
            try:
                optimizer.load_state_dict(resume["optimizer"])
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"--resume {resume_path}: its optimizer state does not fit --opt {args.opt} with "
                                      "these parameter groups (--layer-decay and its scales change them) "
                                      f"({type(e).__name__}: {str(e)[:120]}); resume with the run's --opt and "
                                      "--layer-decay settings, or pass --no-resume-opt to start a fresh optimizer") \
                    from None
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
        if model_ema is not None and resume.get("state_dict_ema") is not None:
            model_ema.module.load_state_dict(resume["state_dict_ema"], strict=True)
        _logger.info("resumed %s at epoch %d, step %d", resume_path, next_epoch, state.global_step)
    if lr_scheduler is not None:
        if resume is not None and resume.get("scheduler") and not args.no_resume_opt:
            lr_scheduler.load_state_dict(resume["scheduler"])  # plateau's best / bad-epoch count live there
        if next_epoch > 0:  # as timm's train.py: a fresh run keeps the LR the scheduler set up (plateau's step(0)
            lr_scheduler.step(next_epoch)  # without warm-up would drop it to --warmup-lr for the whole run)
        if resume is not None:  # per-update schedules: the LR of the step the run continues at (a no-op otherwise)
            lr_scheduler.step_update(num_updates=state.global_step)

    train_model: nn.Module = model
    if args.torchcompile:
        train_model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
        bn_ranks = resume.get("bn_ranks") if resume is not None else None
        if bn_ranks and len(bn_ranks) == dist.world_size:  # mid-epoch: each rank's own BN statistics, after DDP
            load_bn_stats(model, bn_ranks[dist.rank].get("model", {}))  # has handed rank 0's to every rank
            if model_ema is not None:
                load_bn_stats(model_ema.module, bn_ranks[dist.rank].get("ema", {}))

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        from timm.data import Mixup


        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                         num_classes=num_classes)
    train_loss_fn, val_loss_fn = _loss_fns(args, mixup_fn is not None)
    train_loss_fn = fault_loss(train_loss_fn, state)

    if not in_place:  # claimed now, not earlier: a refusal above leaves the folder empty, free for the retry
        if dist.is_main:
            run_dir = claim_run_dir(run_dir, args)
            lock.acquire(run_dir)
            lock.claimed = run_dir
        if dist.distributed:  # every rank names the folder rank 0 claimed
            shared = [str(run_dir)]
            torch.distributed.broadcast_object_list(shared, src=0)
            run_dir = Path(shared[0])
        ctl.method.output_dir = str(run_dir) if dist.is_main else None
    resolved = resolved_config(args, recipe)
    summary_path = run_dir / "summary.csv"
    lock.wrote = True  # args.yaml next: the run has its folder; from here on the lock file stays
    if dist.is_main:
        args_file = run_dir / "args.yaml"
        if in_place and resume is not None and args_file.exists():  # keep the run's config; record the resume's
            args_file = run_dir / f"args-resumed-step{state.global_step}.yaml"
        with explain_write_errors(run_dir):
            args_file.write_text(dump_yaml(resolved, sort_keys=False))
            truncate_summary(summary_path, next_epoch)  # a new run in an old folder (--resume auto) starts it empty
    wandb_run = init_wandb(args, resolved, run_dir) if (args.log_wandb and dist.is_main) else None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if dist.distributed:
            torch.distributed.all_reduce(t)
        return t

    def checkpoint_dict(next_ep: int, skip: int, metric: float | None) -> dict:
        mid_epoch = skip > 0
        running = state.extra.get("loss_sum_tensor")
        return {
            "arch": args.model, "create_kwargs": plain(create_kwargs), "recipe": recipe.to_dict(),
            "state_dict": model.state_dict(),
            "state_dict_ema": model_ema.module.state_dict() if model_ema is not None else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": plain(lr_scheduler.state_dict()) if lr_scheduler is not None else None,
            "controller": ctl.state_dict(), "epoch": next_ep - 1, "next_epoch": next_ep, "skip_batches": skip,
            "global_step": state.global_step, "skipped_nonfinite": state.skipped_nonfinite, "metric": metric,
            # version 2 as timm's CheckpointSaver: "epoch" is the last finished one (timm resumes at epoch + 1)
            "args": resolved, "rng": _rng_state(), "version": 2, "run_epochs": n_epochs, "wall_time_s": elapsed(),
            "best": state.extra.get("best"), "hist": state.extra.get("hist", []),
            "metric_model": "ema" if model_ema is not None else "model",  # which weights `metric` evaluated
            "loss_sum": float(running if running is not None else state.loss_sum) if mid_epoch else 0.0,
            "loss_count": state.loss_count if mid_epoch else 0,
            "metric_reference": ctl.metric_reference() if mid_epoch else None, "steps_per_epoch": steps_per_epoch,
        }

    def save(obj: dict, path: Path) -> None:
        try:
            save_atomic(obj, path, before_rename=lambda: inject_fault("during_save", state.global_step,
                                                                        dist.rank, run_dir))
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror or e}); free space or choose another --output. "
                            "Earlier checkpoints in the run dir are intact") from None

    def write_recovery(st: TrainState, batch_idx: int) -> None:
        # Every rank's generators (each draws its own augmentations) and BN statistics (each rank's layers update
        # them from its own batches until the epoch's end averages them): a resume gives each rank its own back.
        per_rank = {"rng_ranks": None, "bn_ranks": None}
        if dist.distributed:
            mine = {"rng": _rng_state(), "bn": {"model": bn_stats(model)}}
            if model_ema is not None:
                mine["bn"]["ema"] = bn_stats(model_ema.module)
            ranks: list = [None] * dist.world_size
            torch.distributed.all_gather_object(ranks, mine)
            per_rank["rng_ranks"] = [r["rng"] for r in ranks]
            per_rank["bn_ranks"] = [r["bn"] for r in ranks] if has_bn_stats(model) else None
        if dist.is_main:
            save({**checkpoint_dict(st.epoch, batch_idx + 1, None), **per_rank}, run_dir / "recovery.pth.tar")

    def resume_hint() -> str:
        return f"running the same command with --resume auto --experiment {run_dir.name} --output {run_dir.parent}"

    def on_step(st: TrainState, batch_idx: int) -> None:
        if fault_matches("diverge_mask", st.global_step, dist.rank):
            layer = masked_modules(model)[0][1]
            layer.weight_mask.view(-1)[0] ^= True
        written = bool(args.recovery_interval) and st.global_step % args.recovery_interval == 0
        if written:
            write_recovery(st, batch_idx)
        inject_fault("after_step", st.global_step, dist.rank, run_dir)
        inject_fault("sigterm", st.global_step, dist.rank, run_dir)
        inject_fault("pause", st.global_step, dist.rank, run_dir)
        if stop.requested():  # SIGTERM/Ctrl-C: this step is done; keep it and leave
            if not written:
                write_recovery(st, batch_idx)
            name = stop.received.name
            raise TrainingStopped(f"stopped by {name} at epoch {st.epoch} step {st.global_step}; "
                                  f"{run_dir / 'recovery.pth.tar'} holds that step: continue by {resume_hint()}",
                                  128 + int(stop.received))
        if args.mask_check_interval and dist.distributed and st.global_step % args.mask_check_interval == 0:
            check_ranks_consistent(model, dist)

    eval_metrics: dict = {}
    t_start = time.perf_counter()
    prior_seconds = float(resume.get("wall_time_s", 0.0)) if resume is not None else 0.0

    def elapsed() -> float:
        """Training wall time of the whole run, the part before a resume included."""
        return prior_seconds + time.perf_counter() - t_start

    if dist.is_main:
        _logger.info("run dir: %s | %s, %s, %d epochs x %d steps | method %s", run_dir, args.model,
                     args.dataset or args.data_dir, n_epochs, steps_per_epoch, recipe.method)
    # --dist-bn on models with BN statistics under torchrun (with --sync-bn they are global already, as in timm)
    dist_bn = args.dist_bn if (dist.distributed and not args.sync_bn and has_bn_stats(model)) else ""
    from timm.utils import distribute_bn
    if dist_bn and dist.is_main:
        _logger.info("--dist-bn %s: the ranks' batch-norm statistics are %s after every epoch", dist_bn,
                     "averaged" if dist_bn == "reduce" else "rank 0's")
    stop = StopSignals(dist)
    try:
        stop.install()  # SIGTERM (a cluster's preemption) or Ctrl-C: finish the step, write recovery, exit
        for epoch in range(next_epoch, n_epochs):
            state.epoch = epoch
            if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False  # as timm: the targets stay soft (smoothed one-hot), no mixing
            skip = skip_batches if epoch == next_epoch else 0
            # Every epoch starts from its own seed, so its loader order does not depend on earlier epochs; a
            # mid-epoch resume replays that order, skips the finished batches, then restores the saved RNG state.
            _seed_all(args.seed + 1000 * (epoch + 1) + dist.rank)
            if hasattr(loader_train.dataset, "set_epoch"):  # as timm: its iterable readers (wds/, tfds/, hfids/)
                loader_train.dataset.set_epoch(epoch)         # shuffle their shards per epoch
                reader = getattr(loader_train.dataset, "reader", None)
                if args.workers == 0 and hasattr(reader, "ds"):  # read in this process: the reader's pipeline
                    reader.ds = None  # (and its sample-shuffle RNG) is built afresh each epoch, so an epoch does
                    # not depend on the ones before it and a mid-epoch resume replays it exactly (its sample
                    # shuffle starts from the reader's seed every epoch; the shard order changes by epoch)
            elif dist.distributed and hasattr(loader_train.sampler, "set_epoch"):
                loader_train.sampler.set_epoch(epoch)
            rng_at_resume = _resume_rng(resume, dist) if (skip and resume is not None) else None
            train_metrics = train_one_epoch(
                train_model, loader_train, optimizer, train_loss_fn, state, controller=ctl, device=dist.device,
                lr_scheduler=lr_scheduler, amp_dtype=amp_dtype, scaler=scaler, model_ema=model_ema,
                mixup_fn=mixup_fn, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                accum_steps=args.grad_accum_steps, channels_last=args.channels_last,
                log_interval=args.log_interval, max_nonfinite=args.skip_nonfinite, skip_batches=skip,
                on_step=on_step, is_main=dist.is_main,
                on_resume_point=functools.partial(_set_rng_state, rng_at_resume) if rng_at_resume is not None else None,
            )
            if dist_bn:  # as timm's train.py: the ranks' BN statistics averaged (or rank 0's) before the eval
                for m in (model, *([model_ema.module] if model_ema is not None else [])):
                    distribute_bn(m, dist.world_size, reduce=dist_bn == "reduce")
            # Masks for the weights as they are now (the same call the next forward would make first): the eval
            # sees the model the checkpoint holds, and a resume at this step recomputes exactly these masks.
            ctl.step(state.global_step)
            try:
                eval_metrics = evaluate(train_model, loader_val, val_loss_fn, device=dist.device,
                                        amp_dtype=amp_dtype, channels_last=args.channels_last, reduce=reduce)
                if model_ema is not None:
                    ctl.sync(model_ema.module)
                    ema_metrics = evaluate(model_ema.module, loader_val, val_loss_fn, device=dist.device,
                                           amp_dtype=amp_dtype, reduce=reduce)
            except DataError as e:  # an unreadable validation image: the epoch's steps are done, keep them
                if dist.distributed:  # the other ranks wait in the evaluation's reduce: no collective write now
                    raise
                write_recovery(state, len(loader_train) - 1)  # every batch done: a resume runs this evaluation
                raise DataError(f"{one_line(e)}. Epoch {epoch}'s training is kept in {run_dir / 'recovery.pth.tar'}:"
                                f" after the fix, continue by {resume_hint()}") from None
            # timm's summary.csv columns first, in timm's order (epoch, train_loss, eval_*, lr), then ours
            row = {"epoch": epoch, "train_loss": round(train_metrics["loss"], 6),
                   "eval_loss": round(eval_metrics["loss"], 6), "eval_top1": round(eval_metrics["top1"], 4),
                   "eval_top5": round(eval_metrics["top5"], 4), "lr": mean_lr(optimizer),
                   "step": state.global_step}
            if model_ema is not None:
                row["ema_top1"] = round(ema_metrics["top1"], 4)
            row["mask_flip_rate"] = round(ctl.flip_rate(), 6)
            row.update(ctl.metrics())
            # as timm's train.py: with --model-ema the EMA model's metric ranks checkpoints (model_best) and drives
            # plateau schedulers
            ranked = ema_metrics if model_ema is not None else eval_metrics
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, ranked[args.eval_metric])
            if dist.is_main:
                with explain_write_errors(run_dir):
                    append_summary(summary_path, row)
                if wandb_run is not None:
                    wandb_run.log(row, step=state.global_step)
                metric = ranked[args.eval_metric]
                _save_epoch(run_dir, checkpoint_dict, save, state, epoch, metric, args.checkpoint_hist,
                            target_problem(model), lower_is_better=args.eval_metric == "loss")
                _logger.info("epoch %d done: train loss %.4f | top-1 %.2f | sparsity %.3f%s", epoch,
                             row["train_loss"], row["eval_top1"], row["sparsity"],
                             f" | {row['pattern']}" if row.get("pattern") else "")
    except NonFiniteLossError as e:
        good = newest_checkpoint(run_dir)
        raise TrainingError(f"{e}; the last good checkpoint is {good or 'none yet'}. Lower --lr, add --clip-grad, "
                            "or allow --skip-nonfinite N") from None
    finally:
        stop.restore()
    if dist.is_main and isinstance(optimizer, MaskedAdamW) and optimizer.steps:
        _logger.info("optimizer: the next masks came out of its pass in %d of this process's %d steps (the others: "
                     "a new frame or phase, masks not due, a refused gradient)", optimizer.native_steps,
                     optimizer.steps)

    # ---- end of training: fixed binary masks, final evaluation, report, plots --------------------------------------
    ctl.finalize(*([model_ema.module] if model_ema is not None else []))
    ctl.on_train_end(str(run_dir) if dist.is_main else None)
    final = evaluate(model, loader_val, val_loss_fn, device=dist.device, amp_dtype=amp_dtype, reduce=reduce)
    final_ranked = final
    if model_ema is not None:
        final_ranked = evaluate(model_ema.module, loader_val, val_loss_fn, device=dist.device, amp_dtype=amp_dtype,
                                reduce=reduce)
        final = {**final, **{f"ema_{k}": v for k, v in final_ranked.items() if k in ("top1", "top5", "loss")}}
    rows = sparsity_report(model)
    if dist.is_main:
        final_metric = final_ranked[args.eval_metric]
        problem = target_problem(model)
        # the finalized model (fixed binary masks) competes too: it is what last.pth.tar now holds
        seconds = round(elapsed(), 2)  # one figure for last.pth.tar, results.json and the table (no double rounding)
        final_best = _claim_best(state, final_metric, n_epochs, problem, args.eval_metric == "loss", final=True)
        copies = ["model_best.pth.tar"] if final_best else []
        save(dict(checkpoint_dict(n_epochs, 0, final_metric), final=final, wall_time_s=seconds, copies=copies),
             run_dir / "last.pth.tar")
        settle_last(run_dir, copies)
        if not final_best and state.extra.get("best") is None:
            _logger.warning("no model_best.pth.tar: the model never reached its recipe's target (%s); "
                            "last.pth.tar holds the final model", problem)
        with explain_write_errors(run_dir):
            write_report(run_dir, rows, final, model, args, recipe, seconds)
            plots(run_dir, summary_path, rows)
        print(final_table(args, recipe, final, rows, model, run_dir, seconds))
    if wandb_run is not None:
        wandb_run.finish()
    if dist.distributed:
        bn = bool(dist_bn) or args.sync_bn
        n = check_ranks_consistent(model, dist, weights=True, bn=bn)
        if model_ema is not None:
            n += check_ranks_consistent(model_ema.module, dist, weights=True, bn=bn)
        if dist.is_main:
            what = "masks, weights and batch-norm statistics" if bn and has_bn_stats(model) else "masks and weights"
            _logger.info("ranks identical: %s (%d tensors compared across %d ranks)", what, n, dist.world_size)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


