"""One federation round on the server, without Flower: submissions in, verdicts out.

For every submission, in node order: admission checks (seqr.core.admission.admit), the
plausibility probe (seqr/operator/probe.py), then the publisher stages it durably; only then is it
recorded in the replay state, which is saved atomically. At the end of the round the next
registry version is signed and published (every round, so the registry's expiry is refreshed
and staged enrolments / revocations go out even when nothing was admitted).

Crash safety: staging is durable and comes before the replay record, so a crash in between
loses nothing (the restarted Publisher publishes what was staged; the same export sent again
is accepted by staging as a no-op). A crash after the replay record and before publishing is
also safe: the adapter is staged and goes out with the next publish.

A client can never stop a round: a failed or missing reply, a malformed submission, even an
unexpected exception while checking one submission, turns into that client's verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from seqr.core.admission import AdmittedAdapter, SeenSubmissions, admit
from seqr.core.admission_policy import AdmissionPolicy
from seqr.core.atomic_write import write_atomic
from seqr.core.errors import AdmissionError, FormatError, SeqrError
from seqr.core.manifest import MANIFEST_NAME, parse_manifest
from seqr.operator.federation_setup import FederationSetup
from seqr.operator.probe import Probe
from seqr.registry.publish import PublishedVersion, Publisher
from seqr.registry.store import ensure_dir

__all__ = ["Submission", "Verdict", "RoundResult", "ReplayStore", "RoundRunner", "OpenRound"]

log = logging.getLogger("seqr.server.round")

Status = Literal["admitted", "rejected", "failed"]
REPLAY_STATE_NAME = "seen_submissions.json"


@dataclass(frozen=True)
class Submission:
    """What one node sent: its export files, or why there are none."""

    node_id: int
    files: Mapping[str, bytes] | None = None
    error: str = ""  # no files: "timeout", or the error the client (or transport) reported
    public_key: bytes | None = None  # the key the node says it signs with (32 raw bytes)

    @classmethod
    def failed(cls, node_id: int, error: str) -> Submission:
        return cls(node_id=node_id, files=None, error=error or "unknown error")


@dataclass(frozen=True)
class Verdict:
    """The server's answer to one node (sent back to it as ``query.verdict``)."""

    node_id: int
    status: Status
    reason: str  # "" when admitted; an admission reason slug; "timeout" / "client_error"
    message: str
    adapter_sha256: str = ""  # content address of the adapter in the registry, when admitted
    client: str = ""  # the signing key's fingerprint, when known
    registry_version: int = 0  # the version published at the end of this round

    @property
    def admitted(self) -> bool:
        return self.status == "admitted"


@dataclass(frozen=True)
class RoundResult:
    verdicts: tuple[Verdict, ...]  # one per submission, in node order
    published: PublishedVersion

    def by_node(self) -> dict[int, Verdict]:
        return {v.node_id: v for v in self.verdicts}


