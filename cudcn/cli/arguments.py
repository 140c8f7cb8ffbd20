"""What the subcommands share: the parser, argument types and the error a command reports.

A mistake on the command line ends in one line naming the option, what was
expected and what was received (argparse's format, exit status 2), and a
line pointing to the command's help, never in a traceback or a page of
usage; so does a missing optional package, named with the extra that
brings it. Every number an option takes is bounded, so that a typo is
refused at once instead of starting work that runs for minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn


class CommandError(Exception):
    """The command cannot run as asked; the message says why and what to do.

    ``cudcn.cli.main`` prints it as ``cudcn <command>: error: <message>`` and
    exits with status 2.
    """


class Parser(argparse.ArgumentParser):
    """argparse's parser, with errors as one line and a pointer to the help
    (``cudcn bench: error: ...`` then ``see cudcn bench --help``) instead of
    the usage. Subcommands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee {self.prog} --help\n")


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer from low to high (no upper bound when high is None)."""
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


#: argparse types without an upper bound (the benchmark scripts' options).
positive_int = int_range(1)
nonnegative_int = int_range(0)
#: Seeds NumPy's and torch's generators take alike.
seed_int = int_range(0, 2**32 - 1)


def plural(count: int, word: str) -> str:
    """"1 seed", "3 seeds"."""
    return f"{count} {word}{'s' if count != 1 else ''}"


def is_installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken entry in sys.modules
        return False


def require(modules: dict[str, str], purpose: str, install: str) -> None:
    """Raise CommandError unless every module is installed.

    modules maps an importable name to its package's name on PyPI; purpose
    says what needs them ("cudcn demo"), install how to get them.
    """
    missing = [package for module, package in modules.items() if not is_installed(module)]
    if missing:
        raise CommandError(f"{purpose} needs {', '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: {install}")


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Collect the warnings raised inside the block (e.g. by importing a
    framework) instead of printing them, as "Category: message" lines without
    repeats, so that a command can print them after its report."""
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lines
    lines.extend(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))


def print_warnings(lines: list[str], during: str) -> None:
    """Print collected warnings under a heading saying where they came from."""
    if lines:
        print(f"\nwarnings raised while {during} (theirs, not cudcn's):")
        for line in lines:
            print(f"  {line}")
