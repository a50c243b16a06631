"""The harness's user-facing error and its one-line form."""

from __future__ import annotations

from metrics.errors import one_line

__all__ = ["HarnessError", "one_line"]


class HarnessError(Exception):
    """A user-facing error: printed as one line, exit status 2."""
