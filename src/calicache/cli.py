"""`calicache` command line: one module per subcommand under `calicache.commands`."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

from .utils import keep_freed_memory

# Subcommand name -> module in calicache.commands with `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "demo": "demo",
    "sample": "sample",
    "calibrate": "calibrate",
    "macs": "macs",
    "eval": "eval",
    "bench": "bench",
    "train": "train",
    "train-classifier": "train_classifier",
    "convert": "convert",
    "tune": "tune",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calicache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"calicache.commands.{module_name}")
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _non_finite(value: object) -> bool:
    """NaN or inf, given as a number or as the text of an option parsed later (method flags)."""
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return not Path(value).exists()
    return isinstance(value, float) and not math.isfinite(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m calicache -- sample --num N`: `--` keeps torchrun off our flags
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    args._argv = argv  # --nproc-per-node starts workers that run the same command line
    # Every float option up front: NaN or inf anywhere (a weight, a scale, eta) would only show as black images.
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not k.startswith("_") and _non_finite(v)]
    if bad:
        print(f"calicache {args.command}: error: {', '.join(bad)}: must be a finite number", file=sys.stderr)
        return 2
    keep_freed_memory()  # docs/speed.md: a DiT forward otherwise maps and faults its activations in every call
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"calicache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calicache {args.command}: interrupted; outputs are written only when complete, so none was "
              "replaced or left half-written (train keeps its last checkpoint and sampling under torchrun its "
              "finished shards, for a rerun)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
