"""The round-trip check every export ends with (engine.roundtrip), on tiny pruned models."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import fake_scores, tiny_model, tiny_tokenizer

from engine.arch import get_adapter
from engine.errors import CheckpointError
from engine.export import MARKER, export_model
from engine.models import count_parameters
from engine.plan import make_plan
from engine.presets import preset_targets
from engine.prune import apply_plan
from engine.roundtrip import RESULT_FILE, read_result, replace_section, verify_export


def _pruned(family: str, preset: str = "all-60"):
    model = tiny_model(family)
    plan = make_plan(fake_scores(model), preset_targets(get_adapter(model).spec(), preset))
    return apply_plan(model, plan), plan


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # tied / untied embeddings
def test_export_ends_with_a_passed_check(family, tmp_path):
    pruned, plan = _pruned(family)
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan)
    r = read_result(out)
    assert r is not None and r["passed"], r
    assert r["max_abs_diff"] <= r["tolerance_abs"] and r["tolerance"] == 1e-4 and r["dtype"] == "float32"
    assert r["positions"] == 32 and r["device"] == "cpu"
    assert r["params"] == r["expected_params"] == count_parameters(pruned)
    assert len(r["tokens"]) == 4 and r["tokens_match"] and r["tokens"] == r["reference_tokens"]
    assert isinstance(r["prompt_completion"], str)
    card = (out / "README.md").read_text()
    assert "## Round-trip check" in card and "**passed**" in card and f"{r['params']:,}" in card
    assert card.index("## Usage") < card.index("## Round-trip check")


def test_a_changed_model_fails_the_check_and_says_why(tmp_path):
    pruned, plan = _pruned("llama")
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan)
    with torch.no_grad():
        get_adapter(pruned).lm_head.weight.mul_(1.5)  # the in-memory model no longer matches the files
    with pytest.raises(CheckpointError, match="failed its round-trip check: logits differ by"):
        verify_export(out, pruned)
    r = read_result(out)
    assert r["passed"] is False and r["reason"].startswith("logits differ by")
    card = (out / "README.md").read_text()
    assert card.count("## Round-trip check") == 1 and "**FAILED** (logits differ by" in card


def test_wrong_parameter_count_fails(tmp_path):
    pruned, plan = _pruned("mistral", "mlp-60")
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan)
    n = count_parameters(pruned)
    r = verify_export(out, pruned, expected_params=n + 1, raise_on_failure=False)
    assert not r["passed"] and r["reason"] == f"{n:,} parameters reloaded, {n + 1:,} expected"


def test_a_folder_that_does_not_load_fails(tmp_path):
    pruned, plan = _pruned("qwen2")
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan, verify=False)
    assert not (out / RESULT_FILE).exists()
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_size"] += 4  # shapes in the weights no longer match the config
    (out / "config.json").write_text(json.dumps(cfg))
    r = verify_export(out, pruned, raise_on_failure=False)
    assert not r["passed"] and r["reason"], r
    assert json.loads((out / RESULT_FILE).read_text())["passed"] is False


def test_unverified_reexport_drops_a_stale_result(tmp_path):
    a, plan_a = _pruned("llama", "mlp-60")
    b, plan_b = _pruned("llama", "depth-60")
    out = export_model(a, tiny_tokenizer(), tmp_path / "m", plan=plan_a)
    assert (out / RESULT_FILE).is_file()
    export_model(b, tiny_tokenizer(), out, plan=plan_b, force=True, verify=False)
    assert not (out / RESULT_FILE).exists() and (out / MARKER).is_file()


def test_replace_section():
    text = "# Card\n\n## A\n\nx\n\n## B\n\ny\n"
    assert replace_section(text, "## A", "## A\n\nz\n") == "# Card\n\n## B\n\ny\n\n## A\n\nz\n"
    assert replace_section(text, "## C", "## C\n\nw\n").endswith("y\n\n## C\n\nw\n")


def test_dashboard_badge_reads_the_recorded_result(tmp_path):
    from dashboard.badges import ROUNDTRIP_FILE, roundtrip_summary

    assert ROUNDTRIP_FILE == RESULT_FILE
    pruned, plan = _pruned("llama", "mlp-60")
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan)
    label, colour, detail = roundtrip_summary(read_result(out))
    assert (label, colour) == ("Round trip passed", "green") and f"{count_parameters(pruned):,} parameters" in detail
    failed = roundtrip_summary({"passed": False, "reason": "logits differ by 3 (tolerance 0.001)"})
    assert failed[:2] == ("Round trip failed", "red") and "logits differ by 3" in failed[2]
    assert roundtrip_summary(None) is None


def test_bf16_export_is_checked_in_bf16(tmp_path):
    pruned, plan = _pruned("llama", "mlp-60")
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan, dtype=torch.bfloat16)
    r = read_result(out)
    assert r["passed"] and r["dtype"] == "bfloat16" and r["tolerance"] == 2e-2, r
