"""Route text through an audited adapter registry: what a client does with the published library.

``RegistryRouter.open(source)`` takes these steps, each failing with a SeqrError that names why:

1. ``audit_registry`` (python-tuf's client workflow: server signatures, thresholds, rollback,
   freeze, mix-and-match; the RFC 9162 log; every adapter's files, signature and statistics);
   the trusted state changes only on success. ``source`` is a folder or an http(s) URL.
2. The adapters are the exact bytes the audit verified (``VerifiedRegistry.adapters``): nothing
   is read from disk again, so nothing can change between the audit and the load.
3. The base model is loaded and its hash checked against the hash every manifest signed.
4. One peft model is built from the SIGNED manifest fields (rank, alpha, target modules) and
   the safetensors bytes; adapter_config.json's free-form peft options (DoRA, modules_to_save,
   ...) are never applied, since they would change what runs.
5. A RoutedModel scores every adapter with SEQR z-scores: by default against each adapter's own
   signed statistics; with ``calibration="reference"`` against statistics this router measures
   on public text it trusts (``reference``: a folder of text files), so no adapter author
   supplies the numbers; ``"blend"`` averages both z-scores (model_routing.reference);
   ``"queries"`` z-scores with sequence-level statistics over ``reference`` holding unlabeled
   examples of the inputs this router serves (e.g. its recent queries), covering its domains.

Per-sequence routing (default) picks one adapter per input from a first pass on the base model
and generates the batch with mixed adapters (peft ``adapter_names``); per-token routing mixes
adapters inside every LoRA module (seqr.core.model_routing). Prompts are left-padded (and
left-truncated) so that every row's last prompt token sits at the end of the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from seqr.consumer.calibration import calibrated_statistics, reference_batches
from seqr.consumer.config import RouterConfig
from seqr.consumer.scorable import unscorable_reasons
from seqr.core.base_model import BaseModel, load_base_model
from seqr.core.errors import ConfigError, DataError, ModelError, RegistryError
from seqr.core.federation import DEFAULT_BASE_MODEL
from seqr.core.manifest import ADAPTER_WEIGHTS_NAME, NORM_STATS_NAME, Manifest
from seqr.core.model_routing import RoutedModel, RoutingDecision
from seqr.core.model_routing.per_token import ModuleRecord, per_token_routing
from seqr.core.stats import NormStatistics
from seqr.registry import (
    AuditConfig,
    AuditReport,
    EntryReport,
    VerifiedRegistry,
    audit_registry,
)

__all__ = ["AuditedAdapter", "RegistryRouter", "RouteResult", "RouterConfig", "audited_adapters"]

log = logging.getLogger("seqr.route")
_NOT_ON_REFERENCE = (
    "it cannot be scored on the reference text (non-finite scores or statistics in float32)"
)


@dataclass(frozen=True)
class AuditedAdapter:
    """One registry adapter, from the bytes the audit verified."""

    name: str  # manifest name (unique here: a repeated name gets its client key id appended)
    entry: EntryReport
    manifest: Manifest
    weights: bytes  # adapter_model.safetensors
    stats: NormStatistics


@dataclass(frozen=True)
class RouteResult:
    """Where one input went, and why."""

    text: str
    adapter: str  # the chosen adapter's name (per-sequence SEQR decision on the input)
    adapter_sha256: str
    margin: float  # mean z-score of the chosen adapter minus the runner-up's (inf: one adapter)
    runner_up: str | None
    scores: dict[str, float]  # mean z-score over the input's tokens and LoRA modules
    tokens: int  # input tokens routed (after truncation)
    token_share: dict[str, float] | None = None  # per_token: share of (token, module) wins
    # "kept" / "changed" where the loss check decided (docs/ROUTING.md); margin < 0 if changed
    loss_check: str | None = None
    generated: str | None = None  # greedy continuation, when asked for

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "adapter": self.adapter,
            "adapter_sha256": self.adapter_sha256,
            "margin": self.margin if math.isfinite(self.margin) else None,
            "runner_up": self.runner_up,
            "scores": self.scores,
            "tokens": self.tokens,
            "token_share": self.token_share,
            "loss_check": self.loss_check,
            "generated": self.generated,
        }


def audited_adapters(verified: VerifiedRegistry) -> list[AuditedAdapter]:
    """The audit's verified adapters, each under a unique name (step 2 above)."""
    adapters: list[AuditedAdapter] = []
    names: set[str] = set()
    # By name, then key: the same order (and internal ids) whatever order the registry lists.
    for adapter in sorted(verified.adapters, key=lambda a: (a.entry.name, a.entry.client)):
        entry = adapter.entry
        name = entry.name if entry.name not in names else f"{entry.name}-{entry.client[7:15]}"
        while name in names:  # the same client reused a name: number the later ones
            name = f"{name}-{len(names)}"
        names.add(name)
        stats = NormStatistics.from_json_bytes(adapter.files[NORM_STATS_NAME])
        weights = adapter.files[ADAPTER_WEIGHTS_NAME]
        adapters.append(AuditedAdapter(name, entry, adapter.manifest, weights, stats))
    return adapters


