"""The shared frozen A: same bits everywhere, installed into peft and kept frozen."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model_dir
from transformers import AutoModelForCausalLM

from seqr.core.errors import ShapeError
from seqr.core.shared_a import (
    check_shared_a,
    freeze_shared_a,
    generate_shared_a,
    install_shared_a,
    lora_target_shapes,
    peft_a_shapes,
    shared_a_sha256,
)

Q0 = "model.layers.0.self_attn.q_proj"


def test_golden_bits_pin_the_format() -> None:
    # Fixed bytes: a change in numpy or in our derivation would split the federation.
    a = generate_shared_a(42, Q0, 2, 3)
    assert a.dtype == torch.float32 and a.shape == (2, 3)
    assert a.numpy().tobytes().hex() == "55db71bd38b3de3e66d4123f1352c63efc1ff63e47eb8c3e"
    shapes = {Q0: 3, "model.layers.0.self_attn.v_proj": 5}
    assert shared_a_sha256(42, shapes, 2) == (
        "76b7b63128d0dc83cc2b63b412bc73412d5316272f10a1560d572e75716a7a8a"
    )


def test_matches_the_documented_recipe() -> None:
    # Recompute from the module docstring's steps, independently of the implementation.
    seed, name, r, d_in = 7, "model.layers.3.self_attn.v_proj", 4, 96
    key = hashlib.sha256(b"seqr/shared-a/v1\0" + b"7" + b"\0" + name.encode()).digest()
    gen = np.random.PCG64(np.random.SeedSequence(int.from_bytes(key, "big")))
    bits = gen.random_raw(r * d_in)
    expected = [((int(b) >> 11) * 2.0**-53 * 2 - 1) / math.sqrt(d_in) for b in bits]
    got = generate_shared_a(seed, name, r, d_in).flatten().tolist()
    assert got == [float(np.float32(v)) for v in expected]


def test_scaled_like_peft_kaiming_uniform() -> None:
    a = generate_shared_a(1, Q0, 8, 576)
    bound = 1 / math.sqrt(576)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound  # uses the whole range
    assert abs(float(a.mean())) < 0.05 * bound
    # Uniform on [-b, b] has std b / sqrt(3).
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_seed_and_module_change_a() -> None:
    a = generate_shared_a(1, Q0, 4, 32)
    assert not torch.equal(a, generate_shared_a(2, Q0, 4, 32))
    assert not torch.equal(a, generate_shared_a(1, Q0.replace("q_", "v_"), 4, 32))
    assert torch.equal(a, generate_shared_a(1, Q0, 4, 32))


def _peft(torch_seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(torch_seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), local_files_only=True)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, cfg)


def test_installed_a_identical_across_clients_and_frozen() -> None:
    one, two = _peft(0), _peft(1)  # different torch RNG: peft's own A would differ
    h1 = install_shared_a(one, "default", 5)
    h2 = install_shared_a(two, "default", 5)
    assert h1 == h2
    sd1, sd2 = one.state_dict(), two.state_dict()
    a_keys = [k for k in sd1 if "lora_A" in k]
    assert len(a_keys) == 4
    assert all(torch.equal(sd1[k], sd2[k]) for k in a_keys)
    trainable = [n for n, p in one.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    assert check_shared_a(one, "default", 5) == []
    # peft pitfall: set_adapter turns A's grad back on; freezing after it restores FFA-LoRA.
    one.set_adapter("default")
    freeze_shared_a(one, "default")
    assert all("lora_B" in n for n, p in one.named_parameters() if p.requires_grad)


def test_hash_from_plain_model_equals_hash_from_peft_model() -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), local_files_only=True)
    shapes = lora_target_shapes(plain, ["q_proj", "v_proj"])
    peft_model = _peft(0)
    assert shapes == peft_a_shapes(peft_model, "default")
    assert install_shared_a(peft_model, "default", 9) == shared_a_sha256(9, shapes, 4)


def test_tampered_a_detected() -> None:
    peft_model = _peft(0)
    install_shared_a(peft_model, "default", 5)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] += 1e-6
    assert check_shared_a(peft_model, "default", 5) == ["model.layers.1.self_attn.v_proj"]


def test_no_matching_module_is_a_shape_error() -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), local_files_only=True)
    with pytest.raises(ShapeError, match="no_such_proj"):
        lora_target_shapes(plain, ["no_such_proj"])
