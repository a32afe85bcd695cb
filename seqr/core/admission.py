"""The server's admission checks: pure functions over the bytes a client submitted.

``admit`` takes ``{file name: bytes}`` (no I/O, python-tuf's TrustedMetadataSet style) and
either returns the typed ``AdmittedAdapter`` or raises ``AdmissionError(reason, message)``,
``reason`` being one stable slug of ``REASONS``. Checks run cheapest first, and nothing is
parsed before the bytes are known to be signed by an allowed key, except the manifest itself
(which must be parsed to find the key), the model-signing bundle (which holds the signature) and
size caps (which bound all the work).

``check_stats_plausible`` (stats_plausibility.py, re-exported here) is the separate check
against lying statistics, run once the server has recomputed the adapter's probe norms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np

from seqr.core.admission_policy import AdmissionPolicy, SeenSubmissions
from seqr.core.errors import (
    AdmissionError,
    FormatError,
    RejectionReason,
    SignatureError,
    ValueCheckError,
)
from seqr.core.manifest import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    EXPORT_FILE_NAMES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    NORM_STATS_NAME,
    SIGNATURE_NAME,
    Manifest,
    manifest_sha256,
    parse_manifest,
)
from seqr.core.model_signature import (
    MAX_BUNDLE_BYTES,
    check_signed_digests,
    check_signed_names,
    verify_bundle,
)
from seqr.core.safetensors_check import (
    SafetensorsHeader,
    load_float_tensors,
    looks_like_pickle,
    parse_safetensors_header,
)
from seqr.core.stats import NormStatistics
from seqr.core.stats_plausibility import check_stats_plausible
from seqr.core.strict_json import loads_strict
from seqr.core.value_bounds import check_statistics, check_weights

__all__ = [
    "REASONS",
    "AdmissionPolicy",
    "SeenSubmissions",
    "AdmittedAdapter",
    "admit",
    "check_stats_plausible",
]

# Every reason admit / check_stats_plausible may give, in the order admit checks them.
REASONS = (
    "wrong_files",  # the submission is not exactly the five export files
    "too_large",  # a file over its byte cap
    "bad_manifest",  # manifest.json malformed, or the bundle signs other files than the export's
    "bad_signature",  # model.sig malformed, or it does not verify with manifest.json's key
    "revoked_key",  # signed by a key on the revocation list
    "unknown_key",  # signed by a key not on the allow-list
    "duplicate",  # this exact manifest was admitted before
    "replay",  # not newer than the newest submission admitted from this key
    "future",  # created further in the future than the allowed clock skew
    "stale",  # created longer ago than the allowed age
    "hash_mismatch",  # a file's bytes differ from the SHA-256 the bundle signed
    "wrong_base_model",  # trained on another base model
    "wrong_a",  # another shared A (seed, hash, or tensors that differ from it)
    "bad_config",  # adapter_config.json malformed
    "wrong_config",  # LoRA rank / alpha / target modules not the federation's
    "pickle_payload",  # the weights file is a pickle / torch.save archive
    "malformed_safetensors",  # the weights file breaks the safetensors format
    "wrong_tensors",  # tensor names, shapes or dtypes not the federation's
    "non_finite",  # NaN or inf in the weights
    "weights_out_of_bounds",  # a tensor's norm over the policy's bound (float32 overflow)
    "bad_stats",  # norm_stats.json malformed, empty, degenerate, out of bounds, other modules
    "implausible_stats",  # check_stats_plausible: statistics that would hijack routing
)


@dataclass(frozen=True)
class AdmittedAdapter:
    """A submission that passed every check of ``admit``, with its parsed contents."""

    manifest: Manifest
    manifest_sha256: str  # names this submission (replay state, registry entries)
    files: Mapping[str, bytes]  # the exact bytes received, to publish unchanged
    tensors: Mapping[str, np.ndarray]  # adapter weights (BF16 widened to float32)
    stats: NormStatistics
    adapter_config: Mapping[str, Any]

    @property
    def public_key(self) -> str:
        return self.manifest.public_key

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def record_in(self, seen: SeenSubmissions) -> None:
        """Remember this submission so the same one, or an older one, is refused next time."""
        seen.record(self.manifest_sha256, self.public_key, self.manifest.created)


def admit(
    files: Mapping[str, bytes],
    policy: AdmissionPolicy,
    *,
    seen: SeenSubmissions,
    now: datetime,
) -> AdmittedAdapter:
    """Check one submission; return it parsed, or raise AdmissionError(reason, message).

    Pure: reads ``seen`` without changing it (call ``AdmittedAdapter.record_in`` once the
    submission is accepted). ``now`` must be timezone-aware.
    """
    if now.utcoffset() is None:
        raise ValueCheckError("admit needs a timezone-aware now, e.g. datetime.now(UTC)")
    _check_file_set(files)
    _check_sizes(files, policy)
    manifest_bytes = files[MANIFEST_NAME]
    try:
        manifest = parse_manifest(manifest_bytes)
    except FormatError as exc:
        _reject("bad_manifest", str(exc))
    # The model-signing bundle, verified with the key manifest.json names; manifest.json is
    # one of the files it signs, so its fields count only once its own digest matches.
    try:
        signed = verify_bundle(files[SIGNATURE_NAME], manifest.public_key_bytes)
    except (FormatError, SignatureError) as exc:
        _reject("bad_signature", str(exc))
    if MANIFEST_NAME not in signed:
        _reject("bad_signature", f"{SIGNATURE_NAME} does not sign {MANIFEST_NAME}")
    try:
        check_signed_digests({MANIFEST_NAME: signed[MANIFEST_NAME]}, files)
    except SignatureError as exc:
        _reject("hash_mismatch", str(exc))
    _check_key(manifest, policy)
    digest = manifest_sha256(manifest_bytes)
    _check_freshness(manifest, digest, seen, now, policy)
    try:
        check_signed_names(signed, files)
    except SignatureError as exc:
        _reject("bad_manifest", str(exc))
    try:
        check_signed_digests(signed, files)
    except SignatureError as exc:
        _reject("hash_mismatch", str(exc))
    _check_federation(manifest, policy)
    config = _check_config(files[ADAPTER_CONFIG_NAME], manifest, policy)
    tensors = _check_weights(files[ADAPTER_WEIGHTS_NAME], policy)
    stats = _check_stats(files[NORM_STATS_NAME], policy)
    return AdmittedAdapter(
        manifest=manifest,
        manifest_sha256=digest,
        files=MappingProxyType(dict(files)),
        tensors=MappingProxyType(tensors),
        stats=stats,
        adapter_config=MappingProxyType(config),
    )


# ---- the checks, in the order admit runs them ---------------------------------------------


def _check_file_set(files: Mapping[str, bytes]) -> None:
    expected = EXPORT_FILE_NAMES
    missing, extra = expected - set(files), set(files) - expected
    if missing or extra:
        _reject(
            "wrong_files",
            f"a submission holds exactly {sorted(expected)}; missing {sorted(missing)}, "
            f"unexpected {sorted(str(n)[:64] for n in extra)}",
        )


def _check_sizes(files: Mapping[str, bytes], policy: AdmissionPolicy) -> None:
    caps = {
        ADAPTER_WEIGHTS_NAME: policy.max_adapter_bytes,
        NORM_STATS_NAME: policy.max_stats_bytes,
        ADAPTER_CONFIG_NAME: policy.max_config_bytes,
        MANIFEST_NAME: MAX_MANIFEST_BYTES,
        SIGNATURE_NAME: MAX_BUNDLE_BYTES,
    }
    for name, cap in caps.items():
        if len(files[name]) > cap:
            _reject("too_large", f"{name} is {len(files[name])} bytes, over the cap of {cap} bytes")


def _check_key(manifest: Manifest, policy: AdmissionPolicy) -> None:
    # Revocation wins over the allow-list: a revoked key stays refused even if still listed.
    if manifest.public_key in policy.revoked_keys:
        _reject("revoked_key", f"key {manifest.fingerprint} was revoked; enroll a new key")
    if manifest.public_key not in policy.allowed_keys:
        _reject(
            "unknown_key",
            f"key {manifest.fingerprint} is not enrolled in this federation; "
            "send its signing_key.pub to the operator",
        )


def _check_freshness(
    manifest: Manifest,
    digest: str,
    seen: SeenSubmissions,
    now: datetime,
    policy: AdmissionPolicy,
) -> None:
    if digest in seen.manifest_hashes:
        _reject("duplicate", f"manifest {digest[:16]}... was already admitted")
    last = seen.last_created.get(manifest.public_key)
    if last is not None and manifest.created <= last:
        # TUF spec 5.3-5.5: versions never decrease; here `created` plays the version.
        _reject(
            "replay",
            f"created {manifest.created_iso} is not newer than {last.isoformat()}, the newest "
            f"submission already admitted from key {manifest.fingerprint}",
        )
    if manifest.created > now + policy.max_clock_skew:
        _reject(
            "future",
            f"created {manifest.created_iso} is more than {policy.max_clock_skew} after the "
            f"server's time {now.isoformat()}; check the client's clock",
        )
    if manifest.created < now - policy.max_age:
        _reject(
            "stale",
            f"created {manifest.created_iso} is more than {policy.max_age} before the "
            f"server's time {now.isoformat()}; sign the export again",
        )


def _check_federation(manifest: Manifest, policy: AdmissionPolicy) -> None:
    if manifest.base_model_sha256 != policy.base_model_sha256:
        _reject(
            "wrong_base_model",
            f"adapter was trained on base model {manifest.base_model_sha256[:16]}..., "
            f"the federation's is {policy.base_model_sha256[:16]}...",
        )
    if manifest.a_seed != policy.a_seed or manifest.a_sha256 != policy.a_sha256:
        _reject(
            "wrong_a",
            f"shared A seed {manifest.a_seed} / sha256 {manifest.a_sha256[:16]}... differ from "
            f"the federation's seed {policy.a_seed} / {policy.a_sha256[:16]}...",
        )


def _check_config(data: bytes, manifest: Manifest, policy: AdmissionPolicy) -> dict[str, Any]:
    try:
        config = loads_strict(data, what=ADAPTER_CONFIG_NAME, max_bytes=policy.max_config_bytes)
    except FormatError as exc:
        _reject("bad_config", str(exc))
    if not isinstance(config, dict):
        _reject("bad_config", f"{ADAPTER_CONFIG_NAME} must be a JSON object")
    targets = config.get("target_modules")
    if (
        config.get("peft_type") != "LORA"
        or not isinstance(config.get("r"), int)
        or isinstance(config.get("r"), bool)
        or not isinstance(config.get("lora_alpha"), int | float)
        or not isinstance(targets, list)
        or not all(isinstance(t, str) for t in targets)
    ):
        _reject(
            "bad_config",
            f"{ADAPTER_CONFIG_NAME} must be a peft LORA config with integer r, numeric "
            "lora_alpha and a list of target_modules",
        )
    # The three places that state the LoRA shape must agree: config, manifest, federation.
    rows = (
        ("rank", config["r"], manifest.rank, policy.rank),
        ("alpha", float(config["lora_alpha"]), manifest.alpha, policy.alpha or manifest.alpha),
        (
            "target_modules",
            tuple(sorted(set(targets))),
            manifest.target_modules,
            policy.target_modules,
        ),
    )
    for what, in_config, in_manifest, in_policy in rows:
        if not in_config == in_manifest == in_policy:
            _reject(
                "wrong_config",
                f"{what}: adapter_config.json says {in_config}, the manifest {in_manifest}, "
                f"the federation expects {in_policy}",
            )
    return config


def _check_weights(data: bytes, policy: AdmissionPolicy) -> dict[str, np.ndarray]:
    if looks_like_pickle(data):
        _reject(
            "pickle_payload",
            f"{ADAPTER_WEIGHTS_NAME} is a pickle / torch.save file, which runs code when "
            "loaded; export with safetensors (peft save_pretrained, safe_serialization=True)",
        )
    try:
        header = parse_safetensors_header(data, max_header_bytes=policy.max_header_bytes)
    except FormatError as exc:
        _reject("malformed_safetensors", str(exc))
    _check_tensor_specs(header, policy)
    try:
        tensors = load_float_tensors(data, header)
    except FormatError as exc:
        _reject("malformed_safetensors", str(exc))
    for name, array in sorted(tensors.items()):
        if not np.isfinite(array).all():
            _reject("non_finite", f"tensor {name!r} holds NaN or inf")
    try:
        check_weights(tensors, policy.weight_bounds)
    except ValueCheckError as exc:
        _reject("weights_out_of_bounds", str(exc))
    for name, a in (policy.expected_a or {}).items():
        if not np.array_equal(tensors[name].astype(np.float32), a.astype(np.float32)):
            _reject(
                "wrong_a",
                f"tensor {name!r} differs from the federation's shared A (seed {policy.a_seed})",
            )
    return tensors


def _check_tensor_specs(header: SafetensorsHeader, policy: AdmissionPolicy) -> None:
    got, want = set(header.tensors), set(policy.expected_tensors)
    if got != want:
        _reject(
            "wrong_tensors",
            f"missing tensors {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]} "
            f"({len(got)} present, {len(want)} expected)",
        )
    for name, (shape, dtype) in sorted(policy.expected_tensors.items()):
        info = header.tensors[name]
        if info.shape != shape or info.dtype != dtype:
            _reject(
                "wrong_tensors",
                f"tensor {name!r} is {info.dtype} {list(info.shape)}, expected {dtype} "
                f"{list(shape)}",
            )


def _check_stats(data: bytes, policy: AdmissionPolicy) -> NormStatistics:
    try:
        stats = NormStatistics.from_json_bytes(data)
    except FormatError as exc:
        _reject("bad_stats", str(exc))
    if stats.score != policy.stats_score:
        _reject(
            "bad_stats",
            f"statistics measure {stats.score!r} but this federation z-scores "
            f"{policy.stats_score!r} (calib_score); recalibrate with the federation's settings",
        )
    if tuple(sorted(stats.modules)) != policy.stats_modules:
        _reject(
            "bad_stats",
            f"statistics cover modules {sorted(stats.modules)[:5]}, expected "
            f"{list(policy.stats_modules)[:5]} ({len(stats.modules)} vs "
            f"{len(policy.stats_modules)})",
        )
    for module, moments in sorted(stats.modules.items()):
        if moments.n != 1:
            _reject("bad_stats", f"module {module!r} has {moments.n} series; one adapter has 1")
    try:  # the same pure check the registry's audit runs
        check_statistics(stats, policy.stats_bounds)
    except ValueCheckError as exc:
        _reject("bad_stats", str(exc))
    return stats


def _reject(reason: RejectionReason, message: str) -> NoReturn:
    raise AdmissionError(reason, message)
