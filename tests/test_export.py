"""Export (reload with plain transformers, model card, overwrite rules) and `prunescope prune`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, fake_scores, random_ids, save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.arch import get_adapter
from engine.cli import main
from engine.export import export_model
from engine.models import count_parameters, fingerprint, load
from engine.plan import Plan, make_plan
from engine.presets import preset_targets
from engine.prune import apply_plan


def _pruned(family: str, seed: int = 0, preset: str = "all-60"):
    model = tiny_model(family, seed)
    sc = fake_scores(model)
    plan = make_plan(sc, preset_targets(get_adapter(model).spec(), preset))
    return model, apply_plan(model, plan), plan, sc


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_with_plain_transformers(family, tmp_path):
    model, pruned, plan, sc = _pruned(family)
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan, scores_meta=sc.meta,
                       source_name="tiny-" + family)
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32).eval()
    assert type(back) is type(pruned)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pruned(ids).logits, atol=0, rtol=0)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert tok("The quick brown fox")["input_ids"]
    gen = back.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert gen.shape == (1, 9)
    cfg = json.loads((out / "config.json").read_text())
    s = get_adapter(back).spec()
    assert s == get_adapter(pruned).spec() and count_parameters(back) < count_parameters(model)
    assert cfg["model_type"] == family and (out / "model.safetensors").is_file()
    assert (out / "generation_config.json").is_file()
    assert Plan.load(out / "prunescope_plan.json") == plan
    card = (out / "README.md").read_text()
    n, n0 = count_parameters(pruned), count_parameters(model)
    assert f"tiny-{family}" in card and f"{n:,}" in card and f"{n0:,}" in card
    assert f"{100 * n / n0:.1f}% of the source" in card and "data: test" in card
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_export_overwrite_rules(tmp_path):
    _, a, plan_a, _ = _pruned("llama", preset="mlp-60")
    _, b, plan_b, _ = _pruned("llama", preset="depth-60")
    out = export_model(a, tiny_tokenizer(), tmp_path / "m", plan=plan_a)
    weights = (out / "model.safetensors").read_bytes()
    export_model(a, tiny_tokenizer(), out, plan=plan_a)  # the same model again: fine
    with pytest.raises(FileExistsError, match="already holds a different model; choose another output folder"):
        export_model(b, tiny_tokenizer(), out, plan=plan_b)
    assert (out / "model.safetensors").read_bytes() == weights  # untouched
    export_model(b, tiny_tokenizer(), out, plan=plan_b, force=True)
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.num_hidden_layers == b.config.num_hidden_layers
    foreign = tmp_path / "foreign"
    save_tiny("llama", foreign)  # a model prunescope did not write
    with pytest.raises(FileExistsError, match="different model"):
        export_model(a, tiny_tokenizer(), foreign)


def test_failed_export_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    _, pruned, plan, _ = _pruned("qwen3")
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(pruned, BrokenTokenizer(), tmp_path / "out", plan=plan)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def model_and_scores(tmp_path):
    """A saved tiny llama folder and a scores folder computed for it."""
    folder = save_tiny("llama", tmp_path / "model")
    loaded = load(str(folder), dtype="float32", device="cpu")
    sc = fake_scores(loaded.model)
    sc.meta.update(model=str(folder), dtype="float32", fingerprint=fingerprint(loaded.model))
    sc.save(tmp_path / "scores")
    return folder, tmp_path / "scores", tmp_path


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["prune", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.err.strip() if rc else cap.out


def test_cli_prune_and_export(model_and_scores, capsys):
    folder, scores, tmp = model_and_scores
    rc, out = _run(capsys, "--scores", scores, "--heads", 4, "--ffn", 20, "--layers", 3, "--merge-heads",
                   "--out", tmp / "out")
    assert rc == 0 and "parameters: 73,008 ->" in out
    plan = Plan.load(tmp / "out" / "plan.json")
    assert plan.head_merge is not None and plan.sizes.layers == 3
    back = AutoModelForCausalLM.from_pretrained(tmp / "out")
    assert back.config.num_attention_heads == 4 and back.config.intermediate_size == 20
    rc, _ = _run(capsys, "--scores", scores, "--heads", 4, "--ffn", 20, "--layers", 3, "--merge-heads",
                 "--out", tmp / "out")
    assert rc == 0  # same plan, same model: fine


def test_cli_plan_only_then_edited_plan(model_and_scores, capsys):
    _, scores, tmp = model_and_scores
    rc, out = _run(capsys, "--scores", scores, "--preset", "mlp-75", "--plan-only", "--out", tmp / "p")
    assert rc == 0 and "estimate:" in out and [p.name for p in (tmp / "p").iterdir()] == ["plan.json"]
    d = json.loads((tmp / "p" / "plan.json").read_text())
    d["layers"][0]["neurons"] = list(range(len(d["layers"][0]["neurons"])))
    (tmp / "p" / "plan.json").write_text(json.dumps(d))
    rc, _ = _run(capsys, "--scores", scores, "--plan", tmp / "p" / "plan.json", "--out", tmp / "p")
    assert rc == 0
    m = AutoModelForCausalLM.from_pretrained(tmp / "p")
    src = AutoModelForCausalLM.from_pretrained(tmp / "model")
    n = len(d["layers"][0]["neurons"])
    assert torch.equal(m.model.layers[0].mlp.up_proj.weight, src.model.layers[0].mlp.up_proj.weight[:n])


@pytest.mark.parametrize("args, message", [
    (["--heads", 3], "heads target 3 must be a multiple of the 2 KV heads"),
    (["--hidden", 100], "hidden target 100 is larger than the source (48)"),
    (["--ffn", 0], "ffn target 0 must be at least 1"),
    (["--hidden", 40], "hidden 40 is not a multiple of 6; nearest valid: 36, 42"),
    (["--layers", 2, "--depth-by", "ppl"], "needs the 'ppl_increase' scores"),
    (["--drop-layers", "1,x"], "--drop-layers takes comma-separated layer indices"),
])
def test_cli_bad_targets(model_and_scores, capsys, args, message):
    _, scores, tmp = model_and_scores
    rc, err = _run(capsys, "--scores", scores, *args, "--out", tmp / "out")
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp / "out").exists()


def test_cli_dtype_rule(model_and_scores, capsys):
    """The export keeps the source checkpoint's dtype unless --dtype says otherwise, and a plan made from
    scores of a bf16 load applies to the model loaded in any dtype (its identity ignores the load dtype)."""
    from safetensors import safe_open

    folder, _, tmp = model_and_scores
    bf16 = load(str(folder), dtype="bf16", device="cpu")
    assert bf16.source_dtype == torch.float32 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert fingerprint(bf16.model) == fingerprint(load(str(folder), dtype="fp32", device="cpu").model)
    sc = fake_scores(bf16.model)
    sc.meta.update(model=str(folder), dtype="bfloat16", fingerprint=fingerprint(bf16.model))
    sc.save(tmp / "bf16-scores")
    assert _run(capsys, "--scores", tmp / "bf16-scores", "--ffn", 20, "--plan-only", "--out", tmp / "p")[0] == 0

    def stored(out: Path) -> set[str]:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return {str(f.get_slice(k).get_dtype()) for k in f.keys()}

    for argv, dtype in (([], "float32"), (["--dtype", "bf16"], "bfloat16")):
        out = tmp / f"out-{dtype}"
        rc, printed = _run(capsys, "--plan", tmp / "p" / "plan.json", *argv, "--out", out)  # no --scores
        assert rc == 0, printed
        assert stored(out) == {"F32" if dtype == "float32" else "BF16"}
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        assert f"- weights stored as: {dtype}" in (out / "README.md").read_text()


def test_cli_scores_of_another_model(model_and_scores, capsys):
    _, scores, tmp = model_and_scores
    other = save_tiny("llama", tmp / "other", seed=3)
    rc, err = _run(capsys, "--scores", scores, "--model", other, "--ffn", 20, "--out", tmp / "out")
    assert rc == 2 and "came from another model" in err and not (tmp / "out").exists()


def test_cli_never_overwrites_without_force(model_and_scores, capsys):
    _, scores, tmp = model_and_scores
    assert _run(capsys, "--scores", scores, "--ffn", 20, "--out", tmp / "out")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp / "out").iterdir()}
    rc, err = _run(capsys, "--scores", scores, "--ffn", 10, "--out", tmp / "out")
    assert rc == 2 and "already holds a different plan; use --force" in err
    assert {p.name: p.read_bytes() for p in (tmp / "out").iterdir()} == before
    (tmp / "out" / "plan.json").unlink()
    rc, err = _run(capsys, "--scores", scores, "--ffn", 10, "--out", tmp / "out")
    assert rc == 2 and "already holds a different model" in err
    assert _run(capsys, "--scores", scores, "--ffn", 10, "--out", tmp / "out", "--force")[0] == 0
    assert AutoModelForCausalLM.from_pretrained(tmp / "out").config.intermediate_size == 10


# ---------------------------------------------------------------- the built-in model


@pytest.fixture(scope="module")
def builtin_scores(builtin, wikitext):
    from engine.data import DataSource, get_blocks
    from engine.importance import ScoreConfig, compute_scores

    blocks = get_blocks(DataSource.parse(str(wikitext), docs=(0.0, 0.6)), builtin.tokenizer, 4, 128)
    sc = compute_scores(builtin.model, blocks, ScoreConfig(batch_size=4))
    sc.meta.update(model=builtin.name, data="wikitext-2 test [0-0.6]")  # no fingerprint: saves a pass per test
    return sc


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["hidden-75", "mlp-75", "heads-75", "depth-75", "all-75"])
def test_builtin_prune_export_reload(builtin, builtin_scores, wikitext, tmp_path, preset):
    from engine.data import DataSource, get_blocks

    spec = get_adapter(builtin.model).spec()
    targets = preset_targets(spec, preset)
    plan = make_plan(builtin_scores, targets)
    pruned = apply_plan(builtin.model, plan)
    frac = count_parameters(pruned) / count_parameters(builtin.model)
    assert abs(frac - 0.75) < 0.02 if preset != "heads-75" else targets.heads == 3 and frac < 0.92
    out = export_model(pruned, builtin.tokenizer, tmp_path / preset, plan=plan, scores_meta=builtin_scores.meta,
                       source_name=builtin.name)
    del pruned
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    ids = get_blocks(DataSource.parse(str(wikitext), docs=(0.6, 1.0)), tok, 2, 128)
    with torch.no_grad():
        ppl = math.exp(back(ids, labels=ids).loss.item())
    assert math.isfinite(ppl) and ppl > 1
    assert back.generate(ids[:1, :8], max_new_tokens=3, do_sample=False).shape == (1, 11)
    assert Path(out, "README.md").read_text().count(builtin.name) >= 1


def test_cli_iterative(model_and_scores, capsys, wikitext):
    _, scores, tmp = model_and_scores
    rc, out = _run(capsys, "--scores", scores, "--heads", 2, "--ffn", 17, "--layers", 2, "--iterations", 2,
                   "--data", wikitext, "--samples", 4, "--seq-len", 16, "--out", tmp / "it")
    assert rc == 0, out
    assert sorted(p.name for p in (tmp / "it").glob("plan-step*.json")) == ["plan-step1.json", "plan-step2.json"]
    assert Plan.load(tmp / "it" / "plan-step2.json").spec.n_layers == 3  # scored on the step-1 model
    cfg = AutoModelForCausalLM.from_pretrained(tmp / "it").config
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (2, 17, 2)
