"""The ``cudcn`` command line (also ``python -m cudcn``).

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int`` and imports nothing heavy
(no CuPy, torch or paddle) until ``run`` is called.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS = {
    "check": ("cudcn.cli.check", "run every available backend against the NumPy backend and the oracle"),
    "info": ("cudcn.cli.info", "versions, GPUs, available backends and the kernel cache"),
    "bench": ("cudcn.cli.bench", "time cudcn against the peers that are present"),
    "demo": ("cudcn.cli.demo", "train plain, DCNv1, DCNv2 and CoordConv CNNs on deformed digits and compare"),
    "compile": ("cudcn.cli.compile", "compile every CUDA kernel instantiation through NVRTC (no GPU needed)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cudcn", description="Deformable convolution for any array framework.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
