"""The `xlstm7b` command's own parts: the subcommand table, help, errors and `info`."""

import subprocess
import sys

from xlstm7b.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    assert main([]) == 2


def test_unknown_command_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_info_builds_and_runs_a_preset(capsys):
    assert main(["info", "debug", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "parameters      173,000" in out and "forward         16 tokens" in out


def test_info_on_the_7b_preset_reports_size_without_building_it(capsys):
    assert main(["info", "7b", "--seq-len", "0"]) == 0
    out = capsys.readouterr().out
    assert "6,865,424,896" in out and "128.25 MiB per sequence" in out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "xlstm7b", "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: xlstm7b COMMAND" in out
