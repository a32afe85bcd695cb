"""The `seqr` dispatcher: every registered command resolves, unknown ones fail clearly."""

import argparse
import importlib

import pytest

from seqr.cli.help import shows_default
from seqr.cli.main import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_registered_command_points_at_a_callable(name):
    module, func = COMMANDS[name][0].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_help_lists_commands_and_unknown_command_exits_2(capsys):
    assert main(["--help"]) == 0
    assert "bench routing" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "usage: seqr" in capsys.readouterr().err


def test_version_group_help_and_unknown_commands_named(capsys):
    from seqr import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"seqr {__version__}"
    assert main(["registry", "--help"]) == 0
    out = capsys.readouterr().out
    assert "seqr registry audit" in out and "seqr bench routing" not in out
    assert main(["registry"]) == 2
    assert "seqr registry pull" in capsys.readouterr().err
    assert main(["registry", "nope"]) == 2
    assert "unknown command 'registry nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_that_exits_0(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*name.split(), "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


class _Parsed(Exception):
    """Raised in place of parsing: carries the command's parser out of its main()."""


def _parser_of(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a registered command builds, caught when it starts parsing (nothing runs)."""

    def catch(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(_Parsed) as caught:
        main(name.split())
    monkeypatch.undo()
    return caught.value.args[0]


def test_every_option_of_every_command_has_help_showing_its_default(monkeypatch):
    """Issue 15: one coherent CLI. Every option says what it does, and one that takes a value
    with a default other than None says that default (seqr.cli.help's formatters)."""
    missing, hidden_default = [], []
    for name in sorted(COMMANDS):
        parser = _parser_of(name, monkeypatch)
        formatter = parser._get_formatter()
        for action in parser._actions:
            label = f"seqr {name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(label)
            elif shows_default(action) and action.help is not argparse.SUPPRESS:
                shown = formatter._get_help_string(action) or ""
                if "%(default)" not in shown:
                    hidden_default.append(label)
    assert missing == [], f"options without help: {missing}"
    assert hidden_default == [], f"options whose help hides the default: {hidden_default}"


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """`seqr registry --help | head -1`: the pipe closes before seqr writes; that is no error
    worth a traceback (the write fails with EPIPE: BrokenPipeError)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write to the pipe fails
    try:
        done = subprocess.run(
            [sys.executable, "-m", "seqr.cli.main", "registry", "--help"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert done.returncode == 1
