"""The pure checks the registry's audit calls on every listed adapter: its lora_A is the
federation's shared A (from the file's bytes, no model), and text from another party is
escaped before it is printed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save
from safetensors.torch import save as save_torch

from seqr.core.errors import FormatError
from seqr.core.printable import printable
from seqr.core.shared_a import (
    generate_shared_a,
    module_of_lora_a,
    shared_a_mismatches,
    shared_a_mismatches_in_file,
)

SEED = 7
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def _adapter(seed: int = SEED) -> dict[str, np.ndarray]:
    out = {}
    for i, module in enumerate(MODULES):
        d_in = 16 * (i + 1)
        out[f"base_model.model.{module}.lora_A.weight"] = generate_shared_a(
            seed, module, 4, d_in
        ).numpy()
        out[f"base_model.model.{module}.lora_B.weight"] = np.ones((8, 4), np.float32)
    return out


def test_module_names_follow_peft_tensor_names() -> None:
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert module_of_lora_a(name) == "model.layers.0.self_attn.q_proj"
    assert module_of_lora_a(name.replace("lora_A", "lora_B")) is None


def test_shared_a_passes_from_bytes_without_a_model() -> None:
    assert shared_a_mismatches_in_file(save(_adapter()), SEED) == []


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: a.__setitem__((0, 0), np.nextafter(a[0, 0], np.float32(1))),  # one ulp
        lambda a: a.__setitem__(slice(None), a[::-1]),  # the same numbers, rows swapped
        lambda a: a.__setitem__(slice(None), generate_shared_a(SEED + 1, MODULES[1], 4, 32)),
    ],
    ids=["one_ulp", "rows_swapped", "other_seed"],
)
def test_lora_a_other_than_the_shared_a_found(tamper) -> None:
    tensors = _adapter()
    name = f"base_model.model.{MODULES[1]}.lora_A.weight"
    tamper(tensors[name])
    assert shared_a_mismatches_in_file(save(tensors), SEED) == [name]
    assert shared_a_mismatches(tensors, SEED) == [name]


def test_bf16_adapter_compared_with_the_bf16_rounded_shared_a() -> None:
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _adapter().items()}
    assert shared_a_mismatches_in_file(save_torch(tensors), SEED) == []
    # Read as float32 (what the audit gets from the file) but compared as if F32: differs.
    widened = {k: v.float().numpy() for k, v in tensors.items()}
    assert len(shared_a_mismatches(widened, SEED)) == len(MODULES)


def test_unreadable_weights_are_a_format_error() -> None:
    with pytest.raises(FormatError):
        shared_a_mismatches_in_file(b"\x00" * 8, SEED)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("key compromised\x1b[2J\x1b[31m", "key compromised\\x1b[2J\\x1b[31m"),  # ANSI
        ("ok\rREVOKED", "ok\\x0dREVOKED"),  # carriage return overwrites the line
        ("reason\nadmitted: evil", "reason\\x0aadmitted: evil"),  # a forged extra line
        ("abc\u202edcba", "abc\\u202edcba"),  # bidi override (Trojan Source)
        ("\x9b31m", "\\x9b31m"),  # the C1 control sequence introducer
        ("caf\u00e9 \u65e5\u672c \U0001f600", "caf\u00e9 \u65e5\u672c \U0001f600"),  # visible
        ("lone \ud800", "lone \\ud800"),
    ],
)
def test_printable_escapes_what_would_act_on_a_terminal(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_cuts_long_text() -> None:
    assert printable("x" * 10, max_chars=4) == "xxxx..."
    assert printable(ValueError("bad \x07 bell")) == "bad \\x07 bell"
