"""`seqr serve`'s loss check: under soft votes, a prompt whose two best adapters score close
goes to the one that predicts the prompt better, measured by the served model itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _route_world import domain_text
from _serve_world import ServeWorld, serve_world

from seqr.consumer.router import RouterConfig
from seqr.consumer.serve.config import PoolConfig
from seqr.consumer.serve.engine import route_prompts
from seqr.consumer.serve.live import build_version
from seqr.consumer.serve.pool import QueryPool
from seqr.consumer.serve.scoring import Decision, check_close_pairs
from seqr.consumer.serve.source import RegistrySource
from seqr.core.base_model import load_base_model
from seqr.core.errors import ConfigError
from seqr.sim.lm_loss import next_token_losses

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_only_close_pairs_are_checked_and_the_runner_up_needs_a_lower_loss() -> None:
    decision = Decision(
        indices=[0, 1, 2, 0],
        scores=torch.zeros(4, 3, dtype=torch.float64),
        margin=[0.5, 3.0, None, 0.2],
        runner_up=[1, 0, None, 2],
        prompt_losses=[None] * 4,
        loss_check=[None] * 4,
    )
    asked: list[tuple[list[int], list[int]]] = []

    def losses_of(rows: list[int], adapters: list[int]) -> torch.Tensor:
        asked.append((rows, adapters))
        table = {(0, 0): 2.0, (0, 1): 1.5, (3, 0): 1.0, (3, 2): 1.0}  # row 3: a tie
        return torch.tensor([table[r, a] for r, a in zip(rows, adapters, strict=True)])

    out = check_close_pairs(decision, 1.0, losses_of)
    assert asked == [([0, 3, 0, 3], [0, 0, 1, 2])]  # rows 1 (far) and 2 (alone) never run
    assert out.indices == [1, 1, 2, 0]
    assert out.runner_up == [0, 0, None, 2]
    assert out.margin == [-0.5, 3.0, None, 0.2]  # the choice's score minus the runner-up's
    assert out.prompt_losses == [(1.5, 2.0), None, None, (1.0, 1.0)]
    assert out.loss_check == ["changed", None, None, "kept"]


def test_a_negative_or_non_numeric_margin_is_refused() -> None:
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ConfigError, match="loss_check_margin"):
            PoolConfig(loss_check_margin=bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def world() -> ServeWorld:
    return serve_world()


def warm_pool(version: Any, tokenizer: Any, margin: float) -> QueryPool:
    """A pool past both warm-ups (query statistics, then their vote statistics); no caps, so
    its moments do not depend on which adapter each prompt went to."""
    pool = QueryPool(PoolConfig(warm_sequences=4, refresh_every=1, max_share=1.0,
                                loss_check_margin=margin))  # fmt: skip
    for seed in range(4):
        for d in ("code", "digits", "upper"):
            ids = torch.tensor([tokenizer(domain_text(d, 1, seed))["input_ids"]])
            route_prompts(version, pool, ids, torch.ones_like(ids))
    return pool


def test_close_pairs_go_to_the_adapter_with_the_lower_loss_on_the_prompt(world: ServeWorld) -> None:
    base = load_base_model(str(world.model_dir))
    version = build_version(
        base, RegistrySource(str(world.registry)).audited(), RouterConfig(), ("auto", "base")
    )
    tok = version.router.tokenizer
    checked, unchecked = warm_pool(version, tok, 1e5), warm_pool(version, tok, 0.0)
    mixed = [domain_text("code", 1, 20)[:40] + " " + domain_text("upper", 1, 21)[:40],
             domain_text("digits", 1, 22), domain_text("upper", 1, 23)]  # fmt: skip
    changed = 0
    for text in mixed:
        ids = torch.tensor([tok(text)["input_ids"]])
        mask = torch.ones_like(ids)
        calibration, plain = route_prompts(version, unchecked, ids, mask)
        assert calibration.votes is not None  # soft votes decide
        _, decision = route_prompts(version, checked, ids, mask)
        first, runner = plain.indices[0], plain.runner_up[0]
        assert runner is not None and plain.loss_check == [None]
        # each adapter's loss on the prompt, from the peft model's own logits
        direct = [
            float(next_token_losses(version.peft_model(input_ids=ids, adapter_names=[
                version.internal(i)]).logits, ids)[0]) for i in (first, runner)
        ]  # fmt: skip
        best = runner if direct[1] < direct[0] else first
        assert decision.indices == [best]
        assert decision.loss_check == ["changed" if best != first else "kept"]
        pair = decision.prompt_losses[0]
        assert pair is not None
        expected = direct[::-1] if best != first else direct
        assert list(pair) == pytest.approx(expected, rel=1e-5)
        changed += best != first
    assert 0 < changed < len(mixed)  # both outcomes seen
