"""One measurement: client calibration, the server's probe and a router's reference statistics
give the same numbers on the same text; the token rule, case by case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import copy_texts, tiny_model_dir

from seqr.core.base_model import load_base_model
from seqr.core.errors import ConfigError, ShapeError
from seqr.core.federation import FederationConfig
from seqr.core.measurement import TokenRule, measured_tokens
from seqr.core.model_routing import reference_statistics
from seqr.core.shared_a import lora_layers
from seqr.core.textdata import load_text_data
from seqr.node.calibrate import calibrate, pick_sequences
from seqr.node.train import ADAPTER, make_lora_model
from seqr.operator.federation_setup import setup_federation
from seqr.operator.probe import Probe

FED = FederationConfig(lora_rank=4, train_seq_len=32, calib_max_sequences=12)


@pytest.mark.parametrize("score", ["gain", "norm"])
def test_calibration_probe_and_reference_statistics_agree_to_1e6(
    tmp_path_factory: pytest.TempPathFactory, score: str
) -> None:
    # Prepare: an adapter with a non-zero B on the tiny model, and a client's text chunks.
    fed = FED.replace(calib_score=score)
    base = load_base_model(str(tiny_model_dir()))
    folder = copy_texts(tmp_path_factory.mktemp("data"), ("bisect.py", "heapq.py"))
    chunks = load_text_data(folder, base.tokenizer, seq_len=32, heldout_fraction=0.0, seed=0).train
    server_copy = load_base_model(str(tiny_model_dir())).model  # peft changes what it wraps
    setup = setup_federation(fed, server_copy, base.sha256)
    peft_model, _ = make_lora_model(base.model, fed)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(peft_model, ADAPTER).values():
            b = layer.lora_B[ADAPTER].weight
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    picked = chunks[pick_sequences(len(chunks), fed)]
    assert len(picked) == 12
    # Execute: the node's calibration, the server's probe and a router's reference statistics.
    claimed = calibrate(peft_model, chunks, fed, progress=False).stats
    probe = Probe.from_chunks(server_copy, picked, setup)
    tensors = {n: t.detach().numpy() for n, t in peft_model.state_dict().items() if "lora_B" in n}
    tensors = {n.replace(f".{ADAPTER}.", "."): t for n, t in tensors.items()}
    values = probe.scores(tensors)
    batches = torch.split(torch.from_numpy(picked), 8)
    measured = reference_statistics(peft_model.eval(), [ADAPTER], batches, score=score)[ADAPTER]
    # Assert: the same statistics, module by module, to 1e-6 relative.
    assert sorted(claimed.modules) == sorted(values) == sorted(measured.modules)
    for module, moments in claimed.modules.items():
        v = values[module]
        assert moments.count == v.size == measured.modules[module].count == 12 * 31
        for other in (
            np.array([v.mean(), v.std()]),
            np.array([*measured.modules[module].mean, *measured.modules[module].std]),
        ):
            np.testing.assert_allclose([moments.mean[0], moments.std[0]], other, rtol=1e-6)


def _x(rows: int, tokens: int) -> torch.Tensor:
    return torch.ones(rows, tokens, 4)  # ||x|| = 2 at every token


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, [[0, 1, 1, 1]]),
        ([[1, 1, 1, 0]], [[0, 1, 1, 0]]),  # right padding
        ([[0, 0, 1, 1]], [[0, 0, 0, 1]]),  # left padding: the first UNPADDED token is skipped
        ([[0, 0, 0, 1]], [[0, 0, 0, 1]]),  # a one-token sequence keeps its token
    ],
    ids=["no_padding", "right_padding", "left_padding", "one_token"],
)
def test_first_unpadded_token_is_not_measured(mask: list | None, expected: list) -> None:
    x = _x(1, 4)
    h = torch.ones(1, 4, 2)
    attention = None if mask is None else torch.tensor(mask)
    for score in ("norm", "gain"):
        keep = measured_tokens(x, h, attention, score)
        assert keep.to(torch.int64).tolist() == expected


def test_gain_is_not_measured_where_the_projection_is_near_zero() -> None:
    # ||x|| = 2: the floor is ||A x|| > 1e-4 * 2 = 2e-4. Token 2 sits below it, token 3 is an
    # all-zero input (0 > 0 fails: never measured for gains); norms count both.
    x = _x(1, 4)
    x[0, 3] = 0.0
    h = torch.tensor([[[1.0, 0.0], [0.3, 0.4], [1e-4, 1e-4], [0.0, 0.0]]])
    assert measured_tokens(x, h, None, "gain").tolist() == [[False, True, False, False]]
    assert measured_tokens(x, h, None, "norm").tolist() == [[False, True, True, True]]
    loose = TokenRule(min_projection_ratio=0.0, skip_first=False)
    assert measured_tokens(x, h, None, "gain", loose).tolist() == [[True, True, True, False]]


def test_a_sequence_the_rule_would_empty_counts_its_unpadded_tokens() -> None:
    x = _x(2, 3)
    h = torch.full((2, 3, 2), 1e-6)  # every token below the gain floor
    h[1] = 1.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    keep = measured_tokens(x, h, mask, "gain")
    assert keep.tolist() == [[True, True, False], [False, True, True]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"skip_first": 1}, "skip_first"),
        ({"min_projection_ratio": -1e-4}, "min_projection_ratio"),
        ({"min_projection_ratio": float("nan")}, "min_projection_ratio"),
        ({"min_projection_ratio": True}, "min_projection_ratio"),
    ],
)
def test_bad_token_rule_refused_naming_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TokenRule(**kwargs)


def test_inputs_of_the_wrong_shape_refused() -> None:
    with pytest.raises(ShapeError, match="batch, tokens, d_in"):
        measured_tokens(torch.ones(3, 4), torch.ones(3, 2), None, "gain")
    with pytest.raises(ShapeError, match="attention_mask"):
        measured_tokens(_x(1, 4), torch.ones(1, 4, 2), torch.ones(1, 3), "gain")
    with pytest.raises(ConfigError, match="score"):
        measured_tokens(_x(1, 4), torch.ones(1, 4, 2), None, "energy")
