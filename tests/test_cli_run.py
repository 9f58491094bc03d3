"""`prunescope run` maps every target flag into the pipeline config, and the dashboard's
"reproduce this run" command parses back into the same config."""

from __future__ import annotations

import shlex

import pytest

import engine.commands.run as run_cmd
from engine.cli import main


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_launch(args, cfg):  # capture the config instead of starting the job
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(run_cmd, "launch", fake_launch)
    return seen


def _run(argv):
    assert main(argv) == 0


def test_drop_layers_and_merge_heads_reach_the_config(captured, tmp_path):
    _run(["run", "--model", "m", "--data", "d.txt", "--heads", "6", "--drop-layers", "3,1",
          "--merge-heads", "--run-dir", str(tmp_path / "r")])
    t = captured["cfg"].targets
    assert t["drop_layers"] == [1, 3] and t["depth_by"] == "list" and t["merge_heads"] is True
    assert t["heads"] == 6


def test_bad_drop_layers_is_a_clear_error(captured, tmp_path, capsys):
    assert main(["run", "--data", "d.txt", "--drop-layers", "a,b", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--drop-layers takes comma-separated layer numbers" in capsys.readouterr().err


def test_reproduce_command_round_trips(captured, tmp_path):
    from dashboard.runs_io import cli_command

    _run(["run", "--model", "m", "--data", "d.txt", "--ffn", "20", "--drop-layers", "2", "--merge-heads",
          "--steps", "7", "--run-dir", str(tmp_path / "r")])
    first = captured["cfg"]
    cmd = cli_command(first.to_dict(), tmp_path / "r").replace("\\\n", " ")
    argv = shlex.split(cmd)[1:]
    _run(argv)
    again = captured["cfg"]
    assert again.targets == first.targets
    assert again.distill.steps == 7
