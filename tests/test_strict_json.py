"""One strict JSON parser for everything received: each parser-differential and resource
attack is refused with a FormatError that names it, and admission refuses the file that
carries it with the replay state unchanged."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from _signed_export import (
    A_SEED,
    A_SHA,
    BASE_SHA,
    CREATED,
    RANK,
    STATS_MODULES,
    TARGETS,
    expected_tensors,
    make_export,
    make_key,
    make_stats,
    make_tensors,
)
from safetensors.numpy import save

from seqr.core.admission import AdmissionPolicy, SeenSubmissions, admit
from seqr.core.errors import AdmissionError, FormatError
from seqr.core.manifest import read_export
from seqr.core.safetensors_check import parse_safetensors_header
from seqr.core.stats import NormStatistics
from seqr.core.strict_json import MAX_DEPTH, MAX_INT_DIGITS, loads_strict

NOW = CREATED.replace(minute=CREATED.minute + 1)
CAP = 16 * 1024 * 1024


def _loads(text: str | bytes) -> Any:
    data = text.encode() if isinstance(text, str) else text
    return loads_strict(data, what="test.json", max_bytes=CAP)


# --- the parser ----------------------------------------------------------------------------


def test_fifty_thousand_deep_nesting_refused_without_recursion_error() -> None:
    deep = "[" * 50_000 + "]" * 50_000
    with pytest.raises(FormatError, match="nested 50000 levels deep, over the limit of 32"):
        _loads(deep)


def test_depth_limit_is_exact_and_brackets_inside_strings_do_not_count() -> None:
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert _loads(at_limit) is not None
    with pytest.raises(FormatError, match=f"nested {MAX_DEPTH + 1} levels"):
        _loads("[" + at_limit + "]")
    # Brackets and escaped quotes inside a string are text, not structure.
    text = json.dumps({"s": "[[[[" * 100 + '\\"{{{{'})
    assert _loads(text)["s"].startswith("[[[[")


def test_integer_with_too_many_digits_is_a_format_error_not_a_valueerror() -> None:
    huge = "1" * 5000  # Python's int() itself refuses past 4300 digits with a plain ValueError
    with pytest.raises(FormatError, match="integer of 5000 digits, over the limit of 32"):
        _loads(f'{{"count": {huge}}}')
    with pytest.raises(FormatError, match="digits"):
        _loads("-" + "9" * (MAX_INT_DIGITS + 1))
    assert _loads("9" * MAX_INT_DIGITS) == int("9" * MAX_INT_DIGITS)


def test_overlong_number_literal_refused() -> None:
    with pytest.raises(FormatError, match="characters, over the limit"):
        _loads("0." + "1" * 100)


@pytest.mark.parametrize(
    "text", ['"\\ud800"', '{"\\udfff": 1}', '["ok", {"k": ["\\ud83d"]}]', '"a\\udc00b"']
)
def test_lone_surrogate_escape_refused(text: str) -> None:
    with pytest.raises(FormatError, match="lone UTF-16 surrogate"):
        _loads(text)


def test_surrogate_pair_is_one_valid_character() -> None:
    assert _loads('"\\ud83d\\ude00"') == "\U0001f600"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"m": {"x": 1, "x": 1}}', "duplicate key 'x'"),
        ("[NaN]", "NaN"),
        ('{"v": Infinity}', "Infinity"),
        ("-Infinity", "Infinity"),
        ("[1e400]", "overflows to infinity"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
    ],
)
def test_parser_differentials_refused(text: str | bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        _loads(text)


def test_size_cap_checked_before_parsing() -> None:
    with pytest.raises(FormatError, match="over the limit of 4 bytes"):
        loads_strict(b"[1, 2]", what="x", max_bytes=4)


# --- statistics and safetensors through the same parser -------------------------------------


def _stats_with(extra: str) -> bytes:
    """norm_stats.json bytes of make_stats() with ``extra`` spliced in as the first member."""
    body = make_stats().to_json_bytes().decode()
    return ("{" + extra + "," + body[1:]).encode()


def test_duplicate_keys_in_norm_stats_refused_by_statistics_parser() -> None:
    data = _stats_with('"format_version":1')  # the real one follows: last-wins would accept
    with pytest.raises(FormatError, match="duplicate key 'format_version'"):
        NormStatistics.from_json_bytes(data)


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return make_key(tmp_path / "client-key")


def _policy(key: Any) -> AdmissionPolicy:
    return AdmissionPolicy(
        base_model_sha256=BASE_SHA, a_seed=A_SEED, a_sha256=A_SHA, rank=RANK,
        target_modules=TARGETS, expected_tensors=expected_tensors(),
        stats_modules=STATS_MODULES, stats_score="norm",
        allowed_keys=frozenset({key.public.hex()}),
    )  # fmt: skip


def _assert_refused(files: dict[str, bytes], key: Any, reason: str, match: str) -> None:
    seen = SeenSubmissions()
    before = copy.deepcopy(seen)
    with pytest.raises(AdmissionError, match=match) as info:
        admit(files, _policy(key), seen=seen, now=NOW)
    assert info.value.reason == reason
    assert seen == before


def test_deep_privacy_field_in_norm_stats_refused_at_admission(tmp_path: Path, key: Any) -> None:
    privacy = '"privacy":' + "[" * 50_000 + "]" * 50_000
    make_export(tmp_path / "x", key, stats=_stats_with(privacy))
    _assert_refused(read_export(tmp_path / "x"), key, "bad_stats", "nested 50001 levels deep")


def test_duplicate_key_in_norm_stats_refused_at_admission(tmp_path: Path, key: Any) -> None:
    # The same module twice: a parser keeping the first would route with other numbers.
    body = make_stats().to_json_bytes().decode()
    module = json.dumps(STATS_MODULES[0])
    forged = body.replace(
        f"{module}:", f'{module}:{{"count":64,"mean":[0.001],"m2":[0.0001]}},{module}:', 1
    )
    make_export(tmp_path / "x", key, stats=forged.encode())
    _assert_refused(read_export(tmp_path / "x"), key, "bad_stats", "duplicate key")


def test_huge_count_digits_in_norm_stats_refused_at_admission(tmp_path: Path, key: Any) -> None:
    forged = make_stats(count=64).to_json_bytes().replace(b'"count":64', b'"count":' + b"7" * 5000)
    make_export(tmp_path / "x", key, stats=forged)
    _assert_refused(read_export(tmp_path / "x"), key, "bad_stats", "integer of 5000 digits")


def _with_metadata(metadata_json: bytes) -> bytes:
    """make_tensors() as safetensors bytes whose __metadata__ is the given raw JSON."""
    data = save(make_tensors())
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].rstrip(b" ")
    assert header.endswith(b"}")
    new = header[:-1] + b',"__metadata__":' + metadata_json + b"}"
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + n :]


def test_lone_surrogate_in_safetensors_metadata_refused(tmp_path: Path, key: Any) -> None:
    weights = _with_metadata(b'{"format":"pt","note":"\\ud800"}')
    with pytest.raises(FormatError, match="lone UTF-16 surrogate"):
        parse_safetensors_header(weights)
    make_export(tmp_path / "x", key, weights=weights)
    _assert_refused(read_export(tmp_path / "x"), key, "malformed_safetensors", "surrogate")


def test_valid_safetensors_metadata_still_accepted() -> None:
    metadata = b'{"format":"pt","note":"\\u00e9\\ud83d\\ude00"}'
    header = parse_safetensors_header(_with_metadata(metadata))
    assert header.metadata["note"] == "\u00e9\U0001f600"
