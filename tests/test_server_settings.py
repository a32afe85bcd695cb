"""ServerApp settings from a Flower run config: required keys, types, the federation file."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqr.core.errors import ConfigError
from seqr.operator.settings import ServerSettings, federation_from_run_config, state_dir_for

BASE = {"registry-dir": "/srv/reg", "server-keys": "/k1, /k2", "lora-rank": 4}


def test_settings_read_their_keys_and_leave_the_rest() -> None:
    s = ServerSettings.from_run_config({**BASE, "num-server-rounds": 3, "auto-enrol": True})
    assert s.key_dirs == (Path("/k1"), Path("/k2"))
    assert (s.num_server_rounds, s.auto_enrol, s.train_timeout_s) == (3, True, 3600.0)
    assert s.state_path == state_dir_for(Path("/srv/reg")) == Path("/srv/reg.server-state")
    assert set(ServerSettings.keys()) >= {"registry-dir", "server-keys", "probe-text"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"registry-dir": None}, "no 'registry-dir'"),
        ({"server-keys": " , "}, "server-keys"),
        ({"num-server-rounds": "2"}, "num-server-rounds = '2' must be of type int"),
        ({"auto-enrol": 1}, "auto-enrol = 1 must be of type bool"),
        ({"train-timeout-s": -1}, "train-timeout-s = -1 must be a finite number >= 0"),
        ({"adapter-dtype": "I8"}, "adapter-dtype"),
        ({"max-sigma-ratio": 0.5}, "max-sigma-ratio = 0.5 must be >= 1"),
    ],
)
def test_bad_settings_name_key_and_value(change: dict, message: str) -> None:  # type: ignore[type-arg]
    config = {**BASE, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        ServerSettings.from_run_config(config)


def test_federation_file_wins_over_run_config_keys(tmp_path: Path) -> None:
    assert federation_from_run_config(BASE).lora_rank == 4
    path = tmp_path / "fed.toml"
    path.write_text("[federation]\nlora-rank = 16\na-seed = 9\n")
    fed = federation_from_run_config({**BASE, "federation-file": str(path)})
    assert (fed.lora_rank, fed.a_seed) == (16, 9)
    with pytest.raises(ConfigError, match="does not exist"):
        federation_from_run_config({**BASE, "federation-file": str(tmp_path / "none.toml")})
