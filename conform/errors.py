"""Errors of the conformance kit a user can cause: each names what is wrong and where."""
from __future__ import annotations

from lamina.spec.errors import LaminaError


class ConformError(LaminaError):
    """Base of the kit's errors; the command prints the message on one line."""


class VectorsMissing(ConformError):
    """The vectors directory given does not exist or holds no manifest."""


class BadManifest(ConformError):
    """manifest.json (or a vector's expect.json) does not parse or does not match the files."""


class ScriptError(ConformError):
    """An operation script has a line that is not one of the commands PROTOCOL.md defines."""


class GenerationError(ConformError):
    """Building a vector gave a result that contradicts its design (two readers disagree, a verdict differs)."""
