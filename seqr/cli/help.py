"""How every ``seqr`` command shows its options: help text that ends with the default.

Every command's parser uses one of these formatters (``formatter_class=``), so ``--help``
reads alike across commands: each option that takes a value and has a default shows it as
``(default: ...)``; an option whose default is None (the behaviour without it is told in its
help) and an on/off flag show none. Shared option texts live here too, so one flag keeps one
meaning across commands (tests/test_cli.py walks every command's parser and checks both).
"""

from __future__ import annotations

import argparse

from seqr.core.federation import DEFAULT_BASE_MODEL

__all__ = [
    "DefaultsHelpFormatter",
    "RawDefaultsHelpFormatter",
    "shows_default",
    "add_old_spelling",
    "BASE_MODEL_HELP",
    "DEFAULT_BASE_MODEL_HELP",
    "CONSUMER_BASE_MODEL_HELP",
    "CACHE_DIR_HELP",
    "EXPECT_ROOT_HELP",
]

BASE_MODEL_HELP = "known model name or local model folder"
# For a --base-model whose default is None: the built-in one is used.
DEFAULT_BASE_MODEL_HELP = f"{BASE_MODEL_HELP} (default: {DEFAULT_BASE_MODEL})"
# A consumer's base model: the adapters' signed base model hash is checked against it.
CONSUMER_BASE_MODEL_HELP = (
    BASE_MODEL_HELP + "; its hash must be the one the adapters were trained on"
)
CACHE_DIR_HELP = (
    "folder where known base models are converted once "
    "(default: $SEQR_CACHE_DIR or ~/.cache/seqr/models)"
)
EXPECT_ROOT_HELP = (
    "first use only: SHA-256 of metadata/1.root.json, obtained from the operator "
    "(default: trust on first use, as the report says)"
)


def shows_default(action: argparse.Action) -> bool:
    """Whether ``action``'s help must show its default: an option that takes a value and has
    a default other than None (flags, positionals and suppressed defaults show none)."""
    return (
        bool(action.option_strings)
        and action.nargs != 0
        and action.default is not None
        and action.default is not argparse.SUPPRESS
    )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, less the ``(default: None)`` noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if shows_default(action) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class RawDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The same, keeping the description's line breaks (a module docstring as description)."""


def add_old_spelling(parser: argparse.ArgumentParser, old: str, dest: str) -> None:
    """Accept ``old``, a former spelling of an option, without listing it in ``--help``."""
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
