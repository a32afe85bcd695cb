"""Prompts as tokens: what the model continues, and what SEQR routes on.

Completions: the prompt text tokenized exactly as RegistryRouter tokenizes its inputs, so
``auto`` chooses what ``RegistryRouter.route`` chooses for the same text. Chat: the model
continues the base model's chat template applied to the messages, but SEQR routes on the
messages' text alone (joined by newlines): the template's fixed tokens (role markers, a default
system prompt) say nothing about the domain and would dilute every adapter's score, and the
adapters' statistics were measured on plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seqr.consumer.serve.config import LimitsConfig
from seqr.consumer.serve.errors import ApiError


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what the model continues
    route_on: list[int]  # what SEQR scores (auto)


class Prompter:
    """Tokenize and bound prompts (ApiError 400 for anything over the limits)."""

    def __init__(self, tokenizer: Any, limits: LimitsConfig, context: int) -> None:
        self.tokenizer, self.limits, self.context = tokenizer, limits, context

    def completion(self, text: str, param: str = "prompt") -> Prompt:
        if not text:
            raise ApiError(
                400,
                f"{param} is empty; give some text to continue",
                param=param,
                code="empty_prompt",
            )
        ids = self._tokens(text, special=True, param=param)
        return Prompt(ids, ids)

    def chat(self, messages: list[Any]) -> Prompt:
        if not messages:
            raise ApiError(
                400,
                "messages is empty; give at least one message",
                param="messages",
                code="empty_prompt",
            )
        if len(messages) > self.limits.max_messages:
            raise ApiError(
                400,
                f"messages holds {len(messages)} messages; at most {self.limits.max_messages}",
                param="messages",
                code="too_many",
            )
        texts = [m.text() for m in messages]
        route_text = "\n".join(t for t in texts if t)
        if not route_text:
            raise ApiError(
                400, "every message is empty; give some text", param="messages", code="empty_prompt"
            )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError(
                400,
                "this server's base model has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        conversation = [
            {"role": m.role, "content": t} for m, t in zip(messages, texts, strict=True)
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # noqa: BLE001 - jinja refuses what the template cannot say
            raise ApiError(
                400,
                f"the chat template cannot format these messages: {exc}",
                param="messages",
                code="invalid_value",
            ) from None
        ids = self._tokens(text, special=False, param="messages")
        route = self.tokenizer(route_text)["input_ids"][-self.limits.max_prompt_tokens :]
        return Prompt(ids, list(route))

    def check_room(self, prompt: Prompt, max_tokens: int) -> None:
        if len(prompt.ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt's {len(prompt.ids)} tokens plus max_tokens = "
                f"{max_tokens} exceed the model's context of {self.context} tokens; "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _tokens(self, text: str, *, special: bool, param: str) -> list[int]:
        # The text is bounded by the body limit; the app tokenizes off the event loop.
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        limit = self.limits.max_prompt_tokens
        if len(ids) > limit:
            raise ApiError(
                400,
                f"{param} has {len(ids)} tokens; this server accepts at most {limit}",
                param=param,
                code="too_many_tokens",
            )
        if not ids:
            raise ApiError(400, f"{param} gives no tokens", param=param, code="empty_prompt")
        return ids
