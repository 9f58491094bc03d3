"""Importance scores against brute-force references built from explicitly captured activations."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import _CORPUS, FAMILIES, random_ids, save_tiny, tiny_model

from engine.arch import get_adapter, hidden_from_args, hidden_from_output
from engine.data import DataSource
from engine.importance import AGGREGATIONS, ScoreConfig, ScoreError, Scores, compute_scores, score, spearman
from engine.importance.aggregate import rankdata

N, T = 5, 16  # 5 blocks in batches of 2: the last batch is smaller (tests the running merge)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


# ---------------------------------------------------------------- brute-force references


@torch.no_grad()
def capture(model, ids) -> dict:
    """Full activations of every hooked point, (N, T, C) each, from one plain forward."""
    a = get_adapter(model)
    acts: dict = {"o": [], "down": [], "norms": [], "x": [], "y": []}
    handles = []
    for i in range(a.n_layers):
        p = a.layer(i)
        handles.append(p.o.register_forward_pre_hook(lambda m, args: acts["o"].append(args[0].clone())))
        handles.append(p.down.register_forward_pre_hook(lambda m, args: acts["down"].append(args[0].clone())))
        acts["norms"].append([])
        for norm in a.norms(i):
            handles.append(norm.register_forward_hook(
                lambda m, args, out, i=i: acts["norms"][i].append(out.clone())))

        def block_hook(m, args, kwargs, out):
            acts["x"].append(hidden_from_args(args, kwargs).clone())
            acts["y"].append(hidden_from_output(out).clone())
        handles.append(p.block.register_forward_hook(block_hook, with_kwargs=True))
    try:
        model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acts


def ref_agg(x: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(N, T, C) -> (C,), straight from the definition."""
    b, s = aggregation.split("_")
    per_sample = {"mean": lambda: x.abs().mean(1), "l2": lambda: x.pow(2).sum(1).sqrt(),
                  "var": lambda: x.var(1, unbiased=False)}[s]()
    return {"mean": lambda: per_sample.mean(0), "l2": lambda: per_sample.pow(2).sum(0).sqrt(),
            "var": lambda: per_sample.var(0, unbiased=False)}[b]()


