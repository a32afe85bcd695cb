"""python-tuf's exceptions as seqr's RegistryError family, each naming the attack it stops.

The client (client.py) maps every failure of ngclient's refresh and downloads through
``registry_error`` so that a user sees "rollback", "freeze attack" or "endless data" (TUF
spec 5.3-5.6) rather than a library's class name, and a network failure names its cause.
"""

from __future__ import annotations

import re

from tuf.api import exceptions

from seqr.core.errors import FreezeError, RegistryError, RollbackError, SeqrError

__all__ = ["registry_error"]


def registry_error(exc: Exception, what: str = "") -> RegistryError:
    """A TUF failure as the RegistryError that names the attack it stops."""
    where = f"{what}: " if what else ""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return FreezeError(
            f"{where}{exc}: the registry's signed metadata has expired; the mirror serves a "
            "stale registry (freeze attack) or the operator has not refreshed it "
            "(`seqr server refresh`)"
        )
    if isinstance(exc, exceptions.BadVersionNumberError):
        return RollbackError(f"{where}{exc}: older than what this client trusts (rollback)")
    if isinstance(exc, exceptions.UnsignedMetadataError):
        return RegistryError(f"{where}{exc} (wrong keys, or fewer than the threshold)")
    if isinstance(exc, exceptions.LengthOrHashMismatchError):
        return RegistryError(f"{where}{exc}: a file differs from what the metadata signed "
                             "(tampering or mix-and-match)")  # fmt: skip
    if isinstance(exc, exceptions.DownloadLengthMismatchError):
        return RegistryError(f"{where}{exc} (endless data)")
    if isinstance(exc, exceptions.DownloadHTTPError):
        return RegistryError(f"{where}the registry answered HTTP {exc.status_code}: {exc}")
    if isinstance(exc, exceptions.DownloadError):
        cause = str(exc.__cause__ or exc.__context__ or exc)
        errno_text = re.findall(r"\[Errno -?\d+\] [^'\")]+", cause)  # urllib3 nests its reason
        reason = errno_text[-1] if errno_text else cause[:300]
        return RegistryError(f"{where}cannot fetch it ({reason}); check the URL and the network")
    if isinstance(exc, exceptions.RepositoryError | ValueError | SeqrError):
        return RegistryError(f"{where}{exc}")
    if isinstance(exc, OSError):
        return RegistryError(f"{where}{exc.strerror or exc}")
    return RegistryError(f"{where}{exc}")
