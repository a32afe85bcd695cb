"""One exception tree for seqr (python-tuf style: one family per trust boundary).

Every message names what was wrong and what to do about it, and states both values
where a value was compared ("r of A is 8 but B[3] has r = 16").
"""

from typing import Literal, get_args


class SeqrError(Exception):
    """Base of every error seqr raises on purpose."""


class ShapeError(SeqrError, ValueError):
    """Tensors whose shapes do not fit together (r, d_in, d_out, N, k)."""


class ValueCheckError(SeqrError, ValueError):
    """Values that are not usable: NaN/inf, a non-positive std, an empty set."""


class ConfigError(SeqrError, ValueError):
    """A configuration with an unknown key or an out-of-range value."""


class DataError(SeqrError, ValueError):
    """Training or calibration data that cannot be used (empty, unreadable, not UTF-8)."""


class ModelError(SeqrError):
    """A base model that is missing or does not match the federation's hash."""


class KeyFileError(SeqrError):
    """A signing key that is missing, malformed, of the wrong type, too open or locked."""


class SignatureError(SeqrError):
    """A signature that does not verify over the exact bytes it claims to cover."""


class FormatError(SeqrError, ValueError):
    """Malformed bytes: a manifest, a statistics file, registry metadata or safetensors."""


# Every reason a submission or a group update can be refused for: the short machine-readable
# cause a verdict carries (the node and the operator also get a message with the numbers).
RejectionReason = Literal[
    "aggregation_failed", "bad_client_key", "bad_config", "bad_manifest", "bad_signature",
    "bad_stats", "bad_update", "duplicate", "duplicate_adapter", "future", "hash_mismatch",
    "implausible_stats", "key_mismatch", "malformed_safetensors", "no_statistics", "non_finite",
    "not_server_key", "pickle_payload", "replay", "revoked_client", "revoked_key", "stale",
    "too_large", "too_many_examples", "unknown_client", "unknown_key", "unsigned_contribution",
    "update_too_large", "weights_out_of_bounds", "wrong_a", "wrong_base_model", "wrong_config",
    "wrong_contribution", "wrong_files", "wrong_tensors",
]  # fmt: skip
REJECTION_REASONS: frozenset[str] = frozenset(get_args(RejectionReason))


class AdmissionError(SeqrError):
    """A submission the server refuses; ``reason`` is the short machine-readable cause."""

    def __init__(self, reason: RejectionReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class RegistryError(SeqrError):
    """A registry that fails its audit (signatures, versions, expiry, log, files)."""


class RollbackError(RegistryError):
    """A registry version older than the one already trusted."""


class FreezeError(RegistryError):
    """Registry metadata past its expiry."""


class ForkError(RegistryError):
    """A transparency log that is not an extension of the trusted one (split view)."""
