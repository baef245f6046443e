"""One call that builds a sparse model for every CLI: timm's factory, then surgery, then loading."""

from __future__ import annotations

import os

from torch import nn

from .checkpoint import load_checkpoint_file, load_model_weights, model_state_from
from .errors import ModelError
from .recipe import Recipe, closest, load_recipe
from .surgery import sparsify_

__all__ = ["create_model"]


def create_model(
    model_name: str,
    recipe: Recipe | str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    use_ema: bool = False,
    ckpt: dict | None = None,
    **timm_kwargs,
) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` -> ``sparsify_(model, recipe)`` -> load ``checkpoint``.

    ``recipe`` is a :class:`~sparsity.recipe.Recipe` or the path of a recipe file (its ``sparsity:`` block; the
    file's model and training keys are not applied: pass them as arguments).

    The checkpoint may be ours (``.pth.tar`` with masks), a stock timm/dense state dict (masks then come from the
    controller's first step), or a densified ``.safetensors`` export. It is read (or ``ckpt``, its contents when
    the caller has read it) before the model is built: a missing or unreadable file is refused first.
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
    try:
        model = timm.create_model(model_name, **timm_kwargs)
    except TypeError as e:
        raise ModelError(f"model '{model_name}' does not accept these arguments ({e}); check model_kwargs") from None
    except (AssertionError, ValueError, ZeroDivisionError, RuntimeError) as e:  # timm's own checks of the values
        shown = ", ".join(f"{k}={v}" for k, v in timm_kwargs.items()) or "no arguments"
        raise ModelError(f"model '{model_name}' cannot be built with {shown} ({type(e).__name__}"
                         f"{': ' + str(e).strip().splitlines()[0] if str(e).strip() else ''}); check model_kwargs "
                         "(e.g. embed_dim divisible by num_heads, patch_size dividing img_size)") from None
    if recipe is not None:
        sparsify_(model, recipe)
    if checkpoint:
        load_model_weights(model, checkpoint, use_ema=use_ema, ckpt=ckpt)
    return model
