"""engine.evaluate's model report and `prunescope eval`, on tiny models."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from tiny_models import random_ids, tiny_model

from engine.cli import main
from engine.evaluate import (
    evaluate_model,
    evaluate_student,
    format_table,
    perplexity,
    summary_row,
    teacher_logits,
)
from engine.models import count_parameters
from engine.speed import size_on_disk


def test_evaluate_model_reports_quality_size_and_speed(tmp_path):
    t, s = tiny_model("qwen2", 0), tiny_model("qwen2", 1)
    blocks = random_ids(4, 16)
    s.save_pretrained(tmp_path)
    r = evaluate_model(s, blocks, teacher=t, batch_sizes=(1, 2), prompt_len=8, new_tokens=3, folder=tmp_path,
                       repeats=1, batch_size=3)
    assert r["params"] == count_parameters(s)
    assert r["ppl"] == pytest.approx(perplexity(s, blocks), rel=1e-5)
    assert r["kl"] == pytest.approx(evaluate_student(t, s, blocks)["kl"], rel=1e-5) and r["kl"] > 0
    assert r["size_on_disk"] == size_on_disk(tmp_path) > 0 and r["eval_tokens"] == 64
    assert [tp["batch_size"] for tp in r["throughput"]] == [1, 2]
    assert all(tp["prefill_tokens_per_s"] > 0 and tp["decode_tokens_per_s"] > 0 for tp in r["throughput"])
    json.dumps(r)  # JSON-serialisable as is
    bare = evaluate_model(s, None, batch_sizes=())
    assert bare["ppl"] is None and bare["kl"] is None and bare["throughput"] == [] and bare["size_on_disk"] is None
    with pytest.raises(ValueError, match="batch sizes"):
        evaluate_model(s, blocks, batch_sizes=(0,))


def test_precomputed_teacher_logits_match_the_teacher():
    t, s = tiny_model("gpt2", 0), tiny_model("gpt2", 1)
    blocks = random_ids(5, 12)
    logits = teacher_logits(t, blocks, batch_size=2)
    assert logits.shape == (5, 12, t.config.vocab_size)
    live, cached = evaluate_student(t, s, blocks, batch_size=3), evaluate_student(logits, s, blocks, batch_size=3)
    assert cached["kl"] == pytest.approx(live["kl"], rel=1e-5) and cached["ppl"] == pytest.approx(live["ppl"])
    assert evaluate_student(logits, t, blocks)["kl"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="teacher logits"):
        evaluate_student(logits[:3], s, blocks)


def test_format_table():
    rows = [{"model": "a", "params": 1234567, "ppl": 12.3456789, "kl": None},
            {"model": "bb", "params": 10, "ppl": float("nan"), "extra": "x"}]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "model" and "extra" in lines[0]
    assert "1,234,567" in lines[2] and "12.35" in lines[2] and "-" in lines[2].split("|")[4]
    assert lines[1].startswith("|-------|") and "|----------:|" in lines[1]  # numbers right-aligned
    assert len({len(line) for line in lines}) == 1
    assert format_table(rows, ["model"]).splitlines()[2] == "| a     |"
    row = summary_row("m", {"params": 5, "ppl": 2.0, "kl": None, "size_on_disk": 2e6,
                            "throughput": [{"batch_size": 16, "prefill_tokens_per_s": 3.0, "decode_tokens_per_s": 1.0}]})
    assert row == {"model": "m", "params": 5, "ppl": 2.0, "kl": None, "size_MB": 2.0, "prefill_b16": 3.0,
                   "decode_b16": 1.0}


def test_cli_eval_prints_a_table_and_writes_json(tiny_llama_pair, corpus, tmp_path, capsys):
    teacher, student = tiny_llama_pair
    out = tmp_path / "res" / "eval.json"
    assert main(["eval", str(student), "--teacher", str(teacher), "--data", str(corpus), "--samples", "3",
                 "--seq-len", "16", "--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "2",
                 "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| model" in text and "prefill_b2" in text and "(teacher)" in text and "% of the teacher" in text
    data = json.loads(out.read_text())
    assert data["samples"] == 3 and "[docs 0.6-1]" in data["data"]
    m, t = data["model"], data["teacher"]
    assert m["kl"] > 0 and t["kl"] is None and math.isfinite(m["ppl"]) and m["size_on_disk"] > 0
    assert [tp["batch_size"] for tp in m["throughput"]] == [1, 2]
    # without a teacher and without speed
    assert main(["eval", str(student), "--data", str(corpus), "--samples", "2", "--seq-len", "16",
                 "--batch-sizes", "none"]) == 0
    text = capsys.readouterr().out
    assert "prefill" not in text and "ppl" in text


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated"),
    (["--data-range", "0.8:0.2"], "--data-range needs 0 <= START < END <= 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--samples", "5000"], "enough for"),
])
def test_cli_eval_bad_input_is_one_clear_line(tiny_llama_pair, corpus, capsys, args, message):
    _, student = tiny_llama_pair
    assert main(["eval", str(student), "--data", str(corpus), "--seq-len", "16", "--batch-sizes", "none",
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("prunescope eval: error:")


def test_cli_eval_rejects_a_teacher_with_another_vocabulary(tiny_llama_pair, corpus, tmp_path, capsys):
    _, student = tiny_llama_pair
    other = tmp_path / "other"
    tiny_model("llama", 0, vocab_size=320).save_pretrained(other)
    for f in student.glob("*token*"):
        shutil.copy(f, other)
    assert main(["eval", str(student), "--teacher", str(other), "--data", str(corpus), "--batch-sizes", "none"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(corpus, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--data", str(corpus)]) == 2
    assert "cannot find model" in capsys.readouterr().err
