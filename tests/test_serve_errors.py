"""Every bad request gets an OpenAI-style JSON error with a 4xx status, never a 500 or a
traceback, and the server keeps serving (one real server for the module)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _route_world import DOMAINS
from _serve_world import ServeWorld, serve_world, start_server

from seqr.consumer.serve import LimitsConfig, SeqrServer
from seqr.core.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LIMITS = LimitsConfig(
    max_body_bytes=4096,
    max_prompt_tokens=64,
    max_tokens=32,
    max_n=2,
    max_stop=2,
    max_prompts=2,
    default_chat_max_tokens=8,
)
GOOD = {"model": "auto", "prompt": "12 34 56", "max_tokens": 2}


@pytest.fixture(scope="module")
def server() -> Iterator[SeqrServer]:
    world: ServeWorld = serve_world()
    srv = start_server(world.registry, world.model_dir, limits=LIMITS)
    yield srv
    srv.stop()


def body(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
# (case, path, raw body, status, param, code)
CASES = [
    ("unknown model", "/v1/completions", body(model="gpt-4"), 404, "model", "model_not_found"),
    ("empty prompt", "/v1/completions", body(prompt=""), 400, "prompt", "empty_prompt"),
    (
        "prompt over the token limit",
        "/v1/completions",
        body(prompt="12 " * 300),
        400,
        "prompt",
        "too_many_tokens",
    ),
    (
        "max_tokens over the limit",
        "/v1/completions",
        body(max_tokens=33),
        400,
        "max_tokens",
        "too_many_tokens",
    ),
    ("max_tokens zero", "/v1/completions", body(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("malformed JSON", "/v1/completions", b'{"model": "auto", ', 400, None, "invalid_json"),
    (
        "duplicate key",
        "/v1/completions",
        b'{"model": "auto", "model": "x", "prompt": "a"}',
        400,
        None,
        "invalid_json",
    ),
    (
        "NaN",
        "/v1/completions",
        b'{"model": "auto", "prompt": "a", "temperature": NaN}',
        400,
        None,
        "invalid_json",
    ),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None, None),
    ("not UTF-8", "/v1/completions", b'{"model": "\xff"}', 400, None, "invalid_json"),
    ("body too large", "/v1/completions", body(prompt="x" * 5000), 413, None, "body_too_large"),
    (
        "string for a number",
        "/v1/completions",
        body(max_tokens="5"),
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "temperature out of range",
        "/v1/completions",
        body(temperature=3),
        400,
        "temperature",
        "invalid_value",
    ),
    ("top_p zero", "/v1/completions", body(top_p=0), 400, "top_p", "invalid_value"),
    ("negative seed", "/v1/completions", body(seed=-1), 400, "seed", "invalid_value"),
    ("n over the limit", "/v1/completions", body(n=3), 400, "n", "too_many"),
    (
        "too many stop strings",
        "/v1/completions",
        body(stop=["a", "b", "c"]),
        400,
        "stop",
        "too_many",
    ),
    ("empty stop string", "/v1/completions", body(stop=[""]), 400, "stop", "invalid_value"),
    (
        "token ids as prompt",
        "/v1/completions",
        body(prompt=[1, 2, 3]),
        400,
        "prompt",
        "invalid_value",
    ),
    (
        "too many prompts",
        "/v1/completions",
        body(prompt=["a", "b", "c"]),
        400,
        "prompt",
        "invalid_value",
    ),
    ("no model", "/v1/completions", b'{"prompt": "a"}', 400, "model", "invalid_value"),
    ("unsupported echo", "/v1/completions", body(echo=True), 400, "echo", "unsupported_parameter"),
    (
        "chat without messages",
        "/v1/chat/completions",
        json.dumps({**CHAT, "messages": []}).encode(),
        400,
        "messages",
        "empty_prompt",
    ),
    (
        "chat with an unknown role",
        "/v1/chat/completions",
        json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "chat with an image part",
        "/v1/chat/completions",
        json.dumps(
            {
                **CHAT,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ],
            }
        ).encode(),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "chat with tools",
        "/v1/chat/completions",
        json.dumps({**CHAT, "tools": [{}]}).encode(),
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "chat with an unknown model",
        "/v1/chat/completions",
        json.dumps({**CHAT, "model": "nope"}).encode(),
        404,
        "model",
        "model_not_found",
    ),
]


@pytest.mark.parametrize(
    ("case", "path", "raw", "status", "param", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_gets_an_openai_error(
    server: SeqrServer,
    case: str,
    path: str,
    raw: bytes,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    response = httpx.post(
        f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert "Traceback" not in response.text and "Error:" not in error["message"]
    assert httpx.post(f"{server.url}/v1/completions", json=GOOD).status_code == 200  # goes on


def test_body_over_the_limit_without_content_length_is_cut_off(server: SeqrServer) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check first
        yield b'{"model": "auto", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/completions", content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)]
)
def test_unknown_endpoints_and_methods_answer_json(
    server: SeqrServer, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, f"{server.url}{path}")
    assert response.status_code == status and set(response.json()["error"]) >= {"message"}


def test_the_openai_client_raises_its_typed_errors(server: SeqrServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="auto", prompt="")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="auto", max_tokens=1000, messages=[{"role": "user", "content": "hi"}]
        )


def test_prompt_and_max_tokens_must_fit_the_models_context() -> None:
    from seqr.consumer.serve.errors import ApiError
    from seqr.consumer.serve.prompts import Prompter
    from seqr.core.base_model import load_base_model

    tokenizer = load_base_model(str(serve_world().model_dir)).tokenizer
    prompter = Prompter(tokenizer, LIMITS, context=40)  # the model's max_position_embeddings
    prompt = prompter.completion("12 34 56 78")
    prompter.check_room(prompt, 40 - len(prompt.ids))
    with pytest.raises(ApiError, match="exceed the model's context of 40") as info:
        prompter.check_room(prompt, 41 - len(prompt.ids))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("limits", "max_body_bytes", 10),
        ("limits", "max_tokens", True),
        ("limits", "default_max_tokens", 10**6),
        ("pool", "max_share", 0.0),
        ("pool", "warm_sequences", 10**6),
        ("engine", "max_batch", 0),
        ("engine", "device", "gpu:x"),
        ("engine", "first_pass_dtype", "int8"),
        ("serve", "calibration", "mine"),
        ("serve", "refresh_s", 0.5),
        ("serve", "port", 70000),
    ],
)
def test_serve_configs_name_the_bad_field(kind: str, field: str, value: object) -> None:
    from seqr.consumer.serve import EngineConfig, PoolConfig, ServeConfig
    from seqr.core.errors import ConfigError

    cls = {
        "limits": LimitsConfig,
        "pool": PoolConfig,
        "engine": EngineConfig,
        "serve": ServeConfig,
    }[kind]
    with pytest.raises(ConfigError, match=field):
        cls(**{field: value})


def test_a_request_that_can_never_fit_the_queue_is_a_config_error() -> None:
    from seqr.consumer.serve import EngineConfig, ServeConfig
    from seqr.core.errors import ConfigError

    with pytest.raises(ConfigError, match="max_n x max_prompts = 32 .* queue holds 8"):
        ServeConfig(engine=EngineConfig(queue_size=8))


def test_cli_refuses_to_serve_a_registry_that_fails_its_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from seqr.cli.serve import main

    world = serve_world()
    registry = tmp_path / "mirror"
    shutil.copytree(world.registry, registry)
    timestamp = registry / "metadata" / "timestamp.json"
    timestamp.write_bytes(timestamp.read_bytes().replace(b'"version"', b'"versiom"'))
    code = main(["--registry", str(registry), "--base-model", str(world.model_dir), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "NOT SERVING" in err and "Traceback" not in err


def test_a_registry_url_is_pulled_into_a_mirror_and_served(tmp_path: Path) -> None:
    """--registry URL: the server pulls the registry over HTTP (verified before anything is
    written) and serves its adapters; the mirror can then be audited on its own."""

    from seqr.registry import audit_registry
    from seqr.registry.serve import RegistryServer

    world = serve_world()
    http = RegistryServer(world.registry, quiet=True).start()
    mirror = tmp_path / "mirror"
    server = start_server(http.url, world.model_dir, mirror=mirror)
    try:
        models = httpx.get(f"{server.url}/v1/models").json()
        served = {m["id"] for m in models["data"]}
        assert {"auto", *DOMAINS} <= served
    finally:
        server.stop()
        http.shutdown()
    assert audit_registry(mirror).report.version == audit_registry(world.registry).report.version


def test_cli_refuses_a_base_model_other_than_the_adapters_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiny import build_tiny_llama

    from seqr.cli.serve import main

    other = build_tiny_llama(tmp_path / "other-llama", seed=1)  # same shape, other weights
    code = main(
        ["--registry", str(serve_world().registry), "--base-model", str(other), "--port", "0"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "NOT SERVING" in err and "trained on" in err


@pytest.mark.parametrize(
    ("choice", "device", "native", "expected"),
    [
        ("auto", "cpu", True, "bfloat16"),  # native bf16 units: the fast pass
        ("auto", "cpu", False, None),  # emulated bf16 would be slower: the exact pass
        ("auto", "cuda", True, None),
        ("float32", "cpu", True, None),
        ("bfloat16", "cpu", False, "bfloat16"),  # asked for: honoured
    ],
)
def test_routing_pass_auto_uses_bf16_only_where_the_cpu_has_it(
    monkeypatch: pytest.MonkeyPatch, choice: str, device: str, native: bool, expected: str | None
) -> None:
    from seqr.consumer import config

    monkeypatch.setattr(config, "native_bf16", lambda: native)
    assert config.routing_pass_dtype(choice, device) == expected
    with pytest.raises(ConfigError, match="routing pass 'int8' must be one of"):
        config.routing_pass_dtype("int8", device)
