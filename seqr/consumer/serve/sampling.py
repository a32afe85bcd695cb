"""Choosing each next token, and turning tokens into text that respects stop strings.

Every request has its own ``torch.Generator`` (seeded by ``seed``, else from the OS), so what a
request samples depends on its own logits and seed only, never on the other rows of its batch.
Temperature 0 is greedy (argmax). top_p keeps the smallest set of most likely tokens whose
probability reaches top_p (nucleus sampling, Holtzman et al. 2019), always at least one.

TextStream decodes the generated tokens as a whole each time (a BPE token can complete a
character the previous one started), and holds back what could still become a stop string or
an unfinished UTF-8 character, so a stream never sends text it must take back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

REPLACEMENT = "\ufffd"  # what decoding an unfinished UTF-8 byte sequence ends with


@dataclass(frozen=True)
class SamplingParams:
    """Already validated by the request schema (schemas.py)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)


class Sampler:
    """Next-token choice for one request."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator = torch.Generator().manual_seed(seed % (1 << 63))

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (V,) of the last position."""
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.to(torch.float32).cpu() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass above each token
            sorted_probs[before >= self.params.top_p] = 0.0  # the first token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """Generated tokens -> text, with stop strings cut and nothing sent twice."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # the final text so far (after a stop: cut before it)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1 and (not self.stopped or at < len(self.text)):
                self.text, self.stopped = text[:at], True
        if self.stopped:
            return self._take(len(self.text))
        self.text = text
        safe = len(text.rstrip(REPLACEMENT))  # never half a character
        hold = max((len(s) - 1 for s in self.stop), default=0)  # could still become a stop
        return self._take(max(self.sent, safe - hold))

    def finish(self) -> str:
        """Whatever was held back, once no more tokens come."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out
