"""The serving engine without HTTP: a request's tokens do not depend on what else is in its
batch (continuous batching with merged KV caches), mixed-adapter decoding equals peft's own
generate with each adapter alone, ``auto`` chooses what RegistryRouter.route chooses, and
registry versions share the base weights but not their LoRA layers."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from _serve_world import ServeWorld, held_out_prompts, serve_world

from seqr.consumer.router import RegistryRouter, RouterConfig
from seqr.consumer.serve.config import EngineConfig
from seqr.consumer.serve.engine import Engine, Job
from seqr.consumer.serve.live import build_version
from seqr.consumer.serve.sampling import SamplingParams
from seqr.consumer.serve.server import eos_ids
from seqr.consumer.serve.source import RegistrySource
from seqr.core.base_model import BaseModel, load_base_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world() -> ServeWorld:
    return serve_world()


@pytest.fixture(scope="module")
def base(world: ServeWorld) -> BaseModel:
    return load_base_model(str(world.model_dir))


@pytest.fixture(scope="module")
def version(world: ServeWorld, base: BaseModel) -> Any:
    audited = RegistrySource(str(world.registry)).audited()
    return build_version(base, audited, RouterConfig(), ("auto", "base"))


class Recorder:
    """Collects one job's events; ``on_text`` runs (in the engine thread) at the k-th text."""

    def __init__(self, log: list[tuple[str, int]], tag: int) -> None:
        self.texts: list[str] = []
        self.route: Any = None
        self.finish: tuple[str, int] | None = None
        self.done = threading.Event()
        self.log, self.tag = log, tag
        self.on_text: tuple[int, Any] | None = None

    def __call__(self, event: tuple[Any, ...]) -> None:
        self.log.append((event[0], self.tag))
        if event[0] == "route":
            self.route = event[1]
        elif event[0] == "text":
            self.texts.append(event[1])
            if self.on_text is not None and len(self.texts) == self.on_text[0]:
                self.on_text[1]()
        elif event[0] in ("done", "error"):
            self.finish = (event[1], event[2])
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.texts)


def make_engine(version: Any, base: BaseModel, max_batch: int = 16) -> Engine:
    engine = Engine(EngineConfig(max_batch=max_batch), base.tokenizer, eos_ids(base))
    engine.start()
    return engine


def requests(version: Any, base: BaseModel, params: SamplingParams) -> list[tuple[Any, ...]]:
    """(prompt ids, auto?, named adapter) of different lengths: auto, named, base."""
    texts = [text for _, text in held_out_prompts()[:4]]
    ids = [base.tokenizer(t)["input_ids"] for t in texts]
    return [
        (ids[0], True, None, params),  # auto
        (ids[1], False, version.ids["digits"], params),  # named
        (ids[2], False, None, params),  # the base model
        (ids[3], True, None, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)),
    ]


def run(engine: Engine, version: Any, specs: list[tuple[Any, ...]], join_after: int | None):
    """All jobs at once (join_after None), or the first alone and the rest joining once it has
    sent ``join_after`` texts (they join its running batch between two decoding steps)."""
    log: list[tuple[str, int]] = []
    recorders = [Recorder(log, i) for i in range(len(specs))]
    jobs = [
        Job(version, ids, ids if auto else None, adapter, params, sink=recorders[i])
        for i, (ids, auto, adapter, params) in enumerate(specs)
    ]
    if join_after is None:
        engine.submit(jobs)
    else:
        recorders[0].on_text = (join_after, lambda: engine.submit(jobs[1:]))
        engine.submit(jobs[:1])
    for recorder in recorders:
        assert recorder.done.wait(60), "a job did not finish"
    return recorders, log


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded-sampling"],
)
def test_tokens_do_not_depend_on_the_batch_a_request_joins(
    version: Any, base: BaseModel, params: SamplingParams
) -> None:
    engine = make_engine(version, base)
    try:
        specs = requests(version, base, params)
        alone = [run(engine, version, [spec], None)[0][0] for spec in specs]
        together, _ = run(engine, version, specs, None)
        joined, log = run(engine, version, specs, join_after=4)
    finally:
        engine.stop()
    # The late requests really joined a running batch: routed before the first one finished.
    first_done = log.index(("done", 0))
    assert all(log.index(("route", i)) < first_done for i in range(1, len(specs)))
    for i in range(len(specs)):
        assert together[i].text == alone[i].text and together[i].finish == alone[i].finish
        assert joined[i].text == alone[i].text and joined[i].finish == alone[i].finish
        assert alone[i].finish == ("length", specs[i][3].max_tokens)
    assert len({r.text for r in alone[:3]}) == 3  # different prompts, different continuations


def test_mixed_adapter_decoding_equals_peft_generate_with_each_adapter_alone(
    version: Any, base: BaseModel
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    specs = requests(version, base, params)[:3]
    engine = make_engine(version, base)
    try:
        results, _ = run(engine, version, specs, join_after=2)
    finally:
        engine.stop()
    model = version.peft_model
    for (ids, _, _, _), result in zip(specs, results, strict=True):
        adapter = version.internal(
            version.ids[result.route.adapter] if result.route.adapter else None
        )
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            adapter_names=[adapter],
            pad_token_id=base.tokenizer.pad_token_id,
        )
        expected = base.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        assert result.text == expected


