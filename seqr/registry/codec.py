"""Strict JSON for signed registry files: no floats, no duplicate keys, exact field sets.

Signatures in the registry cover EXACT bytes (DSSE, see envelope.py), so JSON is never
re-serialised for verification and no canonical form is needed. We still keep signed JSON
free of floats (RFC 8785 / OLPC canonical JSON disagree on them, and a float that rounds
differently in two parsers is a classic confusion): every number in a signed payload is an
integer, every time is an RFC 3339 UTC string ``YYYY-MM-DDTHH:MM:SSZ``, every hash is
lowercase hex. Adapter statistics (which are floats) are never inlined: the metadata
carries the SHA-256 and length of the exact ``norm_stats.json`` bytes.

``Fields`` reads a parsed object with typed accessors that name the offending field path
in every error ("registry.entries[3].files.adapter_model.safetensors.sha256 ...").
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NoReturn

from seqr.core.errors import FormatError

__all__ = ["loads", "dumps", "format_time", "parse_time", "Fields", "MAX_INT"]

MAX_INT = 2**53 - 1  # largest integer every JSON parser reads exactly (RFC 8259 section 6)
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_HEX = re.compile(r"[0-9a-f]*")


def _no_float(text: str) -> NoReturn:
    raise FormatError(f"number {text} is not an integer; signed registry JSON carries no floats")


def _no_constant(text: str) -> NoReturn:
    raise FormatError(f"{text} is not valid JSON; signed registry JSON carries no NaN/Infinity")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r} in JSON object; each key may appear once")
        out[key] = value
    return out


def loads(data: bytes, what: str) -> Any:
    """Parse UTF-8 JSON bytes strictly; FormatError names ``what`` on any problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(
            text,
            parse_float=_no_float,
            parse_constant=_no_constant,
            object_pairs_hook=_no_duplicates,
        )
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply to be registry JSON") from None


def dumps(obj: Any) -> bytes:
    """Deterministic compact JSON bytes (sorted keys, ASCII): what the publisher signs."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with whole seconds; refuses naive datetimes (whose zone is a guess)."""
    if when.tzinfo is None:
        raise FormatError(f"time {when.isoformat()} has no time zone; pass an aware UTC datetime")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object, what: str) -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SSZ`` (the only form format_time writes) into aware UTC."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise FormatError(f"{what} must be a UTC time like 2025-01-31T12:00:00Z, got {text!r}")
    try:
        return _parse_time(text)
    except ValueError as exc:
        raise FormatError(f"{what} is not a valid time: {text!r} ({exc})") from None


@functools.lru_cache(maxsize=4096)
def _parse_time(text: str) -> datetime:
    # Cached: a registry repeats the same admission times in every version (strptime is slow).
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


class Fields:
    """A JSON object with an exact set of keys, read through typed accessors."""

    def __init__(
        self,
        value: object,
        what: str,
        required: Iterable[str],
        optional: Iterable[str] = (),
    ) -> None:
        if not isinstance(value, dict):
            raise FormatError(f"{what} must be a JSON object, got {type(value).__name__}")
        required_set = frozenset(required)
        if value.keys() != required_set:  # fast path: exactly the required keys
            missing = sorted(required_set - value.keys())
            unknown = sorted(value.keys() - required_set - frozenset(optional))
            if missing:
                raise FormatError(f"{what} is missing field(s) {', '.join(missing)}")
            if unknown:
                raise FormatError(
                    f"{what} has unknown field(s) {', '.join(unknown)}; "
                    "was it written by a newer seqr or tampered with?"
                )
        self.value: dict[str, Any] = value
        self.what = what

    def path(self, key: str) -> str:
        return f"{self.what}.{key}"

    def has(self, key: str) -> bool:
        return key in self.value

    def raw(self, key: str) -> Any:
        return self.value[key]

    def text(self, key: str, *, max_len: int = 4096) -> str:
        v = self.value[key]
        if not isinstance(v, str) or len(v) > max_len:
            raise FormatError(f"{self.path(key)} must be a string of at most {max_len} characters")
        return v

    def const(self, key: str, expected: str) -> str:
        v = self.value[key]
        if v != expected:
            raise FormatError(f"{self.path(key)} must be {expected!r}, got {v!r}")
        return expected

    def integer(self, key: str, *, low: int = 0, high: int = MAX_INT) -> int:
        v = self.value[key]
        # bool is an int subclass in Python; JSON true is not a number.
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise FormatError(f"{self.path(key)} must be an integer in [{low}, {high}], got {v!r}")
        return v

    def hex(self, key: str, nbytes: int) -> str:
        v = self.value[key]
        if not isinstance(v, str) or len(v) != 2 * nbytes or not _HEX.fullmatch(v):
            raise FormatError(
                f"{self.path(key)} must be {2 * nbytes} lowercase hex characters, got {v!r:.80}"
            )
        return v

    def time(self, key: str) -> datetime:
        return parse_time(self.value[key], self.path(key))

    def mapping(self, key: str) -> dict[str, Any]:
        v = self.value[key]
        if not isinstance(v, dict):
            raise FormatError(f"{self.path(key)} must be a JSON object, got {type(v).__name__}")
        return v

    def array(self, key: str, *, max_len: int = MAX_INT) -> list[Any]:
        v = self.value[key]
        if not isinstance(v, list) or len(v) > max_len:
            raise FormatError(f"{self.path(key)} must be a list of at most {max_len} items")
        return v


def check_hex(value: object, nbytes: int, what: str) -> str:
    """A standalone hex check for list items and mapping keys."""
    if not isinstance(value, str) or len(value) != 2 * nbytes or not _HEX.fullmatch(value):
        raise FormatError(
            f"{what} must be {2 * nbytes} lowercase hex characters, got {value!r:.80}"
        )
    return value
