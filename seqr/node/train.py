"""Private LoRA-FA training: peft LoRA with the shared frozen A, only B is trained.

FFA-LoRA (Sun et al., ICLR 2024) / LoRA-FA: A is random and frozen, B starts at zero (peft's
default) and is the only trainable tensor, so every client's adapter lives in the same
A-subspace, which SEQR's shared-A QR routing needs (arXiv 2509.18093).

Data order is a pure function of (data_seed, step): batch b takes positions b*bs .. b*bs+bs-1
of an endless stream of per-epoch permutations (PCG64 seeded by (data_seed, epoch)). A resumed
run therefore sees exactly the batches an uninterrupted run would have seen.
Checkpoints hold no pickle: B and the Adam moments are safetensors, the rest JSON; each
checkpoint is a folder ``step-NNNNNNNN`` published atomically, the newest complete one wins.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seqr.core.base_model import atomic_folder
from seqr.core.errors import ConfigError, FormatError, ShapeError
from seqr.core.federation import FederationConfig
from seqr.core.shared_a import install_shared_a

ADAPTER = "default"  # peft saves the "default" adapter at the folder's top level
CHECKPOINT_FORMAT = "seqr/train-checkpoint/v1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
log = logging.getLogger("seqr.client.train")


@dataclass
class TrainResult:
    model: Any  # peft PeftModelForCausalLM holding the trained adapter
    a_sha256: str
    steps: int  # optimizer steps done in total (including those before a resume)
    resumed_from: int  # step this run started at (0 = fresh)
    tokens_per_step: int
    seconds: float  # wall time of this run's steps
    losses: list[float] = field(default_factory=list)  # per step of this run

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def tokens_per_second(self) -> float:
        run_tokens = (self.steps - self.resumed_from) * self.tokens_per_step
        return run_tokens / self.seconds if self.seconds > 0 else 0.0


def make_lora_model(model: Any, fed: FederationConfig) -> tuple[Any, str]:
    """Wrap a base model in peft LoRA with the shared frozen A; return (peft model, A hash)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=fed.lora_rank,
        lora_alpha=fed.lora_alpha,
        target_modules=list(fed.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # B = 0, so the adapter starts as the base model
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER)
    # set_adapter (called by get_peft_model) re-enables A's grad: install + freeze after it.
    a_sha256 = install_shared_a(peft_model, ADAPTER, fed.a_seed)
    if fed.a_sha256 and a_sha256 != fed.a_sha256:
        raise ConfigError(
            f"shared A regenerated from a-seed {fed.a_seed} has sha256 {a_sha256} but the "
            f"federation says a-sha256 = {fed.a_sha256}; the base model's LoRA modules or the "
            "seed differ from the federation's"
        )
    return peft_model, a_sha256


def trainable_b(peft_model: Any) -> dict[str, Any]:
    """The trainable parameters by name; refuses anything but lora_B (FFA-LoRA invariant)."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    wrong = [n for n in params if ".lora_B." not in n]
    if wrong or not params:
        raise ShapeError(f"only lora_B may be trainable, found {wrong or 'no trainable tensor'}")
    return params


def batch_indices(step: int, n_chunks: int, batch_size: int, seed: int) -> np.ndarray:
    """Chunk indices of batch ``step`` in the endless stream of seeded epoch permutations."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(positions // n_chunks):
        perm = np.random.Generator(np.random.PCG64([seed, int(epoch)])).permutation(n_chunks)
        here = positions // n_chunks == epoch
        out[here] = perm[positions[here] % n_chunks]
    return out


def train_step(
    model: Any, chunks: np.ndarray, step: int, fed: FederationConfig, params: list, optimizer: Any
) -> float:
    """One optimizer step on the step-th deterministic batch; its loss; ShapeError if not finite."""
    import torch

    idx = batch_indices(step, len(chunks), fed.train_batch_size, fed.data_seed)
    batch = torch.from_numpy(chunks[idx])
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    if fed.train_max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, fed.train_max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ShapeError(f"training loss became {value} at step {step}; lower train-lr")
    return value


