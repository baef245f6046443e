"""Shared by the CLIs (train.py, validate.py, export.py, benchmark.py, compare.py): YAML configs with
defaults < YAML < command line, strict key checking, exit code 2 with one clear message for bad input."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable

from sparsity.errors import TrainingError, UserError, one_line
from sparsity.recipe import closest, load_yaml, yaml_value

USER_ERROR_EXIT = 2


class ConfigError(UserError):
    """A bad command line or experiment file; the message says what to change."""


# a true/false setting a config may turn on and the command line off again (--amp / --no-amp)
SWITCH = dict(action=argparse.BooleanOptionalAction, default=False)


class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=x`` -> {'a': 1, 'b': 'x'} (values parsed as YAML scalars), merged key by key into the
    mapping the config file gave (``--model-kwargs depth=2`` on a recipe with ``img_size: 32, patch_size: 4``
    keeps both): the command line wins per key, as it does for every other setting."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string} expects key=value pairs, got {item!r}")
            kw[key] = yaml_value(value)
        setattr(namespace, self.dest, kw)


def float_or_none(text: str) -> float | None:
    """An argparse type for an optional number: ``none`` (or ``off``) turns off what a config set
    (``--clip-grad none`` under a recipe with ``clip_grad: 1.0``)."""
    if text.strip().lower() in ("none", "off", "null"):
        return None
    return float(text)


float_or_none.__name__ = "float"  # argparse's "invalid float value: 'x'"


def _check_value(action: argparse.Action, key: str, value, path: str) -> None:
    if value is None:
        if action.default is not None and not isinstance(action, ParseKwargs):  # null would reach the run as None
            raise ConfigError(f"'{key}' in {path} is null; give it a value (default: {action.default!r}) or drop "
                              "the key")
        return
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' in {path} must be true or false, got {value!r}")
        return
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if isinstance(action, ParseKwargs):
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' in {path} must be a mapping, got {value!r}")
            return
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' in {path} must be a list, got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f"'{key}' in {path} takes {action.nargs} values, got {len(value)}: {value!r}")
        items = value
    else:
        items = [value]
    for v in items:
        if action.type in (int, float, float_or_none):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (action.type is int and isinstance(v, float)):
                raise ConfigError(f"'{key}' in {path} must be {'an integer' if action.type is int else 'a number'}, "
                                  f"got {v!r}")
        elif action.type is str and not isinstance(v, str):
            raise ConfigError(f"'{key}' in {path} must be a string, got {v!r}")
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"'{key}' in {path} must be one of {list(action.choices)}, got {v!r}"
                              f"{closest(str(v), [str(c) for c in action.choices])}")


# timm train.py flags these CLIs do not take, and what to do instead (an unknown flag otherwise gets a did-you-mean)
TIMM_ONLY = {
    "--jsd-loss": "AugMix's split-batch JSD loss is not implemented",
    "--aug-splits": "AugMix's split-batch augmentation is not implemented",
    "--split-bn": "AugMix's split batch norm is not implemented",
    "--start-epoch": "the epoch to start at comes from the checkpoint: use --resume",
    "--epoch-repeats": "not implemented",
    "--no-prefetcher": "not needed: there is no prefetcher here (the loop moves each batch to the device); drop it",
    "--prefetcher": "not needed: there is no prefetcher here (the loop moves each batch to the device); drop it",
    "--model-ema-force-cpu": "not implemented: the EMA copy stays on the training device",
    "--amp-impl": "torch's native AMP only (--amp, --amp-dtype)",
    "--local_rank": "launch with torchrun (distributed_train.sh), which passes the rank in the environment",
    "--local-rank": "launch with torchrun (distributed_train.sh), which passes the rank in the environment",
    "--drop-connect": "deprecated in timm: use --drop-path",
    "--input-size": "use --img-size (and --model-kwargs in_chans=N for another channel count)",
    "--in-chans": "use --model-kwargs in_chans=N",
    "--gp": "use --model-kwargs global_pool=NAME",
    "--bn-momentum": "not implemented (models that take it: --model-kwargs)",
    "--bn-eps": "not implemented (models that take it: --model-kwargs)",
    "--model-dtype": "not implemented: train in float32 with --amp",
    "--class-map": "not implemented: the ImageFolder's class folders are the classes",
    "--train-num-samples": "timm's iterable datasets are not supported",
    "--val-num-samples": "timm's iterable datasets are not supported",
    "--save-images": "not implemented", "--worker-seeding": "not implemented", "--tta": "not implemented",
    "--use-multi-epochs-loader": "not implemented", "--fuser": "not implemented", "--fast-norm": "not implemented",
    "--head-init-scale": "not implemented", "--head-init-bias": "not implemented",
    "--torchscript": "not implemented: use --torchcompile",
    "--no-ddp-bb": "not implemented: DDP broadcasts the buffers (batch-norm statistics) from rank 0, timm's default",
    "--synchronize-step": "not needed: a step's timings and the log already wait for the device",
}

#: timm train.py settings (argparse dests) this train.py does not take, with timm's defaults: a timm run's
#: ``args.yaml`` lists every one, so such a file is accepted as ``--config`` when they hold these values (or none)
TIMM_DEFAULTS = {
    "data": None, "class_map": "", "gp": None, "in_chans": None, "input_size": None, "fuser": "", "fast_norm": False,
    "head_init_scale": None, "head_init_bias": None, "torchscript": False, "epoch_repeats": 0.0, "start_epoch": None,
    "aug_splits": 0, "jsd_loss": False, "drop_connect": None, "bn_momentum": None, "bn_eps": None,
    "split_bn": False, "model_ema_force_cpu": False, "worker_seeding": "all", "save_images": False,
    "amp_impl": "native", "no_ddp_bb": False, "synchronize_step": False, "no_prefetcher": False, "tta": 0,
    "local_rank": 0, "use_multi_epochs_loader": False, "model_dtype": None, "train_num_samples": None,
    "val_num_samples": None,
    # later timm versions' keys
    "input_img_mode": None, "input_key": None, "target_key": None, "dataset_trust_remote_code": False,
    "device_modules": None, "wandb_project": None, "wandb_tags": [], "wandb_resume_id": "",
}


def _timm_key(key: str, value, cfg: dict, path: str, timm_file: bool) -> bool:
    """True when ``key`` of a config file is a timm train.py setting this train.py does not take that can be dropped
    (timm's default, or a ``data`` path moved to ``data_dir`` as timm does); a ConfigError when it asks for something
    not done here; False when it is no timm setting at all."""
    flag = "--" + key.replace("_", "-")
    if key == "config" and (timm_file or value in (None, "")):  # a timm args.yaml records the file it was made
        return True  # from: its settings are already here (in our own configs the key stays an error)
    if key not in TIMM_DEFAULTS:
        return False
    if key == "data" and value:  # timm's deprecated positional data dir
        if cfg.get("data_dir") not in (None, "", value):
            raise ConfigError(f"{path} gives both 'data: {value}' and 'data_dir: {cfg['data_dir']}' (timm's old and "
                              "new name of the data dir); keep data_dir")
        cfg["data_dir"] = value
        return True
    if value is None or value == TIMM_DEFAULTS[key]:  # unset, or timm's default
        return True
    reason = TIMM_ONLY.get(flag) or TIMM_ONLY.get(f"--{key}") or "not implemented"
    raise ConfigError(f"'{key}: {value}' in {path} is a timm train.py setting not taken here: {reason}; remove the "
                      f"key (a timm args.yaml is accepted when such keys keep timm's default, {TIMM_DEFAULTS[key]!r})")


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` whose errors are one :class:`ConfigError` line (argparse prints its whole usage, then
    exits): an unknown flag names the closest one, or what to do instead of a timm flag not taken here."""
    def error(message: str):
        raise ConfigError(f"{message} (see --help)")

    if "error" not in vars(parser):  # a caller's own handler (compare.py names the recipe) stays
        parser.error = error  # type: ignore[method-assign]
    args, extras = parser.parse_known_args(argv)
    if extras:
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        first = flags[0] if flags else extras[0]
        if first in TIMM_ONLY:
            parser.error(f"{first} is a timm train.py flag not taken here: {TIMM_ONLY[first]}")
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        near = difflib.get_close_matches(first, options, n=1, cutoff=0.75)  # flags share "--": a stricter match
        parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean '{near[0]}'?" if near else ""))
    return args


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                      nested: tuple[str, ...] = ("sparsity",),
                      ignore: frozenset[str] = frozenset()) -> tuple[argparse.Namespace, dict]:
    """Parse ``argv`` with ``--config FILE`` providing defaults. Returns (args, nested blocks from the file).

    Unknown keys in the file are errors naming the key, the file and the closest valid key; keys in ``ignore``
    are accepted and dropped (validate.py reads a training recipe and ignores its training-only keys).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    blocks: dict = {}
    if known.config:
        cfg = load_yaml(known.config)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        timm_file = sum(key in TIMM_DEFAULTS for key in cfg) >= 5  # a timm run's args.yaml
        for key in list(cfg):
            if key in nested:
                blocks[key] = cfg.pop(key)
                continue
            if key in ignore and key not in actions:
                del cfg[key]
                continue
            if key not in actions and _timm_key(key, cfg[key], cfg, known.config, timm_file):
                del cfg[key]
                continue
            if key == "output" and cfg[key] == "" and timm_file:  # timm's default: its ./output/train; ours here
                del cfg[key]
                continue
            if key not in actions:
                raise ConfigError(f"unknown key '{key}' in {known.config}{closest(key, list(actions) + list(nested))}")
            _check_value(actions[key], key, cfg[key], known.config)
        parser.set_defaults(**cfg)
    return parse_flags(parser, argv), blocks


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main``; bad input (ValueError/OSError subclasses we raise) -> one line on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if not _launcher_reports(e):
            print(f"error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except TrainingError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1)  # a stop on a signal: 128 + the signal, as the shell reports a kill
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _launcher_reports(e: Exception) -> bool:
    """Under distributed_train.sh the bad-input line also goes to SPARSITY_ERROR_FILE, so the launcher can end with
    it and exit code 2 (torchrun itself reports any failed worker as 1). True when the launcher will print it for
    this process: ranks other than 0 then stay quiet (every rank refuses the same input; a line only one of them
    has still reaches the launcher's file). Best effort."""
    path = os.environ.get("SPARSITY_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "a") as f:
            f.write(one_line(e) + "\n")
    except OSError:
        return False
    return os.environ.get("RANK", "0") != "0"


def setup_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level if is_main else logging.WARNING, format="%(message)s", stream=sys.stdout,
                        force=True)
