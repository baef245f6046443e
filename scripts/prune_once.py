#!/usr/bin/env python3
"""Prune a dense train.py checkpoint once with a recipe (e.g. ``oneshot``, optionally with channel permutation)
and save it as a checkpoint that ``validate.py`` and ``export.py`` read: the "before retraining" point of a
one-shot prune + retrain experiment.

    python scripts/prune_once.py --checkpoint output/dense_digits/last.pth.tar \\
        --config configs/quickstart/oneshot_digits_2of4.yaml --output pruned.pth.tar [--no-permute]
    python validate.py --checkpoint pruned.pth.tar
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_common import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="dense checkpoint written by train.py")
    p.add_argument("--config", required=True, help="recipe whose sparsity: block prunes the model")
    p.add_argument("--output", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--no-permute", action="store_true", help="turn the recipe's channel permutation off")
    args = p.parse_args(argv)

    import sparsity
    from sparsity.checkpoint import load_checkpoint_file, model_state_from, save_atomic
    from sparsity.errors import UserError

    recipe = sparsity.load_recipe(args.config)
    if args.no_permute and hasattr(recipe.options, "permute"):
        recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, permute=False))
    ckpt = load_checkpoint_file(args.checkpoint)
    if "arch" not in ckpt:
        raise UserError(f"{args.checkpoint} is not a train.py checkpoint (no 'arch')")
    model = sparsity.create_model(ckpt["arch"], recipe=recipe, **ckpt.get("create_kwargs", {}))
    model.load_state_dict(model_state_from(ckpt), strict=True)
    ctl = sparsity.SparsityController(model, recipe, total_steps=1)
    ctl.step(0)
    ctl.finalize()
    save_atomic({"arch": ckpt["arch"], "create_kwargs": ckpt.get("create_kwargs", {}), "recipe": recipe.to_dict(),
                 "state_dict": model.state_dict()}, args.output)
    metrics = {k: v for k, v in ctl.metrics().items() if isinstance(v, (int, float))}
    print(json.dumps({"output": args.output, **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
