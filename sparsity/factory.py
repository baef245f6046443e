"""One call that builds a sparse model for every CLI: timm's factory, then surgery, then loading."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse

import torch
from torch import nn

from .checkpoint import load_checkpoint_file, load_model_weights, model_state_from
from .errors import ModelError
from .recipe import Recipe, closest, load_recipe
from .surgery import sparsify_

__all__ = ["create_model", "check_input_size", "set_grad_checkpointing"]

_logger = logging.getLogger(__name__)


def create_model(
    model_name: str,
    recipe: Recipe | str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    use_ema: bool = False,
    ckpt: dict | None = None,
    fresh_head: bool = False,
    pretrained: bool = False,
    pretrained_path: str | os.PathLike | None = None,
    **timm_kwargs,
) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` -> ``sparsify_(model, recipe)`` -> load ``checkpoint``.

    ``recipe`` is a :class:`~sparsity.recipe.Recipe` or the path of a recipe file (its ``sparsity:`` block; the
    file's model and training keys are not applied: pass them as arguments).

    The checkpoint may be ours (``.pth.tar`` with masks), a stock timm/dense state dict (masks then come from the
    controller's first step), or a densified ``.safetensors`` export. It is read (or ``ckpt``, its contents when
    the caller has read it) before the model is built: a missing or unreadable file is refused first.
    ``fresh_head``: a classifier for another number of classes keeps its initialisation (train.py's
    ``--initial-checkpoint``, as timm's pretrained loading does).

    ``pretrained``: timm's pretrained weights for ``model_name`` (timm downloads them), or those of the local file
    ``pretrained_path`` (read with ``weights_only=True``, EMA weights when it holds them), loaded by timm before
    surgery: timm adapts them (a new classifier for another ``num_classes``, position embeddings resampled for
    another ``img_size``).
    """
    import timm

    if isinstance(recipe, (str, os.PathLike)):  # a recipe file (its sparsity: block)
        recipe = load_recipe(recipe)
    if checkpoint and ckpt is None:
        ckpt = load_checkpoint_file(checkpoint)
        model_state_from(ckpt, use_ema)  # e.g. --use-ema on a file without EMA weights: refused now too
    if not timm.is_model(model_name):
        raise ModelError(f"unknown model '{model_name}'{closest(model_name, timm.list_models())} "
                         "(see timm.list_models())")
    if pretrained:
        model = _create_pretrained(model_name, pretrained_path, timm_kwargs)
    else:
        model = _create(model_name, timm_kwargs)
    if recipe is not None:
        sparsify_(model, recipe)
    if checkpoint:
        load_model_weights(model, checkpoint, use_ema=use_ema, ckpt=ckpt, fresh_head=fresh_head)
    return model


