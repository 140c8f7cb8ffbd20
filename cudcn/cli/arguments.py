"""What the subcommands share: argument types and the error a command reports.

A mistake on the command line ends in one line naming the option, what was
expected and what was received (argparse's own format, exit status 2),
never in a traceback; so does a missing optional package, named with the
extra that brings it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import warnings
from collections.abc import Iterator


class CommandError(Exception):
    """The command cannot run as asked; the message says why and what to do.

    ``cudcn.cli.main`` prints it as ``cudcn <command>: error: <message>`` and
    exits with status 2.
    """


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


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
