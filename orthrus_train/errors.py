"""Exceptions as one line, for the one-line errors and warnings the project prints."""
from __future__ import annotations


def exc_line(e: BaseException, limit: int | None = None) -> str:
    """'TypeName: first line of the message' (at most `limit` characters of that line): transformers, torch.compile
    and the Hub raise messages of many lines, which would break a one-line error or warning."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:limit] if limit is not None else first}"
