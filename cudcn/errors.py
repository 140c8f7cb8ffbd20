"""The errors cudcn raises.

For a malformed call, each is a ValueError or TypeError, as Python code
expects of a bad argument, and also a RuntimeError, which is what
torchvision and torch raise for bad shapes: code written for either catches
them. For what cudcn does not do (double backward), an
:class:`UnsupportedError`. For an adapter whose framework is missing, a
ModuleNotFoundError naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class ArgumentError(ValueError, RuntimeError):
    """A shape, size, geometry or setting is wrong (a ValueError and a RuntimeError)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has the wrong type, array kind or dtype (a TypeError and a RuntimeError)."""


class UnsupportedError(NotImplementedError):
    """Something cudcn does not do, such as double backward (a
    NotImplementedError, and so a RuntimeError)."""


def double_backward_error(operation: str) -> UnsupportedError:
    """The error for differentiating the backward of ``operation`` (a second derivative)."""
    return UnsupportedError(
        f"double backward of cudcn's {operation} is not supported: cudcn computes its first "
        f"derivatives only, so a second derivative through it (backward through gradients taken "
        f"with create_graph=True, gradgradcheck, a gradient penalty) cannot be taken"
    )


def import_framework(module: str, package: str) -> ModuleType:
    """``import module`` for the adapter ``cudcn.<module>``.

    Where ``module`` is not installed, raises a ModuleNotFoundError (chained
    from import's own) that names cudcn's extra of the same name, which
    brings ``package``. Any other import error of the framework comes as it is.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        named = module if package == module else f"{module} (the {package} package)"
        raise ModuleNotFoundError(
            f'cudcn.{module} needs {named}, which is not installed: pip install "cudcn[{module}]"',
            name=module,
        ) from error
