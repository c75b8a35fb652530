"""Entry point: one sub-command per module `cli/<name>_cmd.py`, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_tier.errors import MoeTierError

COMMANDS = ("inspect", "run", "synth", "trace", "replay", "profile")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="moe-tier", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        module = importlib.import_module(f"cli.{name}_cmd")
        module.add_parser(sub)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except MoeTierError as err:
        print(f"moe-tier: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moe-tier inspect --json | head` is not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("moe-tier: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
