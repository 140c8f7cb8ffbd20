"""The errors cudcn raises for a malformed call.

Each is a ValueError or TypeError, as Python code expects of a bad argument,
and also a RuntimeError, which is what torchvision and torch raise for bad
shapes: code written for either catches them.
"""

from __future__ import annotations


class ArgumentError(ValueError, RuntimeError):
    """A shape, size, geometry or setting is wrong (a ValueError and a RuntimeError)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has the wrong type, array kind or dtype (a TypeError and a RuntimeError)."""
