"""examples/fed.toml: loads with the real loader, holds every federation key, each commented."""

import tomllib
from pathlib import Path

from seqr.core.federation import FederationConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fed.toml"


def test_example_federation_file_loads_with_the_real_loader_and_gives_the_defaults():
    assert FederationConfig.from_toml(EXAMPLE) == FederationConfig()


def test_example_names_every_federation_key_each_with_a_comment_above_it():
    text = EXAMPLE.read_text()
    assert sorted(tomllib.loads(text)) == sorted(FederationConfig.keys())
    lines = text.splitlines()
    names = FederationConfig.keys()
    for key in names:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert lines[at - 1].startswith("#") or lines[at - 2].startswith("#"), key
