"""The ``cudcn`` command line (also ``python -m cudcn``).

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int`` and imports nothing heavy
(no CuPy, torch or paddle) until ``run`` is called. A subcommand that cannot
run as asked raises :class:`cudcn.cli.arguments.CommandError`, printed here
as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import cudcn
from cudcn.cli.arguments import CommandError

#: subcommand -> (module, one-line help)
COMMANDS = {
    "check": ("cudcn.cli.check", "check every available backend and adapter against the NumPy backend"),
    "info": ("cudcn.cli.info", "versions, settings, GPUs, available backends and the kernel cache"),
    "bench": ("cudcn.cli.bench", "time cudcn against the peers that are present"),
    "demo": ("cudcn.cli.demo", "train plain, DCNv1, DCNv2 and CoordConv CNNs on deformed digits and compare"),
    "compile": ("cudcn.cli.compile", "compile every CUDA kernel instantiation through NVRTC (no GPU needed)"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="cudcn", description="Deformable convolution for any array framework.")
    parser.add_argument("--version", action="version", version=f"cudcn {cudcn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except CommandError as error:
        print(f"cudcn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cudcn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
