"""Named errors of the crash simulator; the CLI prints each on one line and exits with its code."""
from __future__ import annotations

from lamina.spec.errors import LaminaError


class CrashsimError(LaminaError):
    """Base of every error the simulator reports to a user (CLI exit code 4)."""

    exit_code = 4


class BadPlan(CrashsimError):
    """A plan string does not parse or does not fit the trace it names (exit code 5)."""

    exit_code = 5


class UnknownWorkload(CrashsimError):
    """No workload of that name exists in the library (exit code 6)."""

    exit_code = 6


class UnknownModel(CrashsimError):
    """A persistence model name is not one of strict, reorder, torn, torn4k, namespace (exit code 6)."""

    exit_code = 6


class UnknownControl(CrashsimError):
    """No broken variant (negative control) of that name exists (exit code 6)."""

    exit_code = 6
