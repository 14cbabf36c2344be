#!/usr/bin/env python3
"""Convert a Meta checkpoint (consolidated.*.pth + params.json) into a Hugging Face checkpoint directory
(same as `kvzoo convert meta`): tools/convert_meta.py CKPT_DIR OUT_DIR [--force] [--quiet]"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from kvzoo.cli import convert_parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run(convert_parser("meta", prog="tools/convert_meta.py").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
