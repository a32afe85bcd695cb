"""examples/machine_text_types.py: each domain is UTF-8 text from readable files only, capped,
in a fixed order, and readable by the simulation's own text reader."""

import gzip
import importlib.util
from pathlib import Path

from seqr.core.textdata import read_text_folder

_PATH = Path(__file__).resolve().parents[1] / "examples" / "machine_text_types.py"
_spec = importlib.util.spec_from_file_location("machine_text_types", _PATH)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def test_a_domain_keeps_utf8_text_files_only_capped_and_in_a_fixed_order(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i in range(30):
        path = src / f"f{i:02d}.txt"
        path.write_text(f"file {i} " + "words of text " * 40, encoding="utf-8")
        files.append(str(path))
    (src / "binary.txt").write_bytes(b"\xff\xfe" + b"\x00" * 500)  # not UTF-8: left out
    (src / "short.txt").write_text("too short")  # under 200 characters: left out
    with gzip.open(src / "log.gz", "wb") as f:
        f.write(b"gzipped changelog " * 30)
    files += [str(src / "binary.txt"), str(src / "short.txt"), str(src / "log.gz")]
    monkeypatch.setattr(example, "DOMAIN_BYTES", 6_000)
    monkeypatch.setattr(example, "PART_BYTES", 2_500)
    used = example.write_domain(tmp_path / "a", files)
    example.write_domain(tmp_path / "b", list(reversed(files)))
    parts = sorted((tmp_path / "a").iterdir())
    text = "".join(p.read_text(encoding="utf-8") for p in parts)
    assert len(parts) == 3 and len(text.encode()) == 6_000
    assert "\ufffd" not in text and "too short" not in text
    assert 0 < used < len(files)
    # The order depends on the files, not on how they were listed.
    assert [p.read_bytes() for p in parts] == [
        p.read_bytes() for p in sorted((tmp_path / "b").iterdir())
    ]
    assert len(read_text_folder(tmp_path / "a")) == 3
