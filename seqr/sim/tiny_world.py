"""A tiny Llama and tokenizer for tests and scale runs, saved as a plain folder (the real
loading path).

Everything is real: a LlamaForCausalLM from a small config (about 0.3 M parameters) and a
byte-level BPE tokenizer trained with ``tokenizers`` on a few Python stdlib sources. Both are
deterministic and built offline in about a second; ``tiny_model_dir()`` builds once per process.
"""

from __future__ import annotations

import functools
import shutil
import sysconfig
import tempfile
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, stable stdlib sources: tokenizer training text and private client data in tests.
STDLIB_FILES = ("textwrap.py", "string.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py")
EOS = "<|endoftext|>"


def stdlib_texts(names: tuple[str, ...] = STDLIB_FILES) -> list[Path]:
    """Paths of some stdlib sources that exist on every CPython install."""
    return [STDLIB / name for name in names]


def copy_texts(dest: Path, names: tuple[str, ...] = STDLIB_FILES, suffix: str = ".py") -> Path:
    """A data folder holding copies of stdlib files (a client's 'private' text)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in stdlib_texts(names):
        shutil.copyfile(path, dest / (path.stem + suffix))
    return dest


def build_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """Train a byte-level BPE tokenizer on stdlib text and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in stdlib_texts()], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )
    fast.save_pretrained(folder)


def build_tiny_llama(
    folder: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int = 384,
    seed: int = 0,
) -> Path:
    """Save a tiny LlamaForCausalLM (random weights, fp32, tied embeddings) plus tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


@functools.cache
def tiny_model_dir() -> Path:
    """One tiny model folder per test process (read-only by convention: copy before editing)."""
    root = Path(tempfile.mkdtemp(prefix="seqr-tiny-"))
    return build_tiny_llama(root / "tiny-llama")
