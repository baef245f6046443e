#!/usr/bin/env python3
"""Export a train.py checkpoint: densified timm weights or a compressed N:M / BSR safetensors file.

    python export.py --checkpoint output/run/model_best.pth.tar --format densified
    python export.py --checkpoint output/run/model_best.pth.tar --format compressed --output exports/vit-2of4

Densified: ``model.safetensors`` + ``config.json``, loads with ``strict=True`` into ``timm.create_model`` (or
``timm.create_model("local-dir:DIR", pretrained=True)``). Compressed: ``model_compressed.safetensors`` +
``config.json``, loads with ``sparsity.load_compressed(DIR)``. See docs/export.md.
"""

from __future__ import annotations

import argparse
import logging

from cli_common import parse_flags, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a sparse checkpoint (densified or compressed safetensors)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="train.py checkpoint (.pth.tar)")
    p.add_argument("--format", required=True, choices=("densified", "compressed"),
                   help="densified: stock timm weights with masks baked in; compressed: N:M values + uint8 indices, "
                        "BSR blocks, bitmaps, the rest dense")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="output directory (default: next to the checkpoint, '<name>-<format>')")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights of the checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing export in --output")
    return p


def main(argv: list[str] | None = None) -> int:
    from sparsity.export import ExportError, export_checkpoint

    args = parse_flags(build_parser(), argv)
    setup_logging(level=logging.WARNING)
    try:
        info = export_checkpoint(args.checkpoint, args.format, args.output, use_ema=args.use_ema, force=args.force)
    except OSError as e:  # disk full, permissions: bad input from where we stand
        where = f" to {args.output}" if args.output else " next to the checkpoint"
        raise ExportError(f"cannot write the export{where} ({e.strerror or e}); free space or choose another "
                          "--output (nothing was written there)") from None
    mib = 2**20
    print(f"wrote {args.format} export of {args.checkpoint} to {info['output_dir']}")
    for name, size in sorted(info["files"].items()):
        print(f"  {name:<32} {size:>12,d} bytes")
    print(f"weights: compressed {info['compressed_bytes']:,d} bytes ({info['compressed_bytes'] / mib:.2f} MiB) vs "
          f"densified {info['densified_bytes']:,d} bytes ({info['densified_bytes'] / mib:.2f} MiB): "
          f"ratio {info['ratio']:.3f}")
    print(f"  {info['layers']} sparse layers: {info['nm_segments']} N:M segments, {info['bsr_segments']} BSR segments, "
          f"{info['bitmap_segments']} bitmap segments (unstructured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
