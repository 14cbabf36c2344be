#!/usr/bin/env python3
"""Convert a Meta checkpoint (consolidated.*.pth + params.json) into a Hugging Face checkpoint directory:
tools/convert_meta.py CKPT_DIR OUT_DIR [--force]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from kvzoo.convert import convert_meta  # noqa: E402
from kvzoo.errors import KvzooError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("ckpt_dir", type=Path, help="directory with consolidated.*.pth and params.json")
    parser.add_argument("out_dir", type=Path, help="output directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--force", action="store_true", help="overwrite the converted files in an existing OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert_meta(args.ckpt_dir, args.out_dir, force=args.force, progress=not args.quiet)
    except KvzooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