class ReplayStore:
    """The replay state (SeenSubmissions) in ``<state-dir>/seen_submissions.json``."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / REPLAY_STATE_NAME

    def load(self) -> SeenSubmissions:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return SeenSubmissions()
        try:
            return SeenSubmissions.from_json_bytes(data)
        except FormatError as exc:
            raise FormatError(f"{self.path}: {exc}; restore it from a backup") from None

    def save(self, seen: SeenSubmissions) -> None:
        ensure_dir(self.path.parent)
        write_atomic(self.path, seen.to_json_bytes(), mode=0o600)


class RoundRunner:
    """Admits, stages and publishes one round's submissions into a registry."""

    def __init__(
        self,
        publisher: Publisher,
        setup: FederationSetup,
        probe: Probe,
        replay: ReplayStore,
        *,
        max_age: timedelta = timedelta(days=7),
        **bounds: float,
    ) -> None:
        """``bounds``: the numeric AdmissionPolicy fields (max_mean_z, max_sigma_ratio,
        max_tensor_norm, max_stats_mean, ...: ServerSettings.policy_bounds()); a field not
        given keeps the policy's default."""
        self.publisher = publisher
        self.setup = setup
        self.probe = probe
        self.replay = replay
        self.bounds = dict(bounds)
        self.max_age = max_age

    def run(self, submissions: Iterable[Submission], *, now: datetime) -> RoundResult:
        """Check every submission (in node order), then publish: one whole round."""
        round_ = self.begin()
        for sub in sorted(submissions, key=lambda s: s.node_id):
            round_.check(sub, now=now)
        return round_.finish(now=now)

    def begin(self) -> OpenRound:
        """A round whose submissions are checked one by one as they arrive (server_app.py),
        so each verdict is known, and logged, the moment its reply comes in."""
        return OpenRound(self, self.replay.load())

    # ---- one submission ---------------------------------------------------------------

    def _one(self, sub: Submission, seen: SeenSubmissions, now: datetime) -> Verdict:
        if sub.files is None:
            reason = "timeout" if sub.error == "timeout" else "client_error"
            return Verdict(sub.node_id, "failed", reason, sub.error)
        claimed = _claimed_key(sub.files)
        try:
            adapter = self._check(sub.files, claimed, seen, now)
        except AdmissionError as exc:
            return Verdict(sub.node_id, "rejected", exc.reason, _message(exc), client=claimed[1])
        except Exception as exc:  # a submission must never stop the round
            log.exception("node %d: unexpected error while checking its submission", sub.node_id)
            return Verdict(
                sub.node_id, "rejected", "internal_error", f"{type(exc).__name__}: {exc}"
            )
        if sub.public_key is not None and sub.public_key != adapter.manifest.public_key_bytes:
            return Verdict(
                sub.node_id,
                "rejected",
                "key_mismatch",
                f"the reply names public key {sub.public_key.hex()[:16]}... but the export is "
                f"signed by {adapter.fingerprint}",
                client=adapter.fingerprint,
            )
        try:
            sha = self.publisher.stage_adapter(adapter.files, admitted=now)
        except AdmissionError as exc:  # unknown / revoked client, duplicate weights
            return Verdict(
                sub.node_id, "rejected", exc.reason, _message(exc), client=adapter.fingerprint
            )
        except SeqrError as exc:  # the registry's own checks (verify_entry) refused it
            return Verdict(
                sub.node_id, "rejected", "registry_refused", str(exc), client=adapter.fingerprint
            )
        # Only now is it accepted: remember it (atomically) so it cannot be replayed.
        adapter.record_in(seen)
        self.replay.save(seen)
        return Verdict(
            sub.node_id,
            "admitted",
            "",
            f"adapter {adapter.manifest.name!r} admitted as {sha[:16]}",
            adapter_sha256=sha,
            client=adapter.fingerprint,
        )

    def _check(
        self,
        files: Mapping[str, bytes],
        claimed: tuple[str, str],
        seen: SeenSubmissions,
        now: datetime,
    ) -> AdmittedAdapter:
        policy = self._policy(claimed[0])
        adapter = admit(files, policy, seen=seen, now=now)
        self.probe.check(adapter, **policy.plausibility)
        return adapter

    def _policy(self, claimed_key: str) -> AdmissionPolicy:
        """Allow-list = enrolled clients of the published registry (plus, with auto-enrol, the
        key this submission claims: admit still checks its signature); revoked keys never."""
        document = self.publisher.document
        allowed = {c.public_key.hex() for c in document.clients.values()}
        revoked = {r.public_key.hex() for r in document.revoked.values()}
        if self.publisher.config.auto_enrol and claimed_key:
            allowed.add(claimed_key)
        if not allowed:
            raise AdmissionError(
                "unknown_key",
                "no client key is enrolled in this federation; the operator enrols keys with "
                "`seqr server enrol`",
            )
        return self.setup.policy(allowed, revoked, max_age=self.max_age, **self.bounds)

    def policy_for(self, keys: Iterable[str]) -> AdmissionPolicy:
        """The same bounds for other signers (a task group's members, whose adapter the
        server itself signs): weight, statistics and plausibility bounds of this round."""
        return self.setup.policy(keys, (), max_age=self.max_age, **self.bounds)


class OpenRound:
    """One round in progress: ``check`` each submission as it arrives, then ``finish``."""

    def __init__(self, runner: RoundRunner, seen: SeenSubmissions) -> None:
        self.runner, self.seen = runner, seen
        self.verdicts: dict[int, Verdict] = {}

    def check(self, sub: Submission, *, now: datetime) -> Verdict:
        """Admit (and stage) or refuse one submission; its verdict, also kept for finish."""
        verdict = self.runner._one(sub, self.seen, now)
        log.info("node %d: %s %s %s", sub.node_id, verdict.status, verdict.reason, verdict.message)
        self.verdicts[sub.node_id] = verdict
        return verdict

    def finish(self, *, now: datetime) -> RoundResult:
        """Publish the next registry version; the verdicts in node order."""
        published = self.runner.publisher.publish(now=now)
        log.info(
            "published registry version %d: %d adapters (%d new)",
            published.version,
            published.entries,
            len(published.added),
        )
        ordered = [self.verdicts[n] for n in sorted(self.verdicts)]
        return RoundResult(tuple(_with_version(v, published.version) for v in ordered), published)


def _claimed_key(files: Mapping[str, bytes]) -> tuple[str, str]:
    """(public key hex, fingerprint) the manifest names, unverified; ("", "") if unparsable."""
    try:
        manifest = parse_manifest(files[MANIFEST_NAME])
    except (KeyError, SeqrError, TypeError):
        return "", ""
    return manifest.public_key, manifest.fingerprint


def _message(exc: AdmissionError) -> str:
    text = str(exc)
    prefix = f"{exc.reason}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _with_version(verdict: Verdict, version: int) -> Verdict:
    return replace(verdict, registry_version=version)
