#!/usr/bin/env python3
"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory:
tools/convert_gguf.py FILE OUT_DIR [--force]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from kvzoo.convert import convert_gguf  # noqa: E402
from kvzoo.errors import KvzooError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("file", type=Path, help="the .gguf file (llama or falcon architecture)")
    parser.add_argument("out_dir", type=Path, help="output directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--force", action="store_true", help="overwrite the converted files in an existing OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.file, args.out_dir, force=args.force, progress=not args.quiet)
    except KvzooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
