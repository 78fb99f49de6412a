"""Old names kept for one release: a module-level ``__getattr__`` that resolves them with a warning.

Example:
    In a module whose ``Old`` became ``hf_lrp_surgery.lrp.layout.Granularity``::

        __getattr__ = moved_names(__name__, {"Old": "hf_lrp_surgery.lrp.layout:Granularity"})
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names", "warn_deprecated"]


def warn_deprecated(message: str, *, stacklevel: int = 3) -> None:
    """Emit the package's deprecation warning (removal in the next release) at the user's call site."""
    warnings.warn(f"{message} (the old name is removed in the next release)", DeprecationWarning, stacklevel=stacklevel)


def moved_names(module: str, targets: Mapping[str, str | Callable[[], Any]]) -> Callable[[str], Any]:
    """Build a module ``__getattr__`` for names that moved or were renamed.

    Args:
        module: The old module's ``__name__``.
        targets: Old name -> ``"new.module:new_name"``, or a function that builds the old value
            (for a value that is now computed from something else).

    Returns:
        The ``__getattr__`` to assign in the old module.

    Example:
        >>> getattr_ = moved_names("pkg.old", {"pad_rows": "hf_lrp_surgery.references.samples:pad_rows"})
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     getattr_("pad_rows").__name__, caught[0].category.__name__
        ('pad_rows', 'DeprecationWarning')
    """

    def __getattr__(name: str) -> Any:
        if name not in targets:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = targets[name]
        if callable(target):
            warn_deprecated(f"{module}.{name} is deprecated", stacklevel=3)
            value = target()
        else:
            new_module, new_name = target.split(":")
            warn_deprecated(f"{module}.{name} is now {new_module}.{new_name}", stacklevel=3)
            value = getattr(importlib.import_module(new_module), new_name)
        # Kept in the module from now on: ``from pkg import old`` probes and then reads, and would warn twice.
        if module in sys.modules:
            setattr(sys.modules[module], name, value)
        return value

    return __getattr__