def _create(model_name: str, timm_kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, **timm_kwargs)
    except TypeError as e:
        raise ModelError(f"model '{model_name}' does not accept these arguments ({e}); check model_kwargs") from None
    except (AssertionError, ValueError, ZeroDivisionError, RuntimeError) as e:  # timm's own checks of the values
        shown = ", ".join(f"{k}={v}" for k, v in timm_kwargs.items()) or "no arguments"
        raise ModelError(f"model '{model_name}' cannot be built with {shown} ({type(e).__name__}"
                         f"{': ' + str(e).strip().splitlines()[0] if str(e).strip() else ''}); check model_kwargs "
                         "(e.g. embed_dim divisible by num_heads, patch_size dividing img_size)") from None


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, when its host name does not resolve (no network): then
    huggingface_hub's retries would spend most of a minute before failing. None when the name resolves, when a proxy
    is set (the proxy resolves names) or when huggingface_hub is offline already (it fails fast itself)."""
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return None
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    if constants.HF_HUB_OFFLINE or not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} does not resolve: {e.strerror or e}"
    return None


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode for the block: files come from its cache, no request is made."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _create_pretrained(model_name: str, path, timm_kwargs: dict) -> nn.Module:
    """``timm.create_model(pretrained=True)``; a failure to get or fit the weights is one message naming them."""
    import timm
    from timm.models import is_model_pretrained

    heads: tuple = ()
    cfg = timm.models.get_pretrained_cfg(model_name)
    offline = None
    if path:
        ckpt = load_checkpoint_file(path)  # weights_only; timm's own file loader would unpickle anything
        ema = any(isinstance(ckpt.get(k), dict) for k in ("state_dict_ema", "model_ema"))
        state = model_state_from(ckpt, ema)
        overlay, source = {"state_dict": state}, f"{path}{' (EMA weights)' if ema else ''}"
        # timm keeps the file's classifier when its class count is the model's, and drops it otherwise; it compares
        # against the pretrained config's count, so that is the file's own
        heads = (cfg.classifier or ()) if cfg is not None else ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        head = next((state[f"{h}.weight"] for h in heads if isinstance(state.get(f"{h}.weight"), torch.Tensor)), None)
        if head is not None:
            overlay["num_classes"] = int(head.shape[0])
    elif not is_model_pretrained(model_name):
        raise ModelError(f"--pretrained: timm has no pretrained weights for '{model_name}'; pass --pretrained-path "
                         "FILE, or drop --pretrained")
    else:
        overlay, source = {}, "timm's pretrained weights"
        offline = _hub_unreachable() if getattr(cfg, "hf_hub_id", None) else None
    try:
        with _hub_offline() if offline else contextlib.nullcontext():  # no network: the cache, without retries
            model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
    except Exception as e:  # noqa: BLE001 - a download, a file or a shape: the build itself is checked below
        _create(model_name, timm_kwargs)  # the arguments themselves are wrong: that message instead
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if offline:
            raise ModelError(f"--pretrained: the Hugging Face Hub is out of reach ({offline}) and the weights of "
                             f"'{model_name}' ({cfg.hf_hub_id}) are not in its local cache; download them where "
                             "there is network (they are then read from the cache) or pass --pretrained-path FILE"
                             ) from None
        raise ModelError(f"--pretrained: could not load {source} into '{model_name}' ({type(e).__name__}: {first}); "
                         "without network access download them first and pass --pretrained-path FILE; a sparse "
                         "checkpoint of ours goes through --initial-checkpoint") from None
    if path:  # timm loads non-strictly when it adapts the classifier: a file of another model would load nothing
        missing = [k for k in model.state_dict() if k not in state and not any(k.startswith(h + ".") for h in heads)]
        if missing:
            raise ModelError(f"--pretrained-path {path} does not fit '{model_name}': {len(missing)} of its tensors are "
                             f"not in the file ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); pass "
                             "weights saved from this architecture")
    _logger.info("pretrained weights: %s", source)
    return model


def set_grad_checkpointing(model: nn.Module, name: str, log: bool = True) -> None:
    """timm's ``--grad-checkpointing``: the model's blocks recompute their activations in the backward instead of
    keeping them (less memory, about a third more compute). The masked layers are recomputed like any other (the
    same masks, forward weights and Gumbel noise: its seed is the step's). A model timm gives no checkpointing is
    refused in one line."""
    fn = getattr(model, "set_grad_checkpointing", None)
    try:
        if fn is None:
            raise NotImplementedError
        fn(True)
    except (AssertionError, NotImplementedError):
        raise ModelError(f"--grad-checkpointing: timm's '{name}' does not support gradient checkpointing; drop the "
                         "flag") from None
    if log:
        _logger.info("gradient checkpointing: on (activations recomputed in the backward)")


@torch.no_grad()
def check_input_size(model: nn.Module, input_size, name: str, device: torch.device | str = "cpu",
                     channels_last: bool = False, train_batch: int | None = None, hint: str | None = None) -> None:
    """One eval forward of a single blank image at the loader's ``input_size`` (C, H, W): a model built for another
    size (a ViT made for 224 fed 32 px digits) is refused here in one line, not in timm's traceback mid-run. With
    ``train_batch`` 1 it also finds BatchNorm layers that would see one value per channel (a 1x1 feature map),
    which cannot train. ``hint`` replaces the advice (a trained model cannot be rebuilt for another size). Eval
    mode and no grad: no statistics, generator or mask state changes."""
    was = model.training
    single: list[str] = []  # BatchNorm layers whose input holds one value per channel at batch 1

    def watch(bn_name: str):
        return lambda mod, inp, out: single.append(bn_name) if inp[0].numel() == inp[0].shape[1] else None

    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_hook(watch(n)) for n, m in bns] if train_batch == 1 else []
    model.eval()
    c, h, w = input_size
    try:
        x = torch.zeros(1, c, h, w, device=device)
        model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    except (AssertionError, RuntimeError, ValueError) as e:
        advice = hint or f"build it for that size (--model-kwargs img_size={h}) or feed it its own (--img-size)"
        raise ModelError(f"model '{name}' cannot take the data's {c}x{h}x{w} inputs ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}); {advice}") from None
    finally:
        model.train(was)
        for hook in hooks:
            hook.remove()
    if single:
        more = f" (and {len(single) - 1} more)" if len(single) > 1 else ""
        raise ModelError(f"-b 1: BatchNorm layer {single[0]}{more} would see one value per channel at {h}x{w} "
                         "inputs, which it cannot train on; use -b 2 or more per process")
