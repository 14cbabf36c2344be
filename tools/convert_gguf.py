#!/usr/bin/env python3
"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory (same as `kvzoo convert gguf`):
tools/convert_gguf.py FILE OUT_DIR [--force] [--quiet]"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from kvzoo.cli import convert_parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run(convert_parser("gguf", prog="tools/convert_gguf.py").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