def train_adapter(
    peft_model: Any,
    chunks: np.ndarray,
    fed: FederationConfig,
    *,
    a_sha256: str,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    identity: dict[str, str] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train B for ``fed.steps`` steps on (N, seq_len) token chunks, resuming if checkpointed.

    ``identity`` (e.g. data fingerprint, base model hash) is stored in checkpoints and must
    match on resume. ``on_step(step, loss)`` runs after each step (progress reporting, tests).
    """
    import torch
    from tqdm.auto import tqdm

    if chunks.ndim != 2 or len(chunks) == 0:
        raise ShapeError(
            f"training chunks must be a non-empty (N, seq_len) array, got {chunks.shape}"
        )
    total = fed.steps
    params = trainable_b(peft_model)
    # fused: one kernel for all B tensors instead of a Python loop over them (CPU and CUDA).
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=fed.train_lr, weight_decay=0.0, fused=True
    )
    identity = {**(identity or {}), "federation": _resume_fingerprint(fed), "a_sha256": a_sha256}
    start = 0
    if checkpoint_dir is not None:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            start = restore_checkpoint(found, params, optimizer, identity)
            log.info("resuming from checkpoint at step %d of %d", start, total)
    peft_model.train()
    losses: list[float] = []
    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="train LoRA-FA", unit="step", disable=not progress)
    for step in range(start, total):
        value = train_step(peft_model, chunks, step, fed, list(params.values()), optimizer)
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        if (step + 1) % 10 == 0 or step + 1 == total:
            log.info("step %d/%d loss %.4f", step + 1, total, value)
        done = step + 1
        if checkpoint_dir is not None and (done % checkpoint_every == 0 and done < total):
            save_checkpoint(checkpoint_dir, done, identity, params, optimizer)
        if on_step is not None:
            on_step(step, value)
    bar.close()
    peft_model.eval()
    seconds = time.perf_counter() - began
    per_step = fed.train_batch_size * int(chunks.shape[1])
    return TrainResult(peft_model, a_sha256, total, start, per_step, seconds, losses)


def heldout_loss(peft_model: Any, chunks: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token loss over chunks (for reports; never used for training)."""
    import torch

    if len(chunks) == 0:
        return math.nan
    peft_model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            batch = torch.from_numpy(chunks[i : i + batch_size])
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            total += float(loss) * len(batch)
            count += len(batch)
    return total / count


def _resume_fingerprint(fed: FederationConfig) -> str:
    # The step count may change between runs (train longer); nothing else may.
    return fed.replace(train_steps=1, train_tokens=0).fingerprint()


# ---- checkpoints (no pickle: safetensors + JSON) --------------------------------------------


def save_checkpoint(
    folder: Path, step: int, identity: dict[str, str], params: dict[str, Any], optimizer: Any
) -> Path:
    """Publish ``folder/step-NNNNNNNN`` atomically, then drop older checkpoints."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:08d}"
    moments = {}
    for name, param in params.items():
        state = optimizer.state[param]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            moments[f"{name}/{key}"] = state[key].detach().contiguous()
    with atomic_folder(target) as tmp:
        save_file(
            {n: p.detach().contiguous() for n, p in params.items()}, tmp / "lora_b.safetensors"
        )
        save_file(moments, tmp / "optimizer.safetensors")
        state_json = {"format": CHECKPOINT_FORMAT, "step": step, "identity": identity}
        (tmp / "state.json").write_text(json.dumps(state_json, indent=1, sort_keys=True))
    for old in folder.iterdir():
        match = _STEP_DIR.match(old.name)
        if match and int(match.group(1)) < step:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder (temp folders of interrupted saves are ignored)."""
    if not folder.is_dir():
        return None
    steps = sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def restore_checkpoint(
    path: Path, params: dict[str, Any], optimizer: Any, identity: dict[str, str]
) -> int:
    """Load B and the Adam moments into ``params``/``optimizer``; return the step to resume at."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(path / "lora_b.safetensors")
        moments = load_file(path / "optimizer.safetensors")
    except (OSError, ValueError, SafetensorError) as exc:
        raise FormatError(
            f"checkpoint {path} is unreadable ({exc}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    saved = state.get("identity", {})
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ConfigError(
                f"checkpoint {path} was made with {key} = {saved.get(key)!r}, this run has "
                f"{value!r}; delete {path.parent} to train from scratch"
            )
    if set(weights) != set(params):
        raise FormatError(f"checkpoint {path} holds tensors {sorted(weights)[:3]}..., not this B")
    groups = optimizer.state_dict()["param_groups"]
    opt_state = {}
    with torch.no_grad():
        for i, (name, param) in enumerate(params.items()):
            if weights[name].shape != param.shape:
                raise FormatError(f"checkpoint {path}: {name} has shape {weights[name].shape}")
            param.copy_(weights[name])
            try:
                opt_state[i] = {
                    k: moments[f"{name}/{k}"] for k in ("step", "exp_avg", "exp_avg_sq")
                }
            except KeyError as exc:
                raise FormatError(f"checkpoint {path} lacks optimizer state {exc}") from None
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    step = state.get("step")
    if not isinstance(step, int) or step < 1:
        raise FormatError(f"checkpoint {path} has a bad step {step!r}")
    return step
