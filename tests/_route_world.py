"""A small real registry whose adapters each own one text domain, for the routing tests.

Three domains a tiny random Llama tells apart by their tokens: Python source (stdlib files),
lines of numbers, and upper-case prose. Four training steps on a random model do not
specialise an adapter, so each adapter's B is set instead: per LoRA module, the direction of
h = A x (A: the federation's shared A) whose energy its domain has most above the other
domains' (top eigenvector of the difference of second moments), so ||B A x|| is large on its
own domain. Everything else is the real client path: calibration on the adapter's own chunks
(seqr.node.calibrate), the signed export (seqr.node.export), and the server's Publisher.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _server_world import federation_setup
from tiny import copy_texts, stdlib_texts, tiny_model_dir

from seqr.core import key_files, signing
from seqr.core.base_model import load_base_model
from seqr.core.export_folder import read_export
from seqr.core.manifest import parse_manifest
from seqr.core.shared_a import lora_layers
from seqr.core.textdata import load_text_data
from seqr.node.calibrate import calibrate
from seqr.node.export import export_adapter
from seqr.node.train import ADAPTER, make_lora_model
from seqr.operator.registry_ops import init_registry, open_publisher

DOMAINS = ("code", "digits", "upper")
# fmt: off
WORDS = ("the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on",
         "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one",
         "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can")
# fmt: on


def domain_text(domain: str, lines: int, seed: int) -> str:
    """Text of one domain; different seeds give different text of the same kind."""
    rng = random.Random(f"{domain}-{seed}")
    if domain == "digits":
        rows = [" ".join(str(rng.randrange(10**6)) for _ in range(12)) for _ in range(lines)]
    elif domain == "upper":
        rows = [" ".join(rng.choice(WORDS) for _ in range(14)).upper() + "." for _ in range(lines)]
    else:  # held-out Python source: stdlib files the code adapter never saw
        files = ("colorsys.py", "glob.py", "keyword.py", "fnmatch.py", "textwrap.py")
        text = stdlib_texts((files[seed % len(files)],))[0].read_text(encoding="utf-8")
        rows = [row for row in text.splitlines() if row.strip()][: lines * 3]
    return "\n".join(rows)


def write_domain(folder: Path, domain: str) -> Path:
    if domain == "code":
        return copy_texts(folder, ("bisect.py", "heapq.py"))
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(domain_text(domain, 60, seed=1000), encoding="utf-8")
    return folder


@torch.no_grad()
def module_inputs(peft_model: Any, chunks: np.ndarray) -> dict[str, torch.Tensor]:
    """Every LoRA module's input rows on the base model (adapter off), as calibration sees."""
    layers = lora_layers(peft_model, ADAPTER)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook_for(name: str) -> Any:
        return lambda module, args, out: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.register_forward_hook(hook_for(n)) for n, layer in layers.items()]
    try:
        with peft_model.disable_adapter():
            decoder = peft_model.get_base_model().get_decoder()
            decoder(input_ids=torch.from_numpy(chunks), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


@dataclass(frozen=True)
class RouteWorld:
    registry: Path
    server_key: Path  # folder holding signing_key.pem
    exports: dict[str, Path]  # domain -> signed export folder
    model_dir: Path


def build_exports(root: Path) -> dict[str, Path]:
    fed = federation_setup().federation
    tokenizer = load_base_model(fed.base_model).tokenizer
    chunks = {}
    for domain in DOMAINS:
        folder = write_domain(root / "data" / domain, domain)
        chunks[domain] = load_text_data(
            folder, tokenizer, seq_len=fed.train_seq_len, heldout_fraction=0.1, seed=0
        ).train
    exports = {}
    for domain in DOMAINS:
        base = load_base_model(fed.base_model)  # fresh: peft wraps the model in place
        peft_model, a_sha256 = make_lora_model(base.model, fed)
        own = module_inputs(peft_model, chunks[domain])
        others = [module_inputs(peft_model, chunks[d]) for d in DOMAINS if d != domain]
        with torch.no_grad():
            for name, layer in lora_layers(peft_model, ADAPTER).items():
                a = layer.lora_A[ADAPTER].weight  # (r, d_in), the shared A

                def moment(x: torch.Tensor, a: torch.Tensor = a) -> torch.Tensor:
                    h = x @ a.T  # (M, r)
                    return h.T @ h / len(h)

                diff = moment(own[name]) - sum(moment(o[name]) for o in others) / len(others)
                direction = torch.linalg.eigh(diff).eigenvectors[:, -1]  # (r,)
                b = torch.zeros_like(layer.lora_B[ADAPTER].weight)  # (d_out, r)
                b[0] = direction
                layer.lora_B[ADAPTER].weight.copy_(b)
        stats = calibrate(peft_model, chunks[domain], fed, progress=False).stats
        key_dir = root / "keys" / domain
        key_files.write_keypair(key_dir)
        key = key_files.SigningKeyFile.open(key_dir / signing.PRIVATE_KEY_NAME)
        exports[domain] = root / "exports" / domain
        export_adapter(peft_model, stats, exports[domain], key, fed=fed, a_sha256=a_sha256,
                       base_model_sha256=base.sha256, name=domain,
                       example_count=len(chunks[domain]))  # fmt: skip
    return exports


def publish_registry(
    registry: Path, server_key: Path, exports: dict[str, Path], *, names: tuple[str, ...] = DOMAINS
) -> Path:
    """Version 1 (empty), then version 2 holding the exports of ``names``."""
    key_files.write_keypair(server_key)
    keys = [key_files.load_private_key(server_key / signing.PRIVATE_KEY_NAME)]
    init_registry(registry, keys, setup=federation_setup())
    with open_publisher(registry, keys, federation_setup()) as publisher:
        for domain in names:
            files = read_export(exports[domain])
            publisher.enrol_client(parse_manifest(files["manifest.json"]).public_key_bytes)
            publisher.stage_adapter(files)
        publisher.publish()
    return registry


def make_world(root: Path) -> RouteWorld:
    exports = build_exports(root / "clients")
    registry = publish_registry(root / "registry", root / "server-key", exports)
    return RouteWorld(registry, root / "server-key", exports, tiny_model_dir())
