#!/usr/bin/env python3
"""Convert a Meta checkpoint (consolidated.*.pth + params.json) into a Hugging Face checkpoint directory
(same as `kvzoo convert meta`): tools/convert_meta.py CKPT_DIR OUT_DIR [--force] [--quiet]"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from kvzoo.cli import main as kvzoo_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return kvzoo_main(["convert", "meta", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
