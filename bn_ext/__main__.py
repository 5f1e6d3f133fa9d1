"""Command line: python -m bn_ext {demo} ..."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_ext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small conv net with bn_ext and check it against torch.nn")
    demo.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from bn_ext.demo import run_demo

        return run_demo(steps=args.steps)
    return 2


if __name__ == "__main__":
    sys.exit(main())
