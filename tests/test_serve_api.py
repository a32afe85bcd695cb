"""`seqr serve` over HTTP with the official openai client: a real uvicorn server on 127.0.0.1
(one per module) serving the small real registry of tests/_route_world.py.

``auto`` routes like RegistryRouter.route, named adapters and the base model run as asked,
streaming and non-streaming answers agree, sampling honours seed / temperature / top_p / stop
/ max_tokens / n, concurrent clients get what they get alone, and /health and /metrics say
what happened."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import torch
from _serve_world import ServeWorld, held_out_prompts, serve_world, start_server
from prometheus_client.parser import text_string_to_metric_families

from seqr.consumer.router import RegistryRouter
from seqr.consumer.serve import LimitsConfig, PoolConfig, SeqrServer
from seqr.registry import audit_registry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LIMITS = LimitsConfig(
    max_body_bytes=65536, max_prompt_tokens=256, max_tokens=64, default_chat_max_tokens=16
)


@pytest.fixture(scope="module")
def world() -> ServeWorld:
    return serve_world()


@pytest.fixture(scope="module")
def server(world: ServeWorld) -> Iterator[SeqrServer]:
    # A pool that never warms: every decision uses the adapters' own statistics, as
    # RegistryRouter does (test_serve_calibration.py covers query statistics).
    srv = start_server(
        world.registry,
        world.model_dir,
        limits=LIMITS,
        pool=PoolConfig(capacity=1000, warm_sequences=1000),
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: SeqrServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def router(world: ServeWorld) -> RegistryRouter:
    return RegistryRouter.open(world.registry, base_model=str(world.model_dir))


def metric(server: SeqrServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def test_models_lists_auto_base_and_every_adapter(client: openai.OpenAI, world: ServeWorld) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["auto", "base", "code", "digits", "upper"]
    entries = {e.name: e for e in audit_registry(world.registry).report.entries}
    for model in models[2:]:
        assert model.owned_by == entries[model.id].client  # the client key's fingerprint
        assert model.model_extra["seqr"]["adapter_sha256"] == entries[model.id].adapter_sha256


def test_auto_routes_each_prompt_like_registry_router(
    client: openai.OpenAI, router: RegistryRouter
) -> None:
    pairs = held_out_prompts()
    expected = router.route([text for _, text in pairs])
    for (domain, text), reference in zip(pairs, expected, strict=True):
        raw = client.completions.with_raw_response.create(
            model="auto", prompt=text, max_tokens=3, temperature=0
        )
        response = raw.parse()
        seqr = response.model_extra["seqr"]
        assert seqr["adapter"] == reference.adapter == domain
        assert raw.headers["x-seqr-adapter"] == domain
        assert seqr["routed"] is True and seqr["runner_up"] == reference.runner_up
        assert seqr["margin"] == pytest.approx(reference.margin, abs=1e-4)
        assert seqr["scores"] == pytest.approx(reference.scores, abs=1e-4)
        assert seqr["calibration"] == {"kind": "own"} and seqr["registry_version"] == 2
        assert response.model == "auto" and response.usage.prompt_tokens == reference.tokens


def test_streamed_completion_equals_the_whole_answer(
    client: openai.OpenAI, server: SeqrServer
) -> None:
    prompt = held_out_prompts()[1][1]  # digits
    args = {"model": "auto", "prompt": prompt, "max_tokens": 12, "temperature": 0.9, "seed": 5}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    assert chunks[0].model_extra["seqr"]["adapter"] == "digits"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text != ""
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**args, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-seqr-adapter"] == "digits"
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_chat_completions_stream_and_not(
    client: openai.OpenAI, router: RegistryRouter, world: ServeWorld
) -> None:
    text = held_out_prompts()[2][1]  # upper
    messages = [
        {"role": "system", "content": "Continue the text."},
        {"role": "user", "content": text},
    ]
    args: dict[str, Any] = {
        "model": "auto",
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0.7,
        "seed": 11,
    }
    whole = client.chat.completions.create(**args)
    routed_on = router.route(["Continue the text.\n" + text])[0]
    assert whole.model_extra["seqr"]["adapter"] == routed_on.adapter == "upper"
    assert whole.choices[0].message.role == "assistant"
    templated = router.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    prompt_ids = router.tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert whole.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content


@torch.no_grad()
def alone(router: RegistryRouter, prompt: str, adapter: str, tokens: int) -> str:
    """Greedy continuation with one peft adapter (``a<i>`` or ``__base__``), no batching."""
    ids = router.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = router.routed.peft_model.generate(
        input_ids=ids,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        adapter_names=[adapter],
        pad_token_id=router.tokenizer.pad_token_id,
    )
    return str(router.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_named_adapter_and_base_model_run_as_asked(
    client: openai.OpenAI, router: RegistryRouter
) -> None:
    prompt = held_out_prompts()[1][1]  # digits text, sent to other models on purpose
    for model, internal in (("upper", "a2"), ("base", "__base__")):
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        response = raw.parse()
        seqr = response.model_extra["seqr"]
        assert seqr["routed"] is False and seqr["margin"] is None and seqr["calibration"] is None
        assert seqr["adapter"] == (None if model == "base" else model)
        assert raw.headers["x-seqr-adapter"] == model
        assert response.choices[0].text == alone(router, prompt, internal, 8)


def test_sampling_honours_seed_temperature_top_p_stop_max_tokens_and_n(
    client: openai.OpenAI,
) -> None:
    prompt = held_out_prompts()[0][1]
    extra = {"ignore_eos": True}

    def text(**kw: Any) -> Any:
        return client.completions.create(model="auto", prompt=prompt, extra_body=extra, **kw)

    first = text(max_tokens=16, temperature=1.0, seed=1)
    assert first.choices[0].text == text(max_tokens=16, temperature=1.0, seed=1).choices[0].text
    others = {text(max_tokens=16, temperature=1.0, seed=s).choices[0].text for s in (2, 3, 4)}
    assert others - {first.choices[0].text}  # other seeds, other samples
    greedy = text(max_tokens=16, temperature=0).choices[0].text
    assert text(max_tokens=16, temperature=1.0, top_p=1e-6, seed=9).choices[0].text == greedy
    assert first.usage.completion_tokens == 16 and first.choices[0].finish_reason == "length"
    stop = greedy[5:7]
    cut = text(max_tokens=16, temperature=0, stop=[stop, "never-there"])
    assert cut.choices[0].text == greedy[: greedy.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="auto",
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body=extra,
    )
    assert "".join(c.choices[0].text for c in streamed) == greedy[: greedy.find(stop)]
    two = text(max_tokens=8, temperature=1.0, seed=1, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == text(max_tokens=8, temperature=1.0, seed=1).choices[0].text
    assert two.choices[1].text == text(max_tokens=8, temperature=1.0, seed=2).choices[0].text


def test_concurrent_clients_get_what_they_get_alone(client: openai.OpenAI) -> None:
    jobs = [(model, text) for model in ("auto", "code", "base") for _, text in held_out_prompts()]

    def ask(job: tuple[str, str]) -> str:
        out = client.completions.create(
            model=job[0],
            prompt=job[1],
            max_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    sequential = [ask(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, jobs)) == sequential


def test_health_and_metrics_report_requests_routing_queue_and_version(
    client: openai.OpenAI, server: SeqrServer
) -> None:
    client.completions.create(model="auto", prompt=held_out_prompts()[1][1], max_tokens=2)
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["registry_version"] == 2
    assert health["adapters"] == ["code", "digits", "upper"] and health["routed"]["digits"] >= 1
    assert health["last_reload"]["outcome"] == "loaded"
    assert metric(server, "seqr_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(server, "seqr_routing_decisions_total", adapter="digits") >= 1
    assert metric(server, "seqr_registry_version") == 2
    assert metric(server, "seqr_registry_adapters") == 3
    assert metric(server, "seqr_queue_depth") == 0
    assert metric(server, "seqr_generated_tokens_total") >= 2
    assert metric(server, "seqr_tokens_per_second") > 0
    assert metric(server, "seqr_request_latency_seconds_count", endpoint="/v1/completions") >= 1
    assert metric(server, "seqr_registry_failed_reloads_total") == 0


def test_prompts_reach_no_log_and_no_status_endpoint(
    client: openai.OpenAI, server: SeqrServer, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "ZEBRA MARKER NINETY ONE"
    with caplog.at_level("DEBUG"):
        client.completions.create(model="auto", prompt=f"{marker} 12 34 56", max_tokens=4)
        for path in ("/health", "/metrics", "/", "/api/status"):
            assert marker not in httpx.get(f"{server.url}{path}").text
    assert marker not in caplog.text


def test_query_statistics_take_over_once_the_pool_is_warm(world: ServeWorld) -> None:
    srv = start_server(
        world.registry,
        world.model_dir,
        limits=LIMITS,
        pool=PoolConfig(warm_sequences=4, refresh_every=1),
    )
    try:
        ask = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        kinds, checks = [], []
        prompts = [text for _, text in held_out_prompts()] * 2
        for text in prompts:
            out = ask.completions.create(model="auto", prompt=text, max_tokens=1)
            kinds.append(out.model_extra["seqr"]["calibration"])
            checks.append(out.model_extra["seqr"]["loss_check"])
        # own statistics for the first 4 prompts, then query statistics with the mean of
        # z-scores while 4 prompts vote, then soft token votes
        assert kinds[0] == {"kind": "own"} and kinds[-1]["kind"] == "queries"
        assert [k.get("aggregation") for k in kinds] == [None] * 4 + ["mean"] * 4 + [
            "soft_vote"
        ] * (len(prompts) - 8)
        assert kinds[-1]["pool_sequences"] >= 4
        assert metric(srv, "seqr_calibration_queries_in_use") == 1
        assert metric(srv, "seqr_calibration_soft_votes_in_use") == 1
        assert metric(srv, "seqr_calibration_pool_prompts") == len(prompts)
        # the loss check runs only under soft votes, and /metrics counts what it decided
        assert checks[:8] == [None] * 8 and set(checks) <= {None, "kept", "changed"}
        for outcome in ("kept", "changed"):
            counted = metric(srv, "seqr_loss_checks_total", outcome=outcome)
            assert counted == checks.count(outcome)
    finally:
        srv.stop()


def test_a_full_queue_answers_429_and_the_server_goes_on(world: ServeWorld) -> None:
    from seqr.consumer.serve import EngineConfig

    srv = start_server(
        world.registry,
        world.model_dir,
        limits=LimitsConfig(max_tokens=1000, max_prompt_tokens=256, max_n=1, max_prompts=1),
        engine=EngineConfig(max_batch=1, queue_size=1),
    )
    url = f"{srv.url}/v1/completions"
    long = {"model": "auto", "prompt": "12 34", "max_tokens": 1000, "ignore_eos": True}
    try:
        results: list[int] = []

        def send() -> None:
            results.append(httpx.post(url, json=long, timeout=120).status_code)

        def wait_for(key: str, value: int) -> None:
            for _ in range(2000):
                if httpx.get(f"{srv.url}/health").json()[key] == value:
                    return
                threading.Event().wait(0.005)
            raise AssertionError(f"{key} never reached {value}")

        running = threading.Thread(target=send)
        running.start()
        wait_for("running", 1)
        waiting = threading.Thread(target=send)
        waiting.start()
        wait_for("waiting", 1)
        full = httpx.post(url, json={**long, "max_tokens": 1})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["type"] == "rate_limit_error"
        running.join(120)
        waiting.join(120)
        assert results == [200, 200]
        assert httpx.post(url, json={**long, "max_tokens": 1}).status_code == 200
    finally:
        srv.stop()
