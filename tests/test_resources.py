"""Sizes checked before a job starts: sequence length against the model's positions, and peak-memory
estimates of scoring, evaluation and distillation, checked against measured peaks on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import _CORPUS, save_tiny, tiny_config

from engine.cli import main
from engine.errors import ResourceError
from engine.resources import (
    check_job_sizes,
    check_seq_len,
    estimate_peak,
    free_memory,
    max_positions,
    speed_test_peak,
)

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


# ---------------------------------------------------------------- sequence length


def test_max_positions_of_each_family():
    assert max_positions(tiny_config("llama")) == 256
    assert max_positions(tiny_config("gpt2")) == 256  # n_positions, through GPT-2's attribute map
    assert max_positions(tiny_config("llama", max_position_embeddings=8192)) == 8192


def test_seq_len_beyond_smollm2_positions_is_refused():
    """SmolLM2-135M's config (8192 positions); --seq-len 32768 is refused naming the maximum."""
    cfg = tiny_config("llama", max_position_embeddings=8192)
    check_seq_len(cfg, 8192)
    with pytest.raises(ResourceError) as e:
        check_seq_len(cfg, 32768)
    assert str(e.value) == ("--seq-len 32768 is longer than this model's maximum of 8192 positions; "
                            "use --seq-len 8192 or less")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("res") / "tiny")  # 256 positions


@pytest.mark.parametrize("command", ["score", "eval"])
def test_commands_refuse_seq_len_before_reading_data(command, tiny_folder, tmp_path, capsys):
    missing = tmp_path / "no-such-data.txt"  # the refusal must come before the data is read
    model = ["--model", str(tiny_folder)] if command == "score" else [str(tiny_folder)]
    assert main([command, *model, "--data", str(missing), "--seq-len", "32768"]) == 2
    err = capsys.readouterr().err
    assert "--seq-len 32768 is longer than this model's maximum of 256 positions; use --seq-len 256 or less" in err


def test_builtin_model_config_has_8192_positions():
    """The converted built-in SmolLM2-135M, when this machine has it (never converted here: slow)."""
    from engine.paths import cache_dir
    from engine.resources import model_config

    found = sorted((cache_dir() / "models").glob("SmolLM2-135M-Instruct-*/config.json"))
    if not found:
        pytest.skip("built-in model not converted on this machine (./bootstrap.sh setup)")
    cfg = model_config(str(found[-1].parent))
    assert max_positions(cfg) == 8192
    with pytest.raises(ResourceError, match="maximum of 8192 positions; use --seq-len 8192 or less"):
        check_seq_len(cfg, 32768)


# ---------------------------------------------------------------- estimates against measured peaks

# Runs one step in a fresh process and prints the growth of its peak resident memory. glibc is told
# to serve every allocation over 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors go back
# to the kernel at once and the peak RSS is the peak of live tensors, not of the allocator's caches.
# The high-water mark is reset after the set-up (/proc/self/clear_refs), so it is the step's alone.
MEASURE = r'''
import json, sys
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM
from engine.evaluate import evaluate_student, token_kl

spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = tiny_config("llama", **spec["config"])
make = lambda: AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=spec["attn"]).eval()
model = make()
teacher = make() if spec["teacher"] else None
B, T, kind = spec["batch"], spec["seq_len"], spec["kind"]
ids = torch.randint(3, cfg.vocab_size, (B, T))
with torch.no_grad():
    model(input_ids=ids[:1, :8], use_cache=False)  # warm-up: kernels and thread pools
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
def peak():  # VmHWM: the resident high-water mark since the last reset
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark: the imports' transient peaks are not the step's
base = rss()
assert peak() < base + 16 * 2**20, "the high-water mark was not reset"
if kind == "eval":
    evaluate_student(teacher, model, ids, batch_size=B)
elif kind == "score":
    from engine.importance import ScoreConfig
    from engine.importance.api import compute_scores
    compute_scores(model, ids, ScoreConfig(batch_size=B, depth_ppl=spec["depth_ppl"]))
else:  # two optimizer steps of the distillation loss (forward KL on logits), AdamW
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        loss = token_kl(t, model(input_ids=ids, use_cache=False).logits) / ids.numel()
        loss.backward()
        del t, loss
        opt.step()
        opt.zero_grad(set_to_none=True)
print(json.dumps({"peak": peak() - base}))
'''

