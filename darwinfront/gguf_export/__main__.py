"""`python -m darwinfront.gguf_export DIR OUT.gguf [--type f16|q8_0|f32]`: a model directory as a GGUF file."""

from __future__ import annotations

import argparse
import json
import sys

from darwinfront.gguf_export import GGUF_TYPES, write_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darwinfront.gguf_export", description=__doc__)
    parser.add_argument("folder", help="a model directory: config.json, *.safetensors, tokenizer.json")
    parser.add_argument("out", help="the GGUF file to write")
    parser.add_argument("--type", choices=list(GGUF_TYPES), default="f16", help="the matrices' type")
    args = parser.parse_args(argv)
    try:
        summary = write_gguf(args.folder, args.out, args.type)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
