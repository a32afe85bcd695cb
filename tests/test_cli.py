"""The `seqr` dispatcher: every registered command resolves, unknown ones fail clearly."""

import importlib

import pytest

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
