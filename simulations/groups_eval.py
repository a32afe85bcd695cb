"""placeholder"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def group_run_config_defaults() -> dict[str, Any]:
    """The group keys (server/groups.py) with their defaults, for the app's pyproject."""
    from dataclasses import fields

    from server.groups import GroupSettings

    return {f.name.replace("_", "-"): f.default for f in fields(GroupSettings)}


def write_group_app(dest: Path) -> Path:
    """simulations/flower_local.write_app plus the group keys (Flower refuses undeclared keys)."""
    from simulations.flower_local import _toml_value, write_app

    app = write_app(dest)
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in group_run_config_defaults().items())
    with (app / "pyproject.toml").open("a") as out:
        out.write(lines + "\n")
    return app