WIDE = dict(vocab_size=512, hidden_size=384, head_dim=64, intermediate_size=1024, num_hidden_layers=4)  # layers
LARGE_VOCAB = dict(vocab_size=8192, hidden_size=96, head_dim=16, num_hidden_layers=2)  # logits dominate

CASES = {
    "score": dict(kind="score", config=WIDE),
    "score depth-ppl": dict(kind="score", config=WIDE, depth_ppl=True),
    "score eager attention": dict(kind="score", config=WIDE, attn="eager"),
    "eval": dict(kind="eval", config=WIDE),
    "eval + teacher, large vocab": dict(kind="eval", config=LARGE_VOCAB, teacher=True),
    "distill": dict(kind="distill", config=WIDE, teacher=True),
    "distill, large vocab": dict(kind="distill", config=LARGE_VOCAB, teacher=True),
}


def measured_peak(case: dict, batch: int = 8, seq_len: int = 256) -> int:
    spec = {"batch": batch, "seq_len": seq_len, "teacher": False, "depth_ppl": False, "attn": "sdpa", **case}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_matches_measured_peak(name):
    """The estimate (weights left out: they were loaded before the measurement) is within
    0.6x..1.25x of the measured peak. Below 1: inference frees a layer's temporaries sooner than the
    estimate assumes (measured 0.70-0.87 here), which only makes the check cautious. Above 1: the
    allocator's page rounding and kernel workspaces, a few percent (measured up to 1.02)."""
    case = CASES[name]
    cfg = tiny_config("llama", **case["config"])
    if case.get("attn") == "eager":
        cfg._attn_implementation = "eager"
    est = estimate_peak(cfg, kind=case["kind"], batch=8, seq_len=256, weights=False,
                        teacher_config=cfg if case.get("teacher") else None, depth_ppl=case.get("depth_ppl", False))
    peak = measured_peak(case)
    assert 0.6 <= peak / est.total <= 1.25, f"{name}: measured {peak / 1e6:.1f} MB, estimated {est.describe()}"


def test_estimate_grows_with_its_parts():
    cfg = tiny_config("llama", **LARGE_VOCAB)
    base = estimate_peak(cfg, kind="distill", batch=4, seq_len=128, teacher_config=cfg)
    assert estimate_peak(cfg, kind="distill", batch=8, seq_len=128, teacher_config=cfg).total > base.total
    assert base.at_batch(8) == pytest.approx(estimate_peak(cfg, kind="distill", batch=8, seq_len=128,
                                                           teacher_config=cfg).total)
    s = estimate_peak(cfg, kind="distill", batch=4, seq_len=128).parts
    assert {"weights", "gradients + AdamW", "activations", "logits"} <= set(s)
    assert s["gradients + AdamW"] == 3 * s["weights"]  # fp32 gradients and two AdamW moments
    assert "teacher weights" in base.parts
    logits = estimate_peak(cfg, kind="eval", batch=4, seq_len=128, weights=False).total
    assert logits >= 4 * 128 * cfg.vocab_size * 4  # at least the (B, T, V) fp32 logits


def test_parameter_count_matches_a_real_model():
    from tiny_models import tiny_model

    from engine.models import count_parameters
    from engine.resources import Shape

    for family in ("llama", "qwen2", "mistral", "gpt2"):
        real = count_parameters(tiny_model(family))
        assert abs(Shape.of(tiny_config(family)).params() - real) / real < 0.02, family


# ---------------------------------------------------------------- refusals


def test_distill_refusal_names_the_largest_batch_that_fits():
    cfg = tiny_config("llama", **LARGE_VOCAB)
    at = lambda b: estimate_peak(cfg, kind="distill", batch=b, seq_len=256, teacher_config=cfg).total  # noqa: E731
    free = (at(5) + at(6)) / 2
    assert check_job_sizes(cfg, kind="distill", batch=5, seq_len=256, teacher_config=cfg, free=free) == 5
    with pytest.raises(ResourceError) as e:
        check_job_sizes(cfg, kind="distill", batch=16, seq_len=256, teacher_config=cfg, free=free)
    msg = str(e.value)
    assert msg.startswith("distillation of 16 x 256 tokens needs about") and "\n" not in msg
    assert msg.endswith("; --batch 5 would fit (raise --grad-accum to keep the global batch)"), msg