def ref_bi(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(x, y, dim=-1).mean()


@torch.no_grad()
def naive_ppl(model, ids, keep: list[int] | None = None) -> float:
    a = get_adapter(model)
    keep = list(range(a.n_layers)) if keep is None else keep
    with a.only_layers(keep):
        return math.exp(model(ids, labels=ids, use_cache=False).loss.item())


def close(a, b, rtol=1e-4, atol=1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- width and BI


def test_width_and_bi_match_bruteforce_every_aggregation(family):
    model = tiny_model(family)
    a = get_adapter(model)
    ids = random_ids(N, T)
    acts = capture(model, ids)
    L, H = a.n_layers, a.n_heads
    for agg in AGGREGATIONS:
        s = compute_scores(model, ids, ScoreConfig(aggregation=agg, batch_size=2, block_size=2))
        heads = torch.stack([torch.linalg.vector_norm(ref_agg(o, agg).view(H, -1), dim=-1) for o in acts["o"]])
        close(s["heads"], heads)
        close(s["neurons"], torch.stack([ref_agg(d, agg) for d in acts["down"]]))
        per_layer = torch.stack([sum(ref_agg(n, agg) for n in norms) for norms in acts["norms"]])
        close(s["channels_per_layer"], per_layer)
        close(s["channels"], per_layer.sum(0))
    assert s["heads"].shape == (L, H) and s["neurons"].shape == (L, a.intermediate_size)
    assert s["channels"].shape == (a.hidden_size,) and s["channels_per_layer"].shape == (L, a.hidden_size)
    close(s["bi"], torch.stack([ref_bi(x, y) for x, y in zip(acts["x"], acts["y"], strict=True)]))
    close(s["block_bi"], torch.stack([ref_bi(acts["x"][b], acts["y"][b + 1]) for b in range(L - 1)]))
    assert s.meta["arch"]["n_layers"] == L and s.meta["block_size"] == 2


def test_result_does_not_depend_on_batch_size():
    model = tiny_model("llama")
    ids = random_ids(N, T)
    one = compute_scores(model, ids, ScoreConfig(aggregation="var_var", batch_size=1))
    all_ = compute_scores(model, ids, ScoreConfig(aggregation="var_var", batch_size=N))
    for k in one.tensors:
        close(one[k], all_[k])


def _zero_v_of_head(model, layer: int, head: int) -> list[int]:
    """Zero the value projection feeding query head `head`; returns the query heads that read it."""
    a = get_adapter(model)
    p, hd = a.layer(layer), a.head_dim
    with torch.no_grad():
        g = head // a.heads_per_group
        if a.fused_qkv:  # q | k | v output features (GPT-2's Conv1D: columns; Phi-3's Linear: rows)
            cols = slice((a.n_heads + a.n_kv_heads + g) * hd, (a.n_heads + a.n_kv_heads + g + 1) * hd)
            (p.qkv.weight[:, cols] if a.conv1d else p.qkv.weight[cols]).zero_()
            if p.qkv.bias is not None:
                p.qkv.bias[cols] = 0
            return list(range(g * a.heads_per_group, (g + 1) * a.heads_per_group))
        p.v.weight[g * hd:(g + 1) * hd] = 0
        if p.v.bias is not None:
            p.v.bias[g * hd:(g + 1) * hd] = 0
        return list(range(g * a.heads_per_group, (g + 1) * a.heads_per_group))


def _zero_neuron(model, layer: int, j: int) -> None:
    a = get_adapter(model)
    up = a.layer(layer).up
    with torch.no_grad():
        if a.conv1d:
            up.weight[:, j] = 0
        else:
            up.weight[j] = 0
        if up.bias is not None:
            up.bias[j] = 0


def test_zeroed_value_rows_give_zero_head_and_zeroed_up_rows_zero_neuron(family):
    model = tiny_model(family)
    dead_heads = _zero_v_of_head(model, 1, 1)
    _zero_neuron(model, 0, 5)
    for agg in ("l2_mean", "var_var", "mean_l2"):
        s = compute_scores(model, random_ids(N, T), ScoreConfig(aggregation=agg, batch_size=2))
        assert (s["heads"][1, dead_heads] == 0).all(), agg
        alive = [h for h in range(s["heads"].shape[1]) if h not in dead_heads]
        assert (s["heads"][1, alive] > 0).all() and (s["heads"][0] > 0).all()
        assert s["neurons"][0, 5] == 0
        assert (s["neurons"][0, :5] > 0).all() and (s["neurons"][1] > 0).all()


def test_identity_layer_has_zero_bi_and_zero_ppl_increase(family):
    model = tiny_model(family)
    p = get_adapter(model).layer(1)
    with torch.no_grad():
        for m in (p.o, p.down):
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    s = compute_scores(model, random_ids(N, T), ScoreConfig(depth_ppl=True, batch_size=2))
    assert abs(s["bi"][1].item()) < 1e-6
    assert abs(s["ppl_increase"][1].item()) < 1e-4 * s.meta["base_ppl"]
    assert (s["bi"][[0, 2]] > 1e-4).all()


# ---------------------------------------------------------------- depth


def test_cached_prefix_sweep_equals_naive_removal(family):
    model = tiny_model(family)
    L = get_adapter(model).n_layers
    ids = random_ids(N, T)
    s = compute_scores(model, ids, ScoreConfig(depth_ppl=True, block_size=2, block_ppl=True, batch_size=2))
    base = naive_ppl(model, ids)
    assert s.meta["base_ppl"] == pytest.approx(base, rel=1e-5)
    tol = dict(rtol=0, atol=1e-5 * base)
    close(s["ppl_increase"], [naive_ppl(model, ids, [j for j in range(L) if j != i]) - base for i in range(L)], **tol)
    close(s["block_ppl_increase"],
          [naive_ppl(model, ids, [j for j in range(L) if j not in (b, b + 1)]) - base for b in range(L - 1)], **tol)
    assert s.meta["spearman_bi_ppl"] == pytest.approx(spearman(s["bi"], s["ppl_increase"]))
    assert {"width_bi", "depth_ppl", "block_ppl", "total"} <= set(s.meta["timings"])


def test_depth_samples_sweep_the_first_samples_and_width_is_skippable():
    model = tiny_model("llama")
    ids = random_ids(5, T)
    cfg = ScoreConfig(depth_ppl=True, block_size=2, block_ppl=True, batch_size=2)
    full = compute_scores(model, ids, cfg)
    part = compute_scores(model, ids, dataclasses.replace(cfg, depth_samples=3))
    first3 = compute_scores(model, ids[:3], cfg)
    for k in ("heads", "neurons", "channels", "bi", "block_bi"):  # width + BI still use all five samples
        close(part[k], full[k])
    for k in ("ppl_increase", "block_ppl_increase"):  # the sweeps use the first three
        close(part[k], first3[k])
    assert part.meta["depth_samples"] == 3 and full.meta["depth_samples"] == 5
    assert part.meta["base_ppl"] == pytest.approx(first3.meta["base_ppl"], rel=1e-6)
    only = compute_scores(model, ids, dataclasses.replace(cfg, depth_samples=3), width=False)
    assert set(only.tensors) == {"ppl_increase", "block_ppl_increase"} and "width_bi" not in only.meta["timings"]
    close(only["ppl_increase"], part["ppl_increase"])
    with pytest.raises(ScoreError, match="depth samples must be >= 1"):
        compute_scores(model, ids, dataclasses.replace(cfg, depth_samples=0))


def test_sweep_cost_formula_counts_the_passes_actually_run():
    """sweep_layer_passes is the number of decoder-layer and lm_head passes per sample the sweep runs."""
    from engine.importance.sweep import estimate_sweep_seconds, sweep_layer_passes

    model = tiny_model("mistral")
    a = get_adapter(model)
    L, D = a.n_layers, 3
    rows = {"layer": 0, "head": 0}

    def count(kind):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            rows[kind] += x.shape[0] if x.dim() == 3 else x.shape[0] / (T - 1)  # lm_head gets (m * (T-1), D)
        return hook

    handles = [layer.register_forward_hook(count("layer"), with_kwargs=True) for layer in a.layers]
    handles.append(a.lm_head.register_forward_hook(count("head"), with_kwargs=True))
    try:
        compute_scores(model, random_ids(4, T), ScoreConfig(depth_ppl=True, block_size=2, block_ppl=True,
                                                            depth_samples=D, batch_size=2), width=False)
    finally:
        for h in handles:
            h.remove()
    layers, heads = sweep_layer_passes(L, 0.0, True, 2, True), sweep_layer_passes(L, 1.0, True, 2, True)
    assert rows["layer"] == layers * D and rows["head"] == pytest.approx((heads - layers) * D)
    arch = a.spec().to_dict()
    assert estimate_sweep_seconds(0.5, arch, D, block_size=2, block_ppl=True) == pytest.approx(
        0.5 * D * sweep_layer_passes(L, arch["vocab_size"] * 40 / (40 * 8 * (2 * 6 + 2 * 3) + 3 * 40 * 29),
                                     True, 2, True))


def test_taylor_matches_bruteforce_and_leaves_model_untouched():
    model = tiny_model("qwen2")
    a = get_adapter(model)
    ids = random_ids(N, T)
    model.lm_head.weight.requires_grad_(False)  # a caller's setting that must survive
    s = compute_scores(model, ids, ScoreConfig(taylor=True, batch_size=2))
    assert not model.lm_head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(True)
    model(ids, labels=ids, use_cache=False).loss.backward()
    ref = torch.stack([sum((p * p.grad).abs().sum() for p in a.layers[i].parameters()) for i in range(a.n_layers)])
    close(s["taylor"], ref, rtol=1e-4, atol=0)


def test_bf16_model_accumulates_in_fp32():
    model = tiny_model("gpt2")
    ids = random_ids(4, T)
    cfg = ScoreConfig(depth_ppl=True, taylor=True, batch_size=2)
    ref = compute_scores(model, ids, cfg)
    low = compute_scores(model.to(torch.bfloat16), ids, cfg)
    assert low.meta["dtype"] == "bfloat16"
    for k, v in ref.tensors.items():
        assert low[k].dtype == torch.float32 and torch.isfinite(low[k]).all()
        assert (low[k] - v).abs().max() <= 0.05 * v.abs().max(), k


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 0.5])
    y = torch.tensor([1.0, 0.0, 3.0, 3.0, 4.0, 2.0])
    assert rankdata(x).tolist() == stats.rankdata(x.numpy()).tolist()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic)
    assert spearman(torch.ones(4), y[:4]) is None


