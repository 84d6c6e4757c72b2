"""CRC32C (Castagnoli), the checksum of every structure and data cluster: the `crc32c` package's compiled core.

The package's `__init__` looks its own version up through
`importlib.metadata` when imported, which was about a third of the start-up
of a `lamina` command; so the compiled module is loaded by itself where it
is found, and the package is imported as usual where it is not.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Callable


def _compiled_core() -> ModuleType:
    """`crc32c._crc32c`, loaded without running the package's `__init__`; the package itself as the fallback."""
    if "crc32c" in sys.modules:
        return sys.modules["crc32c"]
    try:
        package = importlib.util.find_spec("crc32c")  # a top-level name: found, not imported
        places = list(package.submodule_search_locations or []) if package is not None else []
        for place in places:
            finder = importlib.machinery.FileFinder(
                place, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
            spec = finder.find_spec("crc32c._crc32c")
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                if callable(getattr(module, "crc32c", None)):
                    return module
    except (ImportError, OSError):
        pass
    import crc32c

    return crc32c


crc32c: Callable[..., int] = _compiled_core().crc32c  # crc32c(data, value=0) -> int
