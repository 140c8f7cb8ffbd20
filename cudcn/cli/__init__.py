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
from cudcn.cli.arguments import CommandError, Parser

#: subcommand -> (module, one-line help)
COMMANDS = {
    "check": ("cudcn.cli.check", "check every available backend and adapter against the NumPy backend"),
    "info": ("cudcn.cli.info", "versions, settings, GPUs, available backends and the kernel cache"),
    "bench": ("cudcn.cli.bench", "time cudcn against the peers that are present"),
    "demo": ("cudcn.cli.demo", "train plain, DCNv1, DCNv2 and CoordConv CNNs on deformed digits and compare"),
    "compile": ("cudcn.cli.compile", "compile every CUDA kernel instantiation through NVRTC (no GPU needed)"),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; a mistake exits with status 2 after one line
    from the parser it concerns (the subcommand's when there is one) and a
    pointer to that parser's help."""
    parser = Parser(prog="cudcn", description="Deformable convolution for any array framework.")
    parser.add_argument("--version", action="version", version=f"cudcn {cudcn.__version__}")
    # Not required here: argparse would then report a missing command before
    # an unknown option (``cudcn --bogus``), which is the real mistake.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help=", ".join(COMMANDS) + " (cudcn COMMAND --help for its options)")
    parsers = {}
    for name, (module_name, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(parsers[name])
    # parse_known_args: the options left over are reported by the parser of
    # the command they were given to, not with the top-level usage.
    args, unknown = parser.parse_known_args(argv)
    concerned = parsers.get(args.command, parser)
    if unknown:
        concerned.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error(f"a command is required: one of {', '.join(COMMANDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parse(argv)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except CommandError as error:
        print(f"cudcn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cudcn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
