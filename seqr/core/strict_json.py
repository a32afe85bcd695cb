"""Strict JSON for bytes that cross a trust boundary (manifests, safetensors headers, configs).

Python's json module silently keeps the LAST of duplicate keys and accepts NaN/Infinity; another
parser may keep the first or refuse. Such parser differentials let one file mean two things to
two readers (the signer and the verifier), so received JSON with either is rejected outright.
"""

from __future__ import annotations

import json
import math
from typing import Any

from seqr.core.errors import FormatError

__all__ = ["loads_strict"]


def loads_strict(data: bytes, *, what: str, max_bytes: int) -> Any:
    """Parse UTF-8 JSON of at most ``max_bytes`` bytes; FormatError naming ``what`` otherwise."""
    if len(data) > max_bytes:
        raise FormatError(f"{what} is {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not valid UTF-8: {exc}") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    except _StrictJsonError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply") from None


class _StrictJsonError(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _StrictJsonError(f"duplicate key {key!r}; each key may appear only once")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _StrictJsonError(f"contains {name}; only finite numbers are allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400" parses to inf without ever naming Infinity
        raise _StrictJsonError(f"number {text[:32]} overflows to infinity")
    return value
