"""Checkpoints: safetensors + JSON, never unpickled; verified on load with a fallback to the newest
valid one; a resumed distillation skips a damaged newest checkpoint and still repeats the run."""

from __future__ import annotations

import logging
import pickle
import random

import pytest
import torch
from tiny_models import random_ids, tiny_model

from engine.checkpoint import (
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    load_latest_valid,
    save_checkpoint,
    tensor_file,
)
from engine.distill import DistillConfig, distill
from engine.errors import CheckpointError
from engine.runs import read_jsonl


def _state(step: int) -> dict:
    m = torch.nn.Linear(3, 5)
    opt = torch.optim.AdamW(m.parameters(), betas=(0.9, 0.95))
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {"step": step, "model": m.state_dict(), "optimizer": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "first_eval": None}


def test_round_trip_keeps_every_value_and_type(tmp_path):
    st = _state(3)
    save_checkpoint(tmp_path, 3, st)
    got = load_checkpoint(tmp_path / "step-000003.json")
    assert got["step"] == 3 and got["first_eval"] is None
    for k, v in st["model"].items():
        assert torch.equal(got["model"][k], v)
    assert list(got["optimizer"]["state"]) == [0, 1]  # integer keys survive JSON
    assert got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples too
    assert got["rng"]["python"] == st["rng"]["python"]
    random.setstate(got["rng"]["python"])  # the restored states are usable as such
    torch.set_rng_state(got["rng"]["torch"])


def test_atomic_and_pruned(tmp_path):
    for s in (2, 4, 6):
        save_checkpoint(tmp_path, s, {"step": s, "w": torch.ones(s)}, keep=2)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-000004.json", "step-000006.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000004.json", "step-000004.safetensors", "step-000006.json", "step-000006.safetensors"]
    (tmp_path / ".tmp-step-000008.safetensors.x").write_bytes(b"half")  # a killed writer's temp file
    assert latest_checkpoint(tmp_path).name == "step-000006.json"


def test_a_pickle_is_never_loaded(tmp_path):
    """A crafted pickle whose __reduce__ would create a file: no checkpoint reader opens it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "step-000009.pt").write_bytes(pickle.dumps({"step": 9, "x": Evil()}))
    (ckpt / "step-000009.json").write_text('{"format": 1, "step": 9}')  # an old-format sidecar
    assert load_latest_valid(ckpt) is None
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(ckpt / "step-000009.json")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garble", "drop_tensors", "bad_json"])
def test_newest_damaged_falls_back_to_older(tmp_path, caplog, damage):
    save_checkpoint(tmp_path, 1, _state(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, _state(2), keep=3)
    tf = tensor_file(newest)
    if damage == "truncate":
        tf.write_bytes(tf.read_bytes()[:100])
    elif damage == "garble":
        data = bytearray(tf.read_bytes())
        data[-5] ^= 0xFF
        tf.write_bytes(bytes(data))
    elif damage == "drop_tensors":
        tf.unlink()
    else:
        newest.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        path, state = load_latest_valid(tmp_path)
    assert path.name == "step-000001.json" and state["step"] == 1
    assert "skipping checkpoint step-000002.json" in caplog.text


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
    """A run stopped at step 5 (checkpoints 4 and 5); the newest is truncated: resume starts from 4,
    says so, and the rows still equal an uninterrupted run."""
    train, held = random_ids(48, 32, seed=0), random_ids(8, 32, seed=1)
    cfg = DistillConfig(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4,
                        checkpoint_every=4, eval_samples=4, dtype="fp32")
    distill(tiny_model("llama", 0), tiny_model("llama", 1), train, held, cfg, tmp_path / "a")
    calls = iter(range(1, 100))
    distill(tiny_model("llama", 0), tiny_model("llama", 1), train, held, cfg, tmp_path / "b",
            should_stop=lambda: next(calls) >= 5)
    ck = checkpoint_files(tmp_path / "b" / "checkpoints")
    assert [p.name for p in ck] == ["step-000004.json", "step-000005.json"]
    tensor_file(ck[-1]).write_bytes(b"\0" * 64)
    with caplog.at_level(logging.INFO):
        out = distill(tiny_model("llama", 0), tiny_model("llama", 1), train, held, cfg, tmp_path / "b")
    assert "skipping checkpoint step-000005.json" in caplog.text and "resumed from step-000004.json" in caplog.text
    assert out["steps"] == 8
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "ppl", "kl"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5), (x["step"], k)
