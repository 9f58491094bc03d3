"""GGUF export (engine.gguf_export, `prunescope export --gguf`): written with GGUFWriter, reloaded
with transformers' gguf_file= loader, logits compared with the safetensors export."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from tiny_models import fake_scores, random_ids, tiny_model, tiny_tokenizer

from engine.arch import get_adapter
from engine.cli import main
from engine.errors import UnsupportedArchitecture
from engine.export import export_model
from engine.gguf_export import RESULT_FILE, export_gguf, load_gguf, read_results
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.targets import Targets


def _export(tmp_path, family: str, targets: Targets | None = None, **overrides):
    model = tiny_model(family, **overrides)
    if targets is not None:
        model = apply_plan(model, make_plan(fake_scores(model), targets))
    return export_model(model, tiny_tokenizer(), tmp_path / family, verify=False), model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,targets,overrides", [
    ("llama", Targets(hidden=30, ffn=20, layers=3), {}),  # pruned: hidden 30, head_dim 12 (decoupled), tied
    ("llama", None, dict(tie_word_embeddings=False)),  # untied: output.weight written
    ("mistral", Targets(ffn=17), dict(hidden_size=48)),  # written as llama.cpp's llama
    ("qwen2", Targets(ffn=20), dict(hidden_size=40)),  # biases on q/k/v
])
def test_gguf_reloads_with_the_same_logits(family, targets, overrides, tmp_path):
    folder, model = _export(tmp_path, family, targets, **overrides)
    ids = random_ids()
    for t, tol in (("f32", 1e-5), ("f16", 2e-2)):
        info = export_gguf(folder, t)
        assert info["check"]["passed"] and info["check"]["tokenizer_match"], info
        back, tok = load_gguf(info["path"])
        assert back.config.hidden_size == model.config.hidden_size
        assert get_adapter(back).head_dim == get_adapter(model).head_dim
        assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
        ref, got = _logits(model, ids), _logits(back, ids)
        assert (got - ref).abs().max() <= tol * ref.abs().max(), t
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
        names = {x.name for x in gguf.GGUFReader(info["path"]).tensors}
        assert ("output.weight" in names) != model.config.tie_word_embeddings
    rec = json.loads((folder / RESULT_FILE).read_text())
    assert set(rec["files"]) == {"f32", "f16"} and {r["type"] for r in read_results(folder)} == {"f32", "f16"}
    card = (folder / "README.md").read_text()
    assert "## GGUF" in card and f"`{folder.name}-f16.gguf` | f16" in card and "| passed |" in card


def test_q8_0_quantises_rows_of_32_and_falls_back_to_f16(tmp_path):
    # hidden 96 (3 blocks of 32) with head_dim 32 decoupled from 96 / 6 = 16; MLP 40 is not a multiple of 32
    folder, model = _export(tmp_path, "llama", None, hidden_size=96, intermediate_size=40, head_dim=32,
                            tie_word_embeddings=False)
    info = export_gguf(folder, "q8_0")
    types = {x.name: x.tensor_type.name for x in gguf.GGUFReader(info["path"]).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 40
    assert types["blk.0.attn_norm.weight"] == "F32"
    c = info["check"]
    assert c["passed"] and c["tolerance"] is None and c["rel_diff"] < 0.1 and c["argmax_agreement"] >= 0.9
    f16 = export_gguf(folder, "f16")
    assert info["bytes"] < f16["bytes"] and f16["check"]["rel_diff"] < c["rel_diff"]


def test_unsupported_families_are_refused_without_a_file(tmp_path):
    folder, _ = _export(tmp_path, "gpt2")
    with pytest.raises(UnsupportedArchitecture, match="GGUF export handles llama, mistral, qwen2, qwen3; "
                                                      "this model is 'gpt2'"):
        export_gguf(folder, "f16")
    qwen, _ = _export(tmp_path, "qwen2")  # head_dim 10 != 36 / 4: the reader would rebuild 9
    with pytest.raises(UnsupportedArchitecture, match="needs head_dim 9 \\(this model has 10\\)"):
        export_gguf(qwen, "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))
    assert not (folder / RESULT_FILE).exists()


def test_cli_export_gguf(tmp_path, capsys):
    folder, _ = _export(tmp_path, "llama", Targets(ffn=20))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    folder.rename(run_dir / "model")  # a run folder: the command finds model/ in it
    assert main(["export", str(run_dir), "--gguf", "--gguf-type", "f32"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'run' / 'model-f32.gguf'}" in out and "reload check passed" in out
    assert main(["export", str(run_dir)]) == 2
    assert "--gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run_dir), "--gguf", "--gguf-type", "q4_0"])


@pytest.mark.slow
def test_builtin_model_pruned_to_hidden_516(tmp_path):
    """SmolLM2-135M pruned to hidden 516 and 6 query heads: head_dim 64 no longer hidden / heads (86)."""
    from engine.models import load

    builtin = load("default", dtype="float32", device="cpu")
    model = builtin.model
    pruned = apply_plan(model, make_plan(fake_scores(model), Targets(hidden=516, heads=6, ffn=1024, layers=20)))
    folder = export_model(pruned, builtin.tokenizer, tmp_path / "smol516", verify=False)
    results = {t: export_gguf(folder, t) for t in ("f16", "q8_0")}  # f32 is exact on the tiny models
    assert results["f16"]["check"]["passed"] and results["q8_0"]["check"]["argmax_agreement"] >= 0.9
    back, _ = load_gguf(results["f16"]["path"])
    assert (back.config.hidden_size, back.config.head_dim, back.config.num_attention_heads) == (516, 64, 6)
    text = "The capital of France is"
    enc = builtin.tokenizer(text, return_tensors="pt")["input_ids"]
    a = pruned.generate(enc, max_new_tokens=5, do_sample=False)
    b = back.generate(enc, max_new_tokens=5, do_sample=False)
    assert a.shape == b.shape == (1, enc.shape[1] + 5)


def test_compare_section_shows_and_writes_gguf(tmp_path):
    """dashboard.exports on a real export folder: the recorded GGUF row, then the button writes another
    type through `prunescope export` in a separate process."""
    from streamlit.testing.v1 import AppTest

    from dashboard.exports import gguf_rows, lm_eval_frame

    folder, _ = _export(tmp_path, "llama", Targets(ffn=20))
    export_gguf(folder, "f16")
    assert [r["type"] for r in gguf_rows(folder)] == ["f16"] and gguf_rows(folder)[0]["reload check"] == "passed"
    assert lm_eval_frame(folder) is None

    def page(folder: str) -> None:
        from dashboard.exports import exports_section

        exports_section(folder, "default")

    at = AppTest.from_function(page, args=(str(folder),), default_timeout=120).run()
    assert not at.exception
    assert "--tasks prunescope_ppl,prunescope_lastword" in at.code[0].value
    at.selectbox(key="cmp_gguf_type").set_value("q8_0")
    at.button(key="cmp_gguf_write").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert sorted(r["type"] for r in gguf_rows(folder)) == ["f16", "q8_0"]
    assert (tmp_path / f"{folder.name}-q8_0.gguf").is_file()


def test_type_lists_agree():
    import dashboard.exports
    import engine.commands.export
    import engine.gguf_export

    assert set(engine.commands.export.GGUF_TYPES) == set(engine.gguf_export.GGUF_TYPES) \
        == set(dashboard.exports.GGUF_TYPES)
    assert dashboard.exports.GGUF_FILE == engine.gguf_export.RESULT_FILE
