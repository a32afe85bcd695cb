"""Strict JSON for every byte string another party sends (statistics, manifests, configs,
safetensors headers, group replies). One parser, so that no two readers disagree.

Python's json module silently keeps the LAST of duplicate keys and accepts NaN/Infinity;
another parser may keep the first or refuse. Such parser differentials let one file mean two
things to two readers (the signer and the verifier), so received JSON with either is refused.
The other limits make a hostile file cost bounded work and yield only values every consumer
can use:

- nesting deeper than ``max_depth`` is refused BEFORE parsing (the json module recurses and
  would raise RecursionError, or exhaust the C stack, on a 50k-deep array);
- an integer of more than ``MAX_INT_DIGITS`` digits (Python's own limit of 4300 digits
  raises a plain ValueError; no field we read needs more than 20) and a number literal of
  more than ``MAX_NUMBER_CHARS`` characters are refused;
- a number that overflows to infinity ("1e400") is refused like Infinity itself;
- a lone UTF-16 surrogate written as an escape ("\\ud800") is refused: it is not a Unicode
  scalar value (RFC 8259 section 8.2, RFC 3629), cannot be encoded as UTF-8 and makes
  later ``str.encode`` calls fail far from the parser.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from seqr.core.errors import FormatError

__all__ = ["loads_strict", "MAX_DEPTH", "MAX_INT_DIGITS", "MAX_NUMBER_CHARS"]

MAX_DEPTH = 32  # nested arrays/objects; every seqr format nests fewer than 8
MAX_INT_DIGITS = 32  # digits of one integer; 2**64 has 20
MAX_NUMBER_CHARS = 64  # characters of one float literal; repr of a float64 needs <= 24
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # a JSON string, escapes included
_SURROGATE = re.compile("[\ud800-\udfff]")


class _StrictJsonError(Exception):
    pass


def loads_strict(
    data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH, floats: bool = True
) -> Any:
    """Parse UTF-8 JSON of at most ``max_bytes`` bytes; FormatError naming ``what`` otherwise.

    ``floats=False`` refuses every non-integer number (signed records carry integers only:
    a float that two parsers round differently is a parser differential of its own)."""
    if len(data) > max_bytes:
        raise FormatError(f"{what} is {len(data)} bytes, over the limit of {max_bytes} bytes")
    data = bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = _nesting_depth(data)
    if depth > max_depth:
        raise FormatError(f"{what} is nested {depth} levels deep, over the limit of {max_depth}")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float if floats else _no_float,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _StrictJsonError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except RecursionError:  # unreachable after the depth check; kept as a last guard
        raise FormatError(f"{what} is nested too deeply") from None
    _check_strings(value, what)
    return value


def _nesting_depth(data: bytes) -> int:
    """Deepest nesting of [ and { outside strings (a linear scan, no recursion)."""
    if b"[" not in data and b"{" not in data:
        return 0
    skeleton = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    closes = (skeleton == ord("]")) | (skeleton == ord("}"))
    steps = opens.astype(np.int64) - closes.astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _StrictJsonError(f"duplicate key {_shown(key)}; each key may appear only once")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _StrictJsonError(f"contains {name}; only finite numbers are allowed")


def _finite_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _StrictJsonError(
            f"a number of {len(text)} characters, over the limit of {MAX_NUMBER_CHARS}"
        )
    value = float(text)
    if not math.isfinite(value):  # "1e400" parses to inf without ever naming Infinity
        raise _StrictJsonError(f"number {text[:32]} overflows to infinity")
    return value


def _no_float(text: str) -> float:
    raise _StrictJsonError(f"number {text[:32]} is not an integer; only integers are allowed")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _StrictJsonError(f"an integer of {digits} digits, over the limit of {MAX_INT_DIGITS}")
    return int(text)


def _check_strings(value: Any, what: str) -> None:
    """Refuse a lone surrogate in any key or string (iterative: depth is already bounded,
    but a wide document must not cost recursion either)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: list[str] = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in strings:
            if _SURROGATE.search(text):
                raise FormatError(
                    f"{what} holds a lone UTF-16 surrogate escape in {_shown(text)}; "
                    "strings must be valid Unicode"
                )


def _shown(text: str) -> str:
    """A received string as printable ASCII, cut short (never echo control characters)."""
    return ascii(text[:64]) + ("..." if len(text) > 64 else "")
