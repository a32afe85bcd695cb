"""A node's settings, read once per Flower message: where its private data and key are.

They come from the node's ``--node-config`` and, for every key but ``progress-dir``, from the
run config when the node does not set them (a simulation passes them that way). An empty
value counts as unset. ``progress-dir`` says where the node WRITES, so only the node's own
config may set it, except in simulation (``partition-id`` set), where operator and nodes are
one machine. In simulation ``partition-id`` picks the partition-id-th subfolder (sorted) of
``data-dir``, and a ``signing-key`` folder holds ``<subfolder>/signing_key.pem``.

A setting that is missing or unusable is a NodeSettingError, whose text names the setting and
a fixed reason only (never its value, a path or file contents), so it may travel to the
operator as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from seqr.core.errors import ConfigError
from seqr.core.signing import PRIVATE_KEY_NAME

__all__ = ["NodeSettingError", "NodeSettings", "ResolvedNode"]


class NodeSettingError(ConfigError):
    """A node setting that is missing or unusable. Its message is built from fixed text and
    the setting's name only, so it may travel to the server as it is."""


@dataclass(frozen=True)
class ResolvedNode:
    """The settings checked: what a node trains on and signs with."""

    data_dir: Path
    key_path: Path
    name: str
    passphrase: bytes | None


@dataclass(frozen=True)
class NodeSettings:
    """Every node setting (module docstring); the field ``data_dir`` is the key ``data-dir``."""

    data_dir: str | None = None  # required
    signing_key: str | None = None  # required
    adapter_name: str | None = None  # default: the data folder's name
    cache_dir: str | None = None
    work_dir: str | None = None  # keeps checkpoints across rounds
    signing_key_passphrase_env: str | None = None
    progress_dir: str | None = None  # the node's own config only (module docstring)
    partition_id: int | None = None  # simulation only

    @staticmethod
    def names() -> tuple[str, ...]:
        """The setting names a run config may declare (all but partition-id)."""
        return tuple(f.name.replace("_", "-") for f in fields(NodeSettings))[:-1]

    @classmethod
    def from_context(cls, context: Any) -> NodeSettings:
        node, run = context.node_config, context.run_config
        simulated = "partition-id" in node
        values: dict[str, Any] = {}
        for key in cls.names():
            value = node.get(key)
            if value is None and (key != "progress-dir" or simulated):
                value = run.get(key)
            values[key.replace("-", "_")] = (
                None if value is None or str(value) == "" else str(value)
            )
        partition = int(node["partition-id"]) if simulated else None
        return cls(**values, partition_id=partition)

    def inputs(self) -> tuple[Path, Path, str | None]:
        """(data folder, signing key file, adapter name), partitions resolved, unchecked."""
        for key, value in (("data-dir", self.data_dir), ("signing-key", self.signing_key)):
            if value is None:
                raise NodeSettingError(
                    f"node setting {key} is not set; the node passes it with "
                    f"--node-config '{key}=\"...\"'"
                )
        data_dir, key_path = Path(str(self.data_dir)), Path(str(self.signing_key))
        name = self.adapter_name
        if self.partition_id is not None:
            parts = sorted(
                p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            if not 0 <= self.partition_id < len(parts):
                raise ConfigError(
                    f"partition-id {self.partition_id} but {data_dir} has {len(parts)} subfolders"
                )
            data_dir = parts[self.partition_id]
            name = name or data_dir.name
            if key_path.is_dir():
                key_path = key_path / data_dir.name / PRIVATE_KEY_NAME
        return data_dir, key_path, name

    def resolve(self) -> ResolvedNode:
        """Every setting checked before any work, each failure a NodeSettingError."""
        from seqr.node.export import check_adapter_name, default_name

        data_dir, key_path, name = self.inputs()
        if not data_dir.is_dir():
            raise NodeSettingError("node setting data-dir does not name a readable folder")
        if not key_path.is_file():
            raise NodeSettingError("node setting signing-key does not name a key file")
        try:
            name = check_adapter_name(name if name is not None else default_name(data_dir))
        except ConfigError:
            raise NodeSettingError(
                "node setting adapter-name must be 1-128 characters of A-Z a-z 0-9 . _ - and "
                "start with a letter or digit"
            ) from None
        env = self.signing_key_passphrase_env
        if env is not None and env not in os.environ:
            raise NodeSettingError(
                "node setting signing-key-passphrase-env names an environment variable that is "
                "not set in the SuperNode's environment"
            )
        passphrase = None if env is None else os.environ[env].encode()
        return ResolvedNode(data_dir, key_path, name, passphrase)
