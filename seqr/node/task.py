"""One client run: train, calibrate, export and sign. The CLI and the ClientApp both call this.

Cheap checks come first (output folder, signing key, adapter name, data folder), so bad input
fails in a second and leaves nothing behind; the base model is loaded and its hash checked
before any training. Checkpoints go to a hidden sibling of the output folder and are removed
once the export is published (they hold optimizer state: not for sharing).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from seqr.core.base_model import BaseModel, load_base_model
from seqr.core.errors import ConfigError
from seqr.core.federation import FederationConfig
from seqr.core.key_files import SigningKeyFile
from seqr.core.manifest import ADAPTER_WEIGHTS_NAME, Manifest
from seqr.core.textdata import TextData, TextFile, load_text_data, read_text_folder
from seqr.node.calibrate import CalibrationResult, calibrate
from seqr.node.export import check_adapter_name, default_name, export_adapter
from seqr.node.progress import NodeProgress
from seqr.node.train import TrainResult, heldout_loss, make_lora_model, train_adapter

log = logging.getLogger("seqr.client")


@dataclass
class ClientRun:
    out_dir: Path
    manifest: Manifest
    train: TrainResult
    calibration: CalibrationResult
    heldout_loss: float  # mean loss on this client's held-out chunks (nan if none)
    adapter_bytes: int  # size of adapter_model.safetensors


def checkpoint_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.checkpoints"


def load_model_and_data(
    data_dir: Path,
    fed: FederationConfig,
    *,
    cache_dir: str | Path | None = None,
    files: Sequence[TextFile] | None = None,
) -> tuple[BaseModel, TextData]:
    """The federation's base model (hash checked) and ``data_dir`` tokenized and split as every
    client splits it (train / held-out by the federation's fraction and seed)."""
    base = load_base_model(
        fed.base_model, cache_dir=cache_dir, expected_sha256=fed.base_model_sha256
    )
    data = load_text_data(
        data_dir,
        base.tokenizer,
        seq_len=fed.train_seq_len,
        heldout_fraction=fed.train_heldout_fraction,
        seed=fed.data_seed,
        files=files,
    )
    return base, data


def run_client(
    data_dir: str | Path,
    key_path: str | Path,
    out_dir: str | Path,
    fed: FederationConfig,
    *,
    name: str | None = None,
    passphrase: bytes | None = None,
    cache_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    heldout_chunks: int = 32,
    tracker: NodeProgress | None = None,
) -> ClientRun:
    """Train a LoRA-FA adapter on ``data_dir`` and write the signed export to ``out_dir``.

    ``tracker``: the node's progress file (seqr/node/progress.py), told each stage and step.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"output folder {out_dir} already exists; choose another or delete it")
    key = SigningKeyFile.open(key_path, passphrase)
    name = check_adapter_name(name if name is not None else default_name(data_dir))
    files = read_text_folder(data_dir)
    base, data = load_model_and_data(data_dir, fed, cache_dir=cache_dir, files=files)
    log.info("%s: %d files, %d train / %d held-out chunks of %d tokens", data_dir, data.files,
             len(data.train), len(data.heldout), data.seq_len)  # fmt: skip
    peft_model, a_sha256 = make_lora_model(base.model, fed)
    if tracker is not None:
        tracker.stage("training")
    total = fed.steps
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint_dir_for(out_dir)
    trained = train_adapter(
        peft_model,
        data.train,
        fed,
        a_sha256=a_sha256,
        checkpoint_dir=ckpt,
        checkpoint_every=checkpoint_every,
        identity={"data": data.fingerprint, "base_model_sha256": base.sha256},
        progress=progress,
        on_step=None if tracker is None else lambda step, loss: tracker.step(step + 1, total, loss),
    )
    loss = heldout_loss(peft_model, data.heldout[:heldout_chunks], fed.train_batch_size)
    if tracker is not None:
        tracker.stage("calibrating")
    calibration = calibrate(peft_model, data.train, fed, progress=progress)
    if calibration.privacy is not None:
        log.info("statistics are (%.3g, %.3g)-DP", fed.calib_dp_epsilon, fed.calib_dp_delta)
    if tracker is not None:
        tracker.stage("exporting")
    manifest = export_adapter(
        peft_model,
        calibration.stats,
        out_dir,
        key,
        fed=fed,
        a_sha256=a_sha256,
        base_model_sha256=base.sha256,
        name=name,
        example_count=min(len(data.train), fed.steps * fed.train_batch_size),
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    size = (out_dir / ADAPTER_WEIGHTS_NAME).stat().st_size
    return ClientRun(out_dir, manifest, trained, calibration, loss, size)