def test_refusal_names_a_seq_len_when_no_batch_fits():
    cfg = tiny_config("llama", **LARGE_VOCAB)
    free = estimate_peak(cfg, kind="distill", batch=1, seq_len=100).total
    with pytest.raises(ResourceError) as e:
        check_job_sizes(cfg, kind="distill", batch=2, seq_len=256, free=free)
    hint = str(e.value).rsplit("; ", 1)[1]
    T = int(hint.split("--seq-len ")[1].split()[0])
    assert hint == f"--batch 1 --seq-len {T} would fit" and 100 <= T < 256
    assert estimate_peak(cfg, kind="distill", batch=1, seq_len=T).total <= free
    assert estimate_peak(cfg, kind="distill", batch=1, seq_len=T + 1).total > free
    with pytest.raises(ResourceError, match="not even one short sequence fits"):
        check_job_sizes(cfg, kind="distill", batch=1, seq_len=256, free=1000)


def test_eval_batch_is_reduced_and_results_stay_the_same():
    from tiny_models import random_ids, tiny_model

    from engine.evaluate import evaluate_student

    cfg = tiny_config("llama")
    est = estimate_peak(cfg, kind="eval", batch=8, seq_len=64, teacher_config=cfg)
    free = est.at_batch(3) + 1
    assert check_job_sizes(cfg, kind="eval", batch=8, seq_len=64, teacher_config=cfg, free=free,
                           adjust_batch=True) == 3
    with pytest.raises(ResourceError, match="--batch 3 would fit"):
        check_job_sizes(cfg, kind="eval", batch=8, seq_len=64, teacher_config=cfg, free=free)
    student, teacher, blocks = tiny_model("llama", seed=1), tiny_model("llama"), random_ids(8, 64)
    a = evaluate_student(teacher, student, blocks, batch_size=8)
    b = evaluate_student(teacher, student, blocks, batch_size=3)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-4)


def test_speed_test_refusal():
    from engine.resources import check_speed_test

    cfg = tiny_config("llama")
    free = speed_test_peak(cfg, batch=4, prompt_len=128, new_tokens=32).total
    check_speed_test(cfg, [1, 4], prompt_len=128, new_tokens=32, free=free)
    with pytest.raises(ResourceError, match="--batch-sizes up to 4 would fit"):
        check_speed_test(cfg, [1, 16], prompt_len=128, new_tokens=32, free=free)


def test_eval_command_shrinks_its_batch_when_memory_is_short(tiny_folder, tmp_path, monkeypatch, caplog):
    import engine.resources as res

    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 3}" for i in range(10)))
    cfg = res.model_config(str(tiny_folder))
    est = estimate_peak(cfg, kind="eval", batch=8, seq_len=32)
    monkeypatch.setattr(res, "free_memory", lambda device: int(est.at_batch(2) + 1))
    out = tmp_path / "r.json"
    argv = ["eval", str(tiny_folder), "--data", str(data), "--data-range", "0:1", "--samples", "8",
            "--seq-len", "32", "--batch-sizes", "none", "--dtype", "fp32", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "using --batch-size 2" in caplog.text
    monkeypatch.undo()
    assert main([*argv, "--json", str(tmp_path / "full.json")]) == 0
    assert json.loads(out.read_text())["model"]["ppl"] == pytest.approx(
        json.loads((tmp_path / "full.json").read_text())["model"]["ppl"], rel=1e-5)


def test_free_memory_on_cpu():
    free = free_memory("cpu")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert free == int(meminfo["MemAvailable"].split()[0]) * 1024 or abs(free - int(
        meminfo["MemAvailable"].split()[0]) * 1024) < 0.1 * free
    if torch.cuda.is_available():
        assert 0 < free_memory("cuda") <= torch.cuda.get_device_properties(0).total_memory
