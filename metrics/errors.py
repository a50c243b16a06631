"""Errors as one line: what a user reads of an exception that ends a run."""

from __future__ import annotations


def one_line(error: object, *, typed: bool = False, first: bool = False) -> str:
    """``error``'s text with its whitespace (newlines too) collapsed; its type's name when it
    has no text. ``typed``: prefixed with the type's name (``ValueError: ...``), for errors
    that are not the harness's own one-line messages. ``first``: only the text's first line
    (for errors whose later lines are a dump, e.g. a YAML parser's context)."""
    text = str(error).strip()
    if first:
        text = text.splitlines()[0] if text else ""
    text = " ".join(text.split())
    name = type(error).__name__
    if not text:
        return name if isinstance(error, BaseException) else ""
    return f"{name}: {text}" if typed else text
