"""Test helpers: the tiny Llama world lives in seqr/sim/tiny_world.py (scale runs use it too)."""

from seqr.sim.tiny_world import (  # noqa: F401
    EOS,
    STDLIB,
    STDLIB_FILES,
    build_tiny_llama,
    build_tokenizer,
    copy_texts,
    stdlib_texts,
    tiny_model_dir,
)