@pytest.mark.parametrize("first_pass_dtype", [None, "bfloat16"])
def test_auto_chooses_what_registry_router_route_chooses(
    world: ServeWorld, base: BaseModel, first_pass_dtype: str | None
) -> None:
    pairs = held_out_prompts()
    config = RouterConfig(first_pass_dtype=first_pass_dtype)
    router = RegistryRouter.open(world.registry, base_model=str(world.model_dir), config=config)
    expected = router.route([text for _, text in pairs])
    audited = RegistrySource(str(world.registry)).audited()
    version = build_version(base, audited, config, ("auto", "base"))
    specs = [
        (base.tokenizer(text)["input_ids"], True, None, SamplingParams(max_tokens=1))
        for _, text in pairs
    ]
    engine = make_engine(version, base)
    try:
        results, _ = run(engine, version, specs, None)
    finally:
        engine.stop()
    assert [r.route.adapter for r in results] == [e.adapter for e in expected]
    assert [r.route.adapter for r in results] == [domain for domain, _ in pairs]
    for result, reference in zip(results, expected, strict=True):
        assert result.route.margin == pytest.approx(reference.margin, abs=1e-4)
        assert result.route.runner_up == reference.runner_up
        assert result.route.scores == pytest.approx(reference.scores, abs=1e-4)
        assert result.route.calibration == {"kind": "own"}


def test_registry_versions_share_base_weights_but_not_lora_layers(
    world: ServeWorld, version: Any, base: BaseModel
) -> None:
    audited = RegistrySource(str(world.registry)).audited()
    other = build_version(base, audited, RouterConfig(), ("auto", "base"))
    first = dict(version.peft_model.named_parameters())
    second = dict(other.peft_model.named_parameters())
    shared = [n for n in first if "lora_" not in n]
    assert shared and all(first[n].data_ptr() == second[n].data_ptr() for n in shared)
    lora = [n for n in first if "lora_B" in n]
    assert lora and all(first[n].data_ptr() != second[n].data_ptr() for n in lora)
    assert not any("lora_" in n for n, _ in base.model.named_parameters())  # base untouched


def peaky_peft_model() -> Any:
    """A tiny Llama with large random weights (peaked attention, so a wrong position or a
    leaked padded key changes the logits a lot) and two random LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        max_position_embeddings=256,
    )
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model: Any = get_peft_model(LlamaForCausalLM(config), lora, adapter_name="x")
    model.add_adapter("y", lora)
    return model.eval()


@torch.no_grad()
def test_merged_kv_cache_rows_match_each_row_alone() -> None:
    """batch.py: prefill rows of different lengths, merge them into a running batch mid-way,
    drop a row, decode on: every row's logits at every step equal that row decoded alone."""
    from seqr.consumer.serve.batch import decode, keep_rows, merge, prefill
    from seqr.consumer.serve.engine import _left_pad

    model = peaky_peft_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 3, 14)]
    adapters = ["x", "y", "__base__"]
    forced = torch.randint(1, 128, (3, 8), generator=g)  # the tokens fed at each step

    def alone(row: int) -> list[torch.Tensor]:
        ids, mask = _left_pad([prompts[row]], 0, "cpu")
        out = prefill(model, ids, mask, [adapters[row]])
        logits = [out.logits[0]]
        for step in range(forced.shape[1]):
            out = decode(model, forced[row, step : step + 1], out.cache, out.mask, [adapters[row]])
            logits.append(out.logits[0])
        return logits

    expected = [alone(row) for row in range(3)]
    ids, mask = _left_pad(prompts[:1], 0, "cpu")  # row 0 starts alone
    out = prefill(model, ids, mask, adapters[:1])
    got: list[list[torch.Tensor]] = [[out.logits[0]], [], []]
    cache, mask, rows = out.cache, out.mask, [0]
    for step in range(forced.shape[1]):
        if step == 3:  # rows 1 and 2 join between two steps
            ids2, mask2 = _left_pad(prompts[1:], 0, "cpu")
            new = prefill(model, ids2, mask2, adapters[1:])
            got[1].append(new.logits[0])
            got[2].append(new.logits[1])
            cache, mask = merge(cache, mask, new.cache, new.mask)
            rows = [0, 1, 2]
        if step == 6:  # row 1 is finished: dropped, and its padding columns cut
            cache, mask = keep_rows(cache, mask, [0, 2])
            rows = [0, 2]
        offset = {0: 0, 1: 3, 2: 3}
        last = torch.stack([forced[r, step - offset[r]] for r in rows])
        out = decode(model, last, cache, mask, [adapters[r] for r in rows])
        cache, mask = out.cache, out.mask
        for i, r in enumerate(rows):
            got[r].append(out.logits[i])
    for row in range(3):
        assert len(got[row]) > 1
        for step, logits in enumerate(got[row]):
            assert torch.allclose(logits, expected[row][step], atol=1e-4, rtol=1e-4), (row, step)
    assert not torch.allclose(expected[0][1], expected[1][1], atol=1e-2)  # rows do differ
