"""Bounded JSON for legacy HTTP bodies: size, depth and shape limits before anyone trusts it.

Legacy devices send JSON that we must parse before we can find their key (the device id is in
the body). So the parser is the first thing an attacker reaches: every body is refused unless it
is small enough, nested shallowly, valid UTF-8, free of duplicate keys (two parsers could disagree
on which one wins) and free of NaN/Infinity (not JSON). CPython's `json` raises RecursionError on
very deep nesting and ValueError on integers past `sys.get_int_max_str_digits()`; both become
`Rejected(MALFORMED)` here, like every other parse failure.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from sensorseal.core.errors import Rejected, RejectReason

__all__ = ["loads_bounded"]


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _depth(value: Any, max_depth: int) -> bool:
    """True if no container in `value` is nested deeper than max_depth (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def loads_bounded(raw: bytes, *, max_size: int, max_depth: int) -> Any:
    """Parse `raw` as UTF-8 JSON; Rejected(OVERSIZE | MALFORMED) unless within the limits."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise Rejected(RejectReason.MALFORMED, "body is not bytes")
    if len(raw) > max_size:
        raise Rejected(RejectReason.OVERSIZE, f"{len(raw)} bytes > limit {max_size}")
    try:
        text = bytes(raw).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise Rejected(RejectReason.MALFORMED, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, hooks
        raise Rejected(RejectReason.MALFORMED, f"not JSON ({type(exc).__name__})") from None
    if not _depth(value, max_depth):
        raise Rejected(RejectReason.MALFORMED, f"JSON nested deeper than {max_depth}")
    return value
