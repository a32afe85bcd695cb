"""`seqr simulate groups` splits one domain into K client parts and a held-out part."""

from pathlib import Path

import pytest

from seqr.core.errors import ConfigError, DataError
from seqr.sim.groups_eval import GroupsEvalConfig, split_domain


def _domain(folder: Path, paragraphs: int) -> Path:
    folder.mkdir(parents=True)
    for f in range(3):
        body = "\n\n".join(f"file {f} paragraph {i}\nsecond line" for i in range(paragraphs))
        (folder / f"part-{f}.txt").write_text(body, encoding="utf-8")
    return folder


def test_split_keeps_heldout_text_out_of_every_part_and_pooled_is_the_union(tmp_path) -> None:
    parts, pooled, held = split_domain(_domain(tmp_path / "wiki", 40), tmp_path / "work", 4)
    assert [p.name for p in parts] == [f"wiki_part{i}" for i in range(4)]

    def paragraphs(folder: Path) -> list[str]:
        return [
            p for f in sorted(folder.iterdir()) for p in f.read_text().split("\n\n") if p.strip()
        ]

    in_parts = [p for part in parts for p in paragraphs(part)]
    heldout = paragraphs(held)
    assert sorted(in_parts) == sorted(paragraphs(pooled))
    assert not set(heldout) & set(in_parts)
    assert len(heldout) + len(in_parts) == 120  # nothing lost
    assert 0.08 <= len(heldout) / 120 <= 0.12  # 2 of 20 contiguous runs
    assert all(len(paragraphs(p)) > 0 for p in parts)


def test_too_small_domains_and_bad_settings_are_refused(tmp_path) -> None:
    with pytest.raises(DataError, match="paragraphs"):
        split_domain(_domain(tmp_path / "tiny", 5), tmp_path / "work", 4)
    with pytest.raises(ConfigError, match="needs >= 2 clients"):
        GroupsEvalConfig(tmp_path, tmp_path / "out", clients=1)


def test_only_the_domains_parts_are_group_members_and_others_keep_the_registry_flow() -> None:
    from seqr.sim.groups_eval import group_members

    fingerprints = {"wiki_part1": "sha256:b", "wiki_part0": "sha256:a", "code": "sha256:c",
                    "wikipedia": "sha256:d"}  # fmt: skip
    assert group_members("wiki", fingerprints) == "wiki_part0@sha256:a,wiki_part1@sha256:b"
