"""``seqr serve``: an OpenAI-compatible server that routes every request to an adapter itself.

One idea per file: config.py (limits, batching, pool), source.py (where an audited registry comes
from), live.py (the served version and hot swaps), scoring.py (per-sequence SEQR with changing
statistics), pool.py (query statistics from served prompts), sampling.py (next token, stop
strings), batch.py (KV-cache merging), engine.py (continuous batching thread), prompts.py
(tokens and the chat template), schemas.py / errors.py (the OpenAI API's shapes), generation.py
(engine events to a response or SSE), metrics.py (Prometheus), page.py (GET /), app.py (FastAPI
handlers), server.py (assembly, uvicorn, SIGHUP), bench.py (``seqr bench serve``).
"""

from seqr.consumer.serve.config import EngineConfig, LimitsConfig, PoolConfig, ServeConfig
from seqr.consumer.serve.server import SeqrServer, build_state
from seqr.consumer.serve.source import RegistrySource

__all__ = [
    "EngineConfig",
    "LimitsConfig",
    "PoolConfig",
    "RegistrySource",
    "SeqrServer",
    "ServeConfig",
    "build_state",
]
