"""The small real registry of tests/_route_world.py, built once per test process for every
tests/test_serve_*.py module, plus a copy of the tiny model with a chat template (tiny models
have none; the copy keeps the weights, so the model hash the adapters signed is unchanged)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _route_world import DOMAINS, RouteWorld, domain_text, make_world, publish_registry

from seqr.consumer.serve import (
    EngineConfig,
    LimitsConfig,
    PoolConfig,
    RegistrySource,
    SeqrServer,
    ServeConfig,
    build_state,
)
from seqr.core.base_model import load_base_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class ServeWorld:
    route: RouteWorld
    model_dir: Path  # the tiny model with a chat template

    @property
    def registry(self) -> Path:
        return self.route.registry


@functools.cache
def serve_world() -> ServeWorld:
    root = Path(tempfile.mkdtemp(prefix="seqr-serve-world-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    route = make_world(root / "world")
    model_dir = root / "tiny-chat"
    shutil.copytree(route.model_dir, model_dir)
    base = load_base_model(str(model_dir))
    base.tokenizer.chat_template = CHAT_TEMPLATE
    base.tokenizer.save_pretrained(model_dir)
    return ServeWorld(route, model_dir)


def registry_copy(world: ServeWorld, dest: Path, names: tuple[str, ...] = DOMAINS) -> Path:
    """A new registry of the world's signed exports (version 2 holds ``names``)."""
    return publish_registry(
        dest / "registry", dest / "server-key", world.route.exports, names=names
    )


def start_server(
    registry: Path | str, model_dir: Path, mirror: Path | None = None, **config: Any
) -> SeqrServer:
    """A real uvicorn server on 127.0.0.1 and a free port, serving from a thread."""
    limits = config.pop(
        "limits", LimitsConfig(max_prompt_tokens=256, max_tokens=64, default_chat_max_tokens=16)
    )
    serve = ServeConfig(
        port=0,
        limits=limits,
        pool=config.pop("pool", PoolConfig()),
        engine=config.pop("engine", EngineConfig()),
        **config,
    )
    state = build_state(
        serve, RegistrySource(str(registry), mirror=mirror), load_base_model(str(model_dir))
    )
    return SeqrServer(state).start()


def held_out_prompts() -> list[tuple[str, str]]:
    """(domain, text) the adapters never saw, domains interleaved, lengths varying."""
    return [(d, domain_text(d, lines, seed)) for seed, lines in ((1, 2), (2, 1)) for d in DOMAINS]
