"""Private text folders: strict reading, fixed-length chunks, a split that never moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny import copy_texts, tiny_model_dir
from transformers import AutoTokenizer

from seqr.core.errors import DataError
from seqr.core.textdata import heldout_mask, load_text_data, read_text_folder, tokenize_chunks


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir())


def test_reads_recursively_in_sorted_order_skipping_hidden_and_binary(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zeta\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("secret\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\xff\xfe")
    (tmp_path / "empty.txt").write_text("  \n")
    files = read_text_folder(tmp_path)
    assert [str(f.path) for f in files] == ["a.txt", "b/z.md"]
    assert files[0].text == "alpha\n"


def test_non_utf8_file_skipped_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert [str(f.path) for f in read_text_folder(tmp_path)] == ["good.txt"]
    assert "skipped 1 file(s), binary or not UTF-8: latin1.txt" in caplog.text


@pytest.mark.parametrize("case", ["missing", "a file", "empty", "only empty files", "no text"])
def test_unusable_folder_rejected(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "data"
    if case == "a file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
    if case == "only empty files":
        (folder / "a.txt").write_text("")
    if case == "no text":
        (folder / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=str(folder)):
        read_text_folder(folder)


def test_chunks_fixed_length_with_eos_between_files(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    files = read_text_folder(copy_texts(tmp_path, ("bisect.py", "heapq.py")))
    chunks = tokenize_chunks(files, tokenizer, 32)
    assert chunks.dtype == np.int64 and chunks.shape[1] == 32
    total = sum(len(tokenizer(f.text, add_special_tokens=False)["input_ids"]) + 1 for f in files)
    assert chunks.shape[0] == total // 32
    assert (chunks == tokenizer.eos_token_id).sum() >= 1


def test_too_little_text_rejected(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than one chunk"):
        load_text_data(tmp_path, tokenizer, seq_len=64, heldout_fraction=0.1, seed=0)


def test_split_deterministic_content_based_and_seeded(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    folder = copy_texts(tmp_path / "d")
    one = load_text_data(folder, tokenizer, seq_len=16, heldout_fraction=0.2, seed=3)
    two = load_text_data(folder, tokenizer, seq_len=16, heldout_fraction=0.2, seed=3)
    assert np.array_equal(one.train, two.train) and one.fingerprint == two.fingerprint
    n = len(one.train) + len(one.heldout)
    assert n > 300 and 0.1 < len(one.heldout) / n < 0.3
    # The decision is a function of the chunk alone: reordering chunks permutes the mask.
    chunks = np.concatenate([one.train, one.heldout])
    mask = heldout_mask(chunks, 0.2, 3)
    assert mask.sum() == len(one.heldout) and mask[len(one.train) :].all()
    assert not np.array_equal(mask, heldout_mask(chunks, 0.2, 4))
    # Held-out and train never share a chunk.
    train_rows = {row.tobytes() for row in one.train}
    assert not any(row.tobytes() in train_rows for row in one.heldout)