def build_peft_model(base_model: Any, adapters: Sequence[AuditedAdapter]) -> Any:
    """One PeftModel holding every adapter under an internal name ``a<i>`` (step 4 above).

    Internal names, not manifest names: peft keeps adapters in ModuleDicts, whose keys may
    not contain dots, which manifest names may.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load as load_safetensors

    peft_model: Any = None
    for i, adapter in enumerate(adapters):
        m, internal = adapter.manifest, f"a{i}"
        alpha: Any = int(m.alpha) if m.alpha.is_integer() else m.alpha  # as the client exported
        lora = LoraConfig(r=m.rank, lora_alpha=alpha, target_modules=list(m.target_modules),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip
        if peft_model is None:
            peft_model = get_peft_model(base_model, lora, adapter_name=internal)
        else:
            peft_model.add_adapter(internal, lora)
        tensors = load_safetensors(adapter.weights)
        expected = get_peft_model_state_dict(
            peft_model, adapter_name=internal, save_embedding_layers=False
        )
        if set(tensors) != set(expected):
            missing, extra = (
                sorted(set(expected) - set(tensors)),
                sorted(set(tensors) - set(expected)),
            )
            raise RegistryError(
                f"adapter {adapter.name}: weights do not fit its signed LoRA shape on this base "
                f"model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        try:
            set_peft_model_state_dict(peft_model, tensors, adapter_name=internal)
        except RuntimeError as exc:  # size mismatch
            raise RegistryError(f"adapter {adapter.name}: {exc}") from None
    if peft_model is None:
        raise RegistryError("the registry holds no adapters; there is nothing to route to")
    return peft_model.eval()


class RegistryRouter:
    """Route and generate with every adapter of an audited registry (see module docstring)."""

    def __init__(self, base: Any, adapters: Sequence[AuditedAdapter], report: AuditReport,
                 config: RouterConfig | None = None) -> None:  # fmt: skip
        self.config = config or RouterConfig()
        self.report = report
        self.tokenizer = base.tokenizer
        self.tokenizer.padding_side = "left"  # generation appends at the end of every row
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # An adapter this router cannot score is skipped (self.skipped: name -> reason), never
        # the whole registry: first by its own bytes, then by the statistics measured here.
        adapters, self.skipped = _scorable(adapters, unscorable_reasons(adapters), {})
        peft_model = build_peft_model(base.model, adapters).to(self.config.device)
        by_internal = {f"a{i}": a for i, a in enumerate(adapters)}
        own = {i: a.stats for i, a in by_internal.items()}
        pool = (
            None
            if self.config.calibration == "own"
            else reference_batches(self.config, self.tokenizer)
        )
        stats = calibrated_statistics(peft_model, own, self.config, pool)
        lost = [i for i in by_internal if i not in stats]
        for i in lost:
            peft_model.delete_adapter(i)
        reasons = {by_internal[i].name: _NOT_ON_REFERENCE for i in lost}
        kept, self.skipped = _scorable(adapters, reasons, self.skipped)
        self.adapters = tuple(kept)
        self.names = tuple(a.name for a in kept)
        internal = [i for i in by_internal if i in stats]
        stats = {i: stats[i] for i in internal}
        self.routed = RoutedModel(peft_model, self.config.routing(), adapters=internal, stats=stats)
        if self.config.aggregation == "soft_vote":  # shares standardised over the same pool
            assert pool is not None  # RouterConfig: soft votes need calibration "queries"
            self.routed.use_vote_statistics(self.routed.measure_vote_statistics(pool))

    @classmethod
    def open(
        cls,
        source: Path | str,
        *,
        trusted_state: Path | str | None = None,
        base_model: str | None = None,
        cache_dir: Path | str | None = None,
        config: RouterConfig | None = None,
        audit_config: AuditConfig | None = None,
    ) -> RegistryRouter:
        """Audit the registry at ``source`` (a folder or URL; ``trusted_state``: the folder
        remembering what was trusted), then load its adapters and the base model."""
        verified = audit_registry(source, trusted_state, config=audit_config)
        return cls.from_verified(
            verified, base_model=base_model, cache_dir=cache_dir, config=config
        )

    @classmethod
    def from_verified(
        cls,
        verified: VerifiedRegistry,
        *,
        base_model: str | None = None,
        cache_dir: Path | str | None = None,
        config: RouterConfig | None = None,
        base: BaseModel | None = None,
    ) -> RegistryRouter:
        """Steps 2-5 for a registry that ``audit_registry`` just verified.

        ``base``: an already loaded base model to wrap instead of loading one (a server keeps
        one in memory); its hash must still be the one every manifest signed.
        """
        report = verified.report
        if not verified.adapters:
            raise RegistryError(
                f"registry {report.source} (version {report.version}) passed the audit but "
                "holds no adapters yet; run a federation round first"
            )
        adapters = audited_adapters(verified)
        wanted = {a.manifest.base_model_sha256 for a in adapters}
        if len(wanted) != 1:
            raise RegistryError(f"the adapters were trained on {len(wanted)} base models")
        expected, model = wanted.pop(), base_model or DEFAULT_BASE_MODEL
        if base is not None and base.sha256 != expected:
            raise ModelError(f"base model {base.name!r} has sha256 {base.sha256} but the "
                             f"adapters were trained on {expected}")  # fmt: skip
        try:
            base = base or load_base_model(model, cache_dir=cache_dir, expected_sha256=expected)
        except ModelError as exc:
            raise ModelError(f"{exc} (choose it with --base-model / base_model=)") from None
        return cls(base, adapters, report, config)

    # ----- public API -------------------------------------------------------------------
    def route(self, texts: Sequence[str]) -> list[RouteResult]:
        """The adapter SEQR picks for each text, its z-score margin and every adapter's score."""
        return [r for batch in self._batches(texts) for r in self._route_batch(*batch)]

    def generate(self, texts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``max_new_tokens`` tokens, each with its routed adapter(s)."""
        return [r.generated or "" for r in self.route_and_generate(texts, max_new_tokens)]

    def route_and_generate(self, texts: Sequence[str], max_new_tokens: int) -> list[RouteResult]:
        """route() and generate() together; per_sequence routes each batch once."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ConfigError(f"max_new_tokens = {max_new_tokens!r} must be an integer >= 1")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens = {max_new_tokens} must be >= 1")
        out: list[RouteResult] = []
        for batch_texts, ids, mask in self._batches(texts):
            if self.config.mode == "per_token":
                routes = self._route_batch(batch_texts, ids, mask)
            generated = self._generate_batch(ids, mask, max_new_tokens)
            if self.config.mode == "per_sequence":  # the routing pass generate just made
                decision = self.routed.last_decision
                if decision is None:
                    raise ModelError("generation ran without a routing decision")
                routes = self._results(batch_texts, mask, decision, None)
            out += [_with_text(r, g) for r, g in zip(routes, generated, strict=True)]
        return out

    # ----- internals --------------------------------------------------------------------
    def _batches(
        self, texts: Sequence[str]
    ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        from tqdm.auto import tqdm

        texts = list(texts)
        if not texts:
            raise DataError("no input text given")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise DataError(f"input {i} is {text!r:.40}; every input must be non-empty text")
        size = self.config.batch_size
        starts = range(0, len(texts), size)
        for start in tqdm(starts, desc="route", unit="batch", disable=not self.config.progress):
            chunk = texts[start : start + size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.config.max_input_tokens)  # fmt: skip
            device = self.config.device
            yield chunk, enc["input_ids"].to(device), enc["attention_mask"].to(device)

    @torch.no_grad()
    def _route_batch(
        self, texts: list[str], ids: torch.Tensor, mask: torch.Tensor
    ) -> list[RouteResult]:
        decision = self.routed.route_sequences(ids, mask)
        shares = None
        if self.config.mode == "per_token":
            records: dict[str, ModuleRecord] = {}
            with per_token_routing(self.routed.modules, self.routed.config, records):
                self.routed.peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            shares = _token_shares(records, mask, len(self.names))
        return self._results(texts, mask, decision, shares)

    @torch.no_grad()
    def _generate_batch(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> list[str]:
        out = self.routed.generate(
            ids, mask, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        return list(self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))

    def _results(
        self,
        texts: list[str],
        mask: torch.Tensor,
        decision: RoutingDecision,
        shares: torch.Tensor | None,
    ) -> list[RouteResult]:
        scores = decision.scores.double().cpu()
        results = []
        for row, text in enumerate(texts):
            best = int(decision.indices[row])
            order = torch.argsort(scores[row], descending=True).tolist()
            runner = next((i for i in order if i != best), None)
            share = (
                None if shares is None else dict(zip(self.names, shares[row].tolist(), strict=True))
            )
            results.append(
                RouteResult(
                    text=text,
                    adapter=self.names[best],
                    adapter_sha256=self.adapters[best].entry.adapter_sha256,
                    margin=float(decision.margin[row]),
                    runner_up=None if runner is None else self.names[runner],
                    scores=dict(zip(self.names, scores[row].tolist(), strict=True)),
                    tokens=int(mask[row].sum()),
                    token_share=share,
                    loss_check=None if decision.loss_check is None else decision.loss_check[row],
                )
            )
        return results


def _scorable(
    adapters: Sequence[AuditedAdapter], reasons: dict[str, str], skipped: dict[str, str]
) -> tuple[list[AuditedAdapter], dict[str, str]]:
    """The adapters without a reason to skip them, and every skip so far (name -> reason),
    each logged by name. RegistryError when none is left."""
    for name, reason in reasons.items():
        log.warning("adapter %s skipped: %s", ascii(name), reason)
    skipped = {**skipped, **reasons}
    kept = [a for a in adapters if a.name not in reasons]
    if not kept:
        shown = "; ".join(f"{ascii(n)}: {r}" for n, r in list(skipped.items())[:3])
        raise RegistryError(f"no adapter of the registry can be scored ({shown})")
    return kept, skipped


def _token_shares(records: dict[str, ModuleRecord], mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N): share of (valid token, module) pairs whose top choice was each adapter."""
    counts = torch.zeros(mask.shape[0], n, dtype=torch.float64)
    valid = mask.to(torch.float64).cpu().unsqueeze(-1)  # (B, T, 1)
    for record in records.values():
        top = torch.nn.functional.one_hot(record.indices[..., 0].cpu(), n).to(torch.float64)
        counts += (top * valid).sum(dim=1)
    return counts / counts.sum(dim=1, keepdim=True)


def _with_text(result: RouteResult, generated: str) -> RouteResult:
    return replace(result, generated=generated)
