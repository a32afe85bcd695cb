"""Where a registry client reads from: a URL (HTTP or HTTPS) or a folder, through ngclient.

Both go through python-tuf's ``FetcherInterface``, so ngclient bounds every download by the
length the signed metadata gives (or UpdaterConfig's caps) and verifies it before use. The
folder fetcher reads through registry.store (no symlink at any depth, no FIFO, regular files
only) and streams, so an oversized file costs at most its cap. Every metadata file also goes
through seqr's strict JSON parser before python-tuf sees it (duplicate keys, NaN, deep
nesting: one parser decides what received JSON means).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tuf.api import exceptions
from tuf.ngclient import Urllib3Fetcher
from tuf.ngclient.fetcher import FetcherInterface

from seqr.core.errors import ConfigError, FormatError
from seqr.core.strict_json import loads_strict
from seqr.registry import layout, store

__all__ = ["Source", "source_for", "LocalFetcher"]

_CHUNK = 1 << 20
LOCAL_BASE = "http://registry.invalid/"  # URL prefix the folder fetcher maps onto its folder


class _StrictMetadata:
    """Mixin: metadata bytes must be strict JSON before ngclient parses them."""

    def download_bytes(self, url: str, max_length: int) -> bytes:
        data: bytes = super().download_bytes(url, max_length)  # type: ignore[misc]
        if f"/{layout.METADATA}/" in url:
            try:
                loads_strict(data, what=url.rsplit("/", 1)[-1], max_bytes=max_length)
            except FormatError as exc:
                raise exceptions.RepositoryError(str(exc)) from None
        return data


class LocalFetcher(_StrictMetadata, FetcherInterface):
    """Serves ``LOCAL_BASE + path`` from ``folder/path`` (a registry or a mirror of one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(LOCAL_BASE):
            raise exceptions.DownloadHTTPError(f"{url} is outside the registry", 404)
        rel = unquote(url[len(LOCAL_BASE) :])
        try:
            fd = store.open_regular(self.folder, rel, rel)
        except FormatError as exc:
            raise exceptions.DownloadError(str(exc)) from None
        if fd is None:
            raise exceptions.DownloadHTTPError(f"{rel} does not exist", 404)
        return self._chunks(fd)

    @staticmethod
    def _chunks(fd: int) -> Iterator[bytes]:
        try:
            while chunk := os.read(fd, _CHUNK):
                yield chunk  # the caller stops reading at the signed length (endless data)
        finally:
            os.close(fd)


class _HttpFetcher(_StrictMetadata, Urllib3Fetcher):
    """python-tuf's urllib3 fetcher (TLS with the system's certificates), strict metadata."""


@dataclass(frozen=True)
class Source:
    """A registry location: its base URL and the fetcher that reads it."""

    location: str  # as the user gave it (URL or folder)
    base_url: str  # ends with "/"
    fetcher: FetcherInterface
    folder: Path | None  # the folder, when the source is local

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url}{layout.METADATA}/"

    @property
    def targets_url(self) -> str:
        return f"{self.base_url}{layout.TARGETS}/"


def source_for(location: str | Path, *, timeout_s: int = 30) -> Source:
    """``http(s)://host/path`` (the folder that holds metadata/ and targets/) or a folder."""
    text = str(location)
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        base = text if text.endswith("/") else text + "/"
        return Source(
            text, base, _HttpFetcher(socket_timeout=timeout_s, app_user_agent="seqr"), None
        )
    if scheme and len(scheme) > 1:  # "c:" would be a drive letter, not a scheme
        raise ConfigError(f"registry {text!r}: only http://, https:// or a folder are supported")
    folder = Path(text)
    if not folder.is_dir() or folder.is_symlink():
        raise ConfigError(
            f"registry {text!r} is not a folder (or is a symlink); give the registry folder "
            "(holding metadata/ and targets/) or its http(s) URL"
        )
    return Source(text, LOCAL_BASE, LocalFetcher(folder), folder)
