"""Start the server side of a federation: keys, base model, probe, registry (no Flower).

Cheap checks first (settings, registry folder, server keys), so a misconfigured run fails
in a second; then the base model is loaded and hashed, the probe runs once, and the
Publisher takes the registry's single-writer lock and loads its stored state (a restarted
server continues where the last one stopped).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from seqr.core.base_model import load_base_model
from seqr.core.errors import ConfigError, KeyFileError
from seqr.core.federation import FederationConfig
from seqr.operator.federation_setup import setup_federation
from seqr.operator.probe import Probe, load_probe_texts
from seqr.operator.registry_ops import load_server_keys, open_publisher
from seqr.operator.round import ReplayStore, RoundRunner
from seqr.operator.settings import ServerSettings
from seqr.registry import layout

__all__ = ["start_server"]

log = logging.getLogger("seqr.server")


def start_server(settings: ServerSettings, fed: FederationConfig) -> RoundRunner:
    """The round runner for this registry; close ``runner.publisher`` when done."""
    registry = settings.registry_path
    if not (registry / layout.METADATA / layout.root_name(1)).is_file():
        raise ConfigError(
            f"registry-dir {registry} is not a registry; create it first with "
            f"`seqr server init --registry {registry} --key KEYDIR`"
        )
    keys = load_server_keys(settings.key_dirs, _passphrase(settings.server_key_passphrase_env))
    base = load_base_model(fed.base_model, expected_sha256=fed.base_model_sha256)
    setup = setup_federation(fed, base.model, base.sha256, adapter_dtype=settings.adapter_dtype)
    probe = Probe.build(
        base.model,
        base.tokenizer,
        load_probe_texts(settings.probe_text),
        setup,
        max_tokens=settings.probe_max_tokens,
    )
    publisher = open_publisher(registry, keys, setup, auto_enrol=settings.auto_enrol)
    log.info(
        "registry %s at version %d, %d enrolled client(s); base model %s",
        registry,
        publisher.version,
        len(publisher.document.clients),
        base.sha256[:16],
    )
    return RoundRunner(
        publisher,
        setup,
        probe,
        ReplayStore(settings.state_path),
        max_age=timedelta(seconds=settings.max_age_s),
        **settings.policy_bounds(),
    )


def _passphrase(env: str) -> bytes | None:
    if not env:
        return None
    value = os.environ.get(env)
    if not value:
        raise KeyFileError(f"server-key-passphrase-env names {env}, which is not set or empty")
    return value.encode("utf-8")
