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