def test_bad_config_is_a_score_error():
    model = tiny_model("gpt2")
    for cfg in (ScoreConfig(aggregation="l3_mean"), ScoreConfig(block_ppl=True), ScoreConfig(block_size=9)):
        with pytest.raises(ScoreError):
            compute_scores(model, random_ids(2, 8), cfg)


def test_pruned_shapes_are_read_from_the_model():
    """Scoring works with any widths, e.g. a model pruned to other sizes than its family's defaults."""
    model = tiny_model("mistral", hidden_size=24, intermediate_size=11, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=6)
    s = compute_scores(model, random_ids(3, 8), ScoreConfig(depth_ppl=True))
    assert s["heads"].shape == (3, 4) and s["neurons"].shape == (3, 11) and s["channels"].shape == (24,)


# ---------------------------------------------------------------- files, cache and CLI


@pytest.fixture
def loaded_and_corpus(tmp_path, monkeypatch):
    from engine.models import load

    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    folder = save_tiny("llama", tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text((" = Doc = \n" + _CORPUS + "\n") * 20)
    return load(str(folder), device="cpu"), DataSource.parse(str(text)), folder, text


def test_score_caches_reuses_extends_and_refuses(loaded_and_corpus, tmp_path, monkeypatch):
    import engine.importance.scoring as cache

    loaded, source, _, _ = loaded_and_corpus
    calls: list[ScoreConfig] = []
    real = cache.compute_scores
    monkeypatch.setattr(cache, "compute_scores", lambda m, b, c, progress=None, **kw: calls.append(c) or real(m, b, c, progress, **kw))
    s1, folder = score(loaded, source, 4, 16, config=ScoreConfig(depth_ppl=True))
    assert folder.parent.name == "scores" and s1.meta["reused"] == "none" and len(calls) == 1
    assert s1.meta["cache_key"] == folder.name and s1.meta["fingerprint"] and s1.meta["data_source"]["kind"] == "file"
    mtime = (folder / "scores.safetensors").stat().st_mtime_ns
    s2, folder2 = score(loaded, source, 4, 16)  # a subset: reused
    assert folder2 == folder and s2.meta["reused"] == "all" and len(calls) == 1
    assert (folder / "scores.safetensors").stat().st_mtime_ns == mtime
    close(s2["ppl_increase"], s1["ppl_increase"])
    s3, _ = score(loaded, source, 4, 16, config=ScoreConfig(taylor=True, depth_ppl=True))  # superset
    assert s3.meta["reused"] == "partial" and not calls[-1].depth_ppl and calls[-1].taylor
    on_disk = Scores.load(folder)
    assert on_disk.has("taylor") and on_disk.has("ppl_increase") and on_disk.meta["config"]["taylor"]
    with pytest.raises(ScoreError, match="seed"):
        score(loaded, source, 4, 16, seed=1, out_dir=folder)
    s4, _ = score(loaded, source, 4, 16, seed=1, out_dir=folder, force=True)
    assert Scores.load(folder).meta["seed"] == 1 and not s4.has("taylor")
    blocks, bfolder = score(loaded, source, 4, 16, config=ScoreConfig(block_size=2))
    assert bfolder.name.endswith("-blocks2") and blocks["block_bi"].shape == (3,)
    with pytest.raises(ScoreError, match="blocks of 2"):
        score(loaded, source, 4, 16, config=ScoreConfig(block_size=3), out_dir=bfolder)


def test_damaged_scores_are_recomputed_in_the_cache_and_refused_elsewhere(loaded_and_corpus, tmp_path, caplog, capsys):
    import json
    import logging

    from engine.cli import main

    loaded, source, _, _ = loaded_and_corpus
    s1, folder = score(loaded, source, 4, 16)
    tensors = folder / "scores.safetensors"
    assert s1.meta["tensors_file"]["bytes"] == tensors.stat().st_size
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ScoreError, match=rf"scores.safetensors is damaged \({len(good) // 2:,} bytes, "
                                         rf"{len(good):,} recorded\); recompute"):
        Scores.load(folder)
    with pytest.raises(ScoreError, match="is damaged"):
        Scores.load_numpy(folder)
    with caplog.at_level(logging.WARNING, logger="engine.importance.scoring"):
        s2, folder2 = score(loaded, source, 4, 16)  # the cache's own entry: recomputed, said in the log
    assert folder2 == folder and s2.meta["reused"] == "none" and "damaged, recomputing" in caplog.text
    assert tensors.read_bytes() == good and torch.equal(Scores.load(folder)["heads"], s1["heads"])
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # same size, one byte changed
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(ScoreError, match="checksum differs"):
        score(loaded, source, 4, 16, out_dir=folder)  # a folder the user named is not silently replaced
    meta = json.loads((folder / "scores.json").read_text())
    del meta["tensors_file"]  # written before checksums: a truncated file is still a one-line error
    (folder / "scores.json").write_text(json.dumps(meta))
    tensors.write_bytes(good[:100])
    with pytest.raises(ScoreError, match=r"is damaged \(SafetensorError"):
        Scores.load(folder)
    assert main(["prune", "--scores", str(folder), "--ffn", "20", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_score_sweeps_eight_samples_by_default_on_a_cpu(loaded_and_corpus):
    loaded, source, _, _ = loaded_and_corpus
    s, _ = score(loaded, source, 12, 16, config=ScoreConfig(depth_ppl=True))
    assert s.meta["depth_samples"] == 8 and s.meta["n_samples"] == 12
    s, _ = score(loaded, source, 12, 16, config=ScoreConfig(depth_ppl=True, depth_samples=12))
    assert s.meta["depth_samples"] == 12 and s.meta["reused"] == "partial"


def test_add_depth_scores_keeps_the_width_scores(loaded_and_corpus, tmp_path, monkeypatch):
    import engine.importance.scoring as cache
    from engine.data import get_blocks
    from engine.importance import add_depth_scores

    loaded, source, _, _ = loaded_and_corpus
    folder = tmp_path / "scores"
    first, _ = score(loaded, source, 4, 16, config=ScoreConfig(block_size=2), out_dir=folder)
    widths = {k: v.clone() for k, v in first.tensors.items()}
    calls: list[bool] = []
    real = cache.compute_scores
    monkeypatch.setattr(cache, "compute_scores", lambda m, b, c, progress=None, width=True: calls.append(width)
                        or real(m, b, c, progress, width))
    steps: list[tuple[float, str]] = []
    added = add_depth_scores(folder, loaded, depth_samples=2, block_ppl=True, progress=lambda f, m: steps.append((f, m)))
    assert calls == [False] and added.meta["reused"] == "partial" and steps[-1][0] == 1.0
    on_disk = Scores.load(folder)
    for k, v in widths.items():  # not recomputed: the very same numbers
        assert torch.equal(on_disk[k], v), k
    blocks = get_blocks(source, loaded.tokenizer, 4, 16)
    ref = compute_scores(loaded.model, blocks[:2], ScoreConfig(depth_ppl=True, block_size=2, block_ppl=True))
    close(on_disk["ppl_increase"], ref["ppl_increase"])
    close(on_disk["block_ppl_increase"], ref["block_ppl_increase"])
    assert on_disk.meta["depth_samples"] == 2 and on_disk.meta["timings"]["width_bi"] == first.meta["timings"]["width_bi"]
    assert on_disk.meta["spearman_bi_ppl"] == pytest.approx(spearman(on_disk["bi"], on_disk["ppl_increase"]))
    assert add_depth_scores(folder, loaded, depth_samples=2).meta["reused"] == "all" and len(calls) == 1
    three = add_depth_scores(folder, loaded, depth_samples=3)  # another sample count replaces the sweep
    assert three.meta["depth_samples"] == 3 and not three.has("block_ppl_increase") and calls[-1] is False
    with pytest.raises(ScoreError, match="no block scores"):
        add_depth_scores(score(loaded, source, 4, 16, out_dir=tmp_path / "plain")[1], loaded, block_ppl=True)
    one = add_depth_scores(folder, depth_samples=1, device="cpu")  # the model loaded from the scores' record
    assert one.meta["depth_samples"] == 1 and torch.equal(one["heads"], widths["heads"])


def test_cli_end_to_end(loaded_and_corpus, tmp_path, capsys):
    from engine.cli import main

    _, _, model_dir, text = loaded_and_corpus
    out = tmp_path / "scores"
    argv = ["score", "--model", str(model_dir), "--data", str(text), "--data-range", "0:1", "--samples", "4",
            "--seq-len", "16", "--depth-ppl", "--blocks", "2", "--block-ppl", "--taylor", "--batch-size", "3",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "cache: computed" in printed and "Spearman" in printed
    s = Scores.load(out)
    assert {"heads", "neurons", "channels", "channels_per_layer", "bi", "ppl_increase", "block_bi",
            "block_ppl_increase", "taylor"} <= set(s.tensors)
    assert main(argv) == 0 and "cache: reused" in capsys.readouterr().out
    assert main(argv[:-2] + ["--out", str(out), "--seed", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["score", "--model", str(model_dir), "--data", str(text), "--block-ppl"]) == 2


def test_cli_depth_samples_estimate_and_add_to(loaded_and_corpus, tmp_path, capsys):
    from engine.cli import main

    _, _, model_dir, text = loaded_and_corpus
    out = tmp_path / "scores"
    base = ["score", "--model", str(model_dir), "--data", str(text), "--samples", "4", "--seq-len", "16",
            "--device", "cpu", "--out", str(out)]
    assert main(base) == 0
    before = Scores.load(out)
    capsys.readouterr()
    assert main(["score", "--add-to", str(out), "--device", "cpu"]) == 0  # model, data, dtype from the scores
    printed = capsys.readouterr().out
    assert re.search(r"perplexity sweep on 4 x 16 tokens: about \d+ s \(one layer pass measured at [\d.]+ ms", printed)
    assert "cache: partly reused" in printed and "perplexity sweep on 4 of the 4 samples" in printed
    after = Scores.load(out)
    assert torch.equal(after["heads"], before["heads"]) and after.has("ppl_increase")
    assert main(["score", "--add-to", str(out), "--depth-samples", "2", "--device", "cpu"]) == 0
    assert Scores.load(out).meta["depth_samples"] == 2 and "on 2 of the 4 samples" in capsys.readouterr().out
    assert main(base + ["--depth-ppl", "--depth-samples", "2"]) == 0  # the same sweep asked for: reused
    assert "cache: reused" in capsys.readouterr().out
    assert main(["score", "--add-to", str(out), "--data", str(text)]) == 2
    assert "drop --data" in capsys.readouterr().err
    assert main(["score", "--model", str(model_dir)]) == 2
    assert "give --data" in capsys.readouterr().err


# ---------------------------------------------------------------- the built-in model


@pytest.mark.slow
def test_builtin_model_on_wikitext(builtin, wikitext):
    from engine.data import get_blocks

    a = get_adapter(builtin.model)
    blocks = get_blocks(DataSource.parse(str(wikitext), docs=(0.0, 0.6)), builtin.tokenizer, 4, 128)
    s = compute_scores(builtin.model, blocks, ScoreConfig(depth_ppl=True, block_size=4))
    L = a.n_layers
    shapes = {"heads": (L, a.n_heads), "neurons": (L, a.intermediate_size), "channels": (a.hidden_size,),
              "channels_per_layer": (L, a.hidden_size), "bi": (L,), "ppl_increase": (L,), "block_bi": (L - 3,)}
    for name, shape in shapes.items():
        assert s[name].shape == shape, name
        assert torch.isfinite(s[name]).all(), name
    assert 1 < s.meta["base_ppl"] < 100
    # measured (4 x 128 and 8 x 256 tokens): by ppl increase layers 0, 1, 29 rank 1st-3rd; by BI 0 and 29
    # rank 1st and 2nd. The first and last layers must be in the top 5 of 30 by both.
    for name in ("ppl_increase", "bi"):
        top = s[name].argsort(descending=True)[:5].tolist()
        assert 0 in top and L - 1 in top, (name, top)
    assert s.meta["spearman_bi_ppl"] is not None and s.meta["spearman_bi_ppl"] > 0


# ---------------------------------------------------------------- streaming (weights off the device)


class _ResidentWeights(torch.overrides.TorchFunctionMode):
    """Records, at every torch call made while it is active, which modules have real (non-meta) weights."""

    def __init__(self, model):
        super().__init__()
        # the modules, not their parameters: the offload hooks swap in new Parameter objects
        self.owners = [(name, m) for name, m in model.named_modules() if m._parameters]
        self.calls, self.most, self.seen = 0, 0, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        resident = [name for name, m in self.owners
                    if any(p is not None and p.device.type != "meta" for p in m._parameters.values())]
        self.calls += 1
        self.most = max(self.most, len(resident))
        self.seen.update(resident)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fam", ["llama", "qwen3", "gpt2"])
def test_streamed_scores_equal_unstreamed_with_one_module_resident_at_a_time(fam):
    from engine.importance.stream import stream_info, stream_model
    from engine.models import fingerprint

    ref_model = tiny_model(fam)
    model = stream_model(tiny_model(fam), "cpu")
    info = stream_info(model)
    assert info.offload == "cpu" and info.execution_device == torch.device("cpu")
    assert info.tied == get_adapter(ref_model).tied  # read before offloading (qwen3 is untied)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert hasattr(get_adapter(model).layer(0).down, "_hf_hook")
    assert fingerprint(model) == fingerprint(ref_model)  # read from the offloaded weights: same cache key
    ids = random_ids(N, T)
    cfg = ScoreConfig(depth_ppl=True, block_size=2, block_ppl=True, batch_size=2)
    ref = compute_scores(ref_model, ids, cfg)
    with _ResidentWeights(model) as watch:
        s = compute_scores(model, ids, cfg)
    assert set(s.tensors) == set(ref.tensors)
    for k in ref.tensors:
        close(s[k], ref[k], rtol=1e-6, atol=1e-7)
    assert s.meta["base_ppl"] == pytest.approx(ref.meta["base_ppl"], rel=1e-6)
    assert s.meta["stream"] == "cpu" and ref.meta["stream"] == "off" and s.meta["device"] == "cpu"
    assert s.meta["arch"] == ref.meta["arch"]
    # every weight-owning module was loaded at some point, never two at once, and all are offloaded again
    assert watch.calls > 0 and watch.most == 1 and len(watch.seen) == len(watch.owners)
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(ScoreError, match="Taylor"):
        compute_scores(model, ids, ScoreConfig(taylor=True))


def test_streamed_model_describes_counts_and_generates_like_the_original():
    """The rest of the engine sees a streamed model as the model it is: parameters (tied pair once),
    the execution device (not `meta`), and generated calibration text."""
    from tiny_models import tiny_tokenizer

    from engine.data import generate_texts
    from engine.importance.stream import stream_model
    from engine.models import LoadedModel, count_parameters, describe

    ref = tiny_model("llama").eval()
    model = stream_model(tiny_model("llama").eval(), "cpu")
    tok = tiny_tokenizer()
    d, r = describe(LoadedModel(model, tok, "x", "x")), describe(LoadedModel(ref, tok, "x", "x"))
    assert d.pop("streamed") == "cpu" and d == r
    assert count_parameters(model) == count_parameters(ref)
    assert generate_texts(model, tok, 2, 6, seed=3) == generate_texts(ref, tok, 2, 6, seed=3)


def test_cli_stream_from_ram_and_disk_matches_and_shares_the_cache(loaded_and_corpus, tmp_path, capsys):
    from engine.cli import main

    _, _, model_dir, text = loaded_and_corpus
    base = ["score", "--model", str(model_dir), "--data", str(text), "--samples", "4", "--seq-len", "16",
            "--depth-ppl", "--blocks", "2", "--block-ppl", "--batch-size", "3", "--device", "cpu"]
    disk, plain = tmp_path / "disk", tmp_path / "plain"
    assert main(base + ["--stream", "disk", "--out", str(disk)]) == 0
    printed = capsys.readouterr().out
    assert "cache: computed" in printed and "computed streamed: weights kept on disk, layers run on cpu" in printed
    assert main(base + ["--out", str(plain)]) == 0
    assert "streamed" not in capsys.readouterr().out
    s_disk, s_plain = Scores.load(disk), Scores.load(plain)
    assert s_disk.meta["stream"] == "disk" and s_plain.meta["stream"] == "off"
    assert s_disk.meta["cache_key"] == s_plain.meta["cache_key"] and s_disk.meta["arch"] == s_plain.meta["arch"]
    assert set(s_disk.tensors) == set(s_plain.tensors)
    for k in s_plain.tensors:
        close(s_disk[k], s_plain[k], rtol=1e-6, atol=1e-7)
    assert main(base + ["--stream", "--out", str(plain)]) == 0  # RAM streaming: same key, reused
    assert "cache: reused" in capsys.readouterr().out
    assert main(base + ["--stream", "--taylor", "--out", str(tmp_path / "t")]) == 2
    assert "--taylor" in capsys.readouterr().err
