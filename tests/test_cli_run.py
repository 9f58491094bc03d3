"""`prunescope run` maps every target flag into the pipeline config (validated against the model
before a job exists), and the dashboard's "reproduce this run" command parses back into the same
config."""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import save_tiny

    return str(save_tiny("llama", tmp_path_factory.mktemp("m") / "llama"))  # 4 layers, 6 query / 2 KV heads


def _run(argv):
    assert main(argv) == 0


def test_drop_layers_and_merge_heads_reach_the_config(captured, tmp_path, model_dir):
    _run(["run", "--model", model_dir, "--data", "d.txt", "--heads", "4", "--drop-layers", "3,1",
          "--merge-heads", "--run-dir", str(tmp_path / "r")])
    t = captured["cfg"].targets
    assert t.drop_layers == (1, 3) and t.depth_by == "list" and t.merge_heads is True
    assert t.heads == 4


@pytest.mark.parametrize("args, message", [
    (["--depth-by", "blocks", "--layers", "3"], "invalid choice: 'blocks'"),
    (["--heads", "5"], "multiple of"),
    (["--layers", "9"], "layers"),
])
def test_bad_targets_fail_before_a_job_exists(captured, tmp_path, model_dir, capsys, args, message):
    """Targets are checked against the model's architecture in the CLI, not in the detached worker."""
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_raise():
        assert main(["run", "--model", model_dir, "--data", "d.txt", *args, "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert "cfg" not in captured and not (tmp_path / "r").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_drop_layers_is_a_clear_error(captured, tmp_path, capsys, model_dir):
    assert main(["run", "--model", model_dir, "--data", "d.txt", "--drop-layers", "a,b",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "--drop-layers takes comma-separated layer indices" in capsys.readouterr().err


def test_reproduce_command_round_trips(captured, tmp_path, model_dir):
    from dashboard.runs_io import cli_command

    _run(["run", "--model", model_dir, "--data", "d.txt", "--ffn", "20", "--drop-layers", "2", "--merge-heads",
          "--refit", "--criterion", "activation", "--steps", "7", "--run-dir", str(tmp_path / "r")])
    first = captured["cfg"]
    assert first.targets.refit and first.targets.criterion == "activation"
    cmd = cli_command(first.to_dict(), tmp_path / "r").replace("\\\n", " ")
    argv = shlex.split(cmd)[1:]
    _run(argv)
    again = captured["cfg"]
    assert again.targets == first.targets
    assert again.distill.steps == 7


def test_refused_job_leaves_no_run_folder(tmp_path, model_dir, monkeypatch, capsys):
    """--if-busy refuse with the device held by another job: one line naming the holder, no folder."""
    from engine.device_lock import DeviceLock

    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    holder = DeviceLock("cpu")
    assert holder.try_acquire(tmp_path / "other-run")
    try:
        assert main(["run", "--model", model_dir, "--data", "d.txt", "--ffn", "16", "--device", "cpu",
                     "--run-dir", str(tmp_path / "r"), "--detach", "--if-busy", "refuse"]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert "device cpu is busy with run" in err and str((tmp_path / "other-run").resolve()) in err
    assert not (tmp_path / "r").exists()


def test_sizes_are_checked_before_a_job_exists(tmp_path, model_dir, capsys):
    """A sequence beyond the model's positions, or a distillation step far beyond the memory, is one line
    naming what would fit, and no run folder is made."""
    from engine.resources import model_config

    limit = model_config(model_dir).max_position_embeddings
    assert main(["run", "--model", model_dir, "--data", "d.txt", "--ffn", "16", "--seq-len", str(limit * 4),
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert f"maximum of {limit} positions" in capsys.readouterr().err
    assert main(["run", "--model", model_dir, "--data", "d.txt", "--ffn", "16", "--batch", "100000000",
                 "--seq-len", str(limit), "--run-dir", str(tmp_path / "r")]) == 2
    assert "--batch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
