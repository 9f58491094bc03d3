"""Data mixes (engine.mix) and teacher-generated text (engine.prompts) on tiny models: weights honoured
block by block, generated text reproducible from its seed and cached, per-source evaluation equal to
evaluating each source alone, and the same data order after cancel + resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from engine.distill import DistillConfig, distill
from engine.errors import DataError
from engine.evaluate import evaluate_student
from engine.mix import BREADTH, DataMix, eval_sets, evaluate_sources, mix_blocks
from engine.prompts import BUILTIN_PROMPTS, TeacherText, cached_teacher_text
from engine.runs import read_jsonl

SEQ = 16


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Two text files of different vocabularies, so a block's tokens tell which file it came from."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("mix")
    paths = []
    for name, words in (("animals.txt", "the fox dog jumps over lazy"), ("science.txt", "water boils at degrees")):
        w = words.split()
        paras = [" ".join(rng.choice(w) for _ in range(60)).capitalize() + "." for _ in range(40)]
        (folder / name).write_text("\n\n".join(paras) + "\n")
        paths.append(str(folder / name))
    return paths


def test_counts_are_the_largest_remainder_split():
    mix = DataMix(("a", "b", "c"), (0.5, 0.3, 0.2))
    for n in range(1, 60):
        counts = mix.counts(n)
        assert sum(counts) == n
        assert all(abs(k - w * n) < 1 for k, w in zip(counts, mix.weights, strict=True))


@pytest.mark.parametrize("weights", ["0.7,0.3", "1,3"])
def test_a_mix_honours_its_weights_within_one_block(tok, two_files, weights):
    mix = DataMix.of(two_files, weights)
    blocks, owner, info = mix_blocks(mix, tok, 20, SEQ, seed=3)
    assert blocks.shape == (20, SEQ) and owner.shape == (20,)
    total = sum(i["tokens"] for i in info)
    assert total == 20 * SEQ
    for i, row in enumerate(info):
        assert abs(row["tokens"] - row["weight"] * total) < SEQ  # within one block of its share
        assert int((owner == i).sum()) == row["blocks"]
    # each block really comes from its source: it holds no token found only in the other file
    only = [set(tok(open(p).read())["input_ids"]) for p in two_files]
    for b, o in zip(blocks.tolist(), owner.tolist(), strict=True):
        assert not set(b) & (only[1 - o] - only[o])
    again = mix_blocks(mix, tok, 20, SEQ, seed=3)
    assert torch.equal(again[0], blocks) and torch.equal(again[1], owner)
    assert not torch.equal(mix_blocks(mix, tok, 20, SEQ, seed=4)[0], blocks)


def test_a_short_source_lowers_every_share(tok, two_files, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Water boils at degrees. " * 12)
    mix = DataMix.of([two_files[0], str(small)], "0.5,0.5")
    blocks, owner, info = mix_blocks(mix, tok, 40, SEQ, seed=0)
    assert info[0]["blocks"] == info[1]["blocks"] == blocks.shape[0] // 2 < 20
    with pytest.raises(DataError, match="small.txt has .* blocks"):
        mix_blocks(mix, tok, 40, SEQ, seed=0, up_to=False)


def test_mix_specs_files_and_errors(tmp_path, two_files):
    with pytest.raises(DataError, match="2 weights for 3"):
        DataMix.of(["a", "b", "c"], "0.5,0.5")
    with pytest.raises(DataError, match="positive"):
        DataMix.of(["a", "b"], "1,-1")
    lines = tmp_path / "m.txt"
    lines.write_text(f"# my mix\n0.7 {two_files[0]}\n0.3 teacher:0:0.9\n")
    mix = DataMix.of(f"mix:{lines}")
    assert mix.specs == (two_files[0], "teacher:0:0.9") and mix.weights == pytest.approx((0.7, 0.3))
    assert mix.needs_model and "teacher-generated" in mix.label and "70%" in mix.label
    js = tmp_path / "m.json"
    js.write_text(json.dumps(mix.to_config()))
    assert DataMix.of(f"mix:{js}") == mix == DataMix.of(mix.to_config())
    assert DataMix.of(two_files[0]).to_config() == two_files[0]
    with pytest.raises(DataError, match="line 1 should read"):
        lines.write_text("teacher 0.5\n")
        DataMix.read(lines)


def test_teacher_text_is_reproducible_from_its_seed_and_cached(tok, tmp_path):
    model = tiny_model("llama", 0)
    src = TeacherText.parse("teacher:5:0.9")
    src = TeacherText(src.n_docs, src.temperature, None, new_tokens=8)
    state = torch.random.get_rng_state()
    a = cached_teacher_text(src, "train", 5, 11, model, tok, tmp_path / "c1")
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    b = cached_teacher_text(src, "train", 5, 11, model, tok, tmp_path / "c2")  # generated afresh
    assert a == b and len(a) == 5
    assert all(t.startswith(p) for t, p in zip(a, BUILTIN_PROMPTS[0::2], strict=False))
    files = list((tmp_path / "c1").glob("teacher-train-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["meta"]["seed"] == 11
    assert cached_teacher_text(src, "train", 5, 11, None, tok, tmp_path / "c1") == a  # from the cache alone
    assert cached_teacher_text(src, "train", 5, 12, model, tok, tmp_path / "c1") != a  # another seed
    with pytest.raises(DataError, match="needs the teacher"):
        cached_teacher_text(src, "eval", 5, 11, None, tok, tmp_path / "c1")


def test_a_longer_cached_run_serves_a_shorter_one_exactly(tok, tmp_path, monkeypatch):
    """Its whole batches are reused (no teacher needed when they cover the count), the rest is
    generated with the seeds those batches would draw: the same texts as a fresh run of that count."""
    import engine.prompts

    model = tiny_model("llama", 0)
    src = TeacherText(0, 0.9, None, new_tokens=6)
    long = cached_teacher_text(src, "train", 40, 3, model, tok, tmp_path / "c")
    assert cached_teacher_text(src, "train", 32, 3, None, tok, tmp_path / "c") == long[:32]  # two whole batches
    calls = []
    real = engine.prompts.generate_prompted
    monkeypatch.setattr(engine.prompts, "generate_prompted", lambda *a, **k: calls.append(k["done"]) or real(*a, **k))
    short = cached_teacher_text(src, "train", 21, 3, model, tok, tmp_path / "c")
    assert len(calls[0]) == 40  # handed the longer run; it keeps its first batch and writes 5 texts
    monkeypatch.setattr(engine.prompts, "generate_prompted", real)
    fresh = cached_teacher_text(src, "train", 21, 3, model, tok, tmp_path / "fresh")
    assert short == fresh and short[:16] == long[:16] and short[16:] != long[16:21]


def test_teacher_specs_and_prompt_parts(tmp_path):
    assert TeacherText.parse("teacher") == TeacherText()
    with pytest.raises(DataError, match="TEMPERATURE"):
        TeacherText.parse("teacher:4:hot")
    train, held = TeacherText().prompts("train"), TeacherText().prompts("eval")
    assert train and held and not set(train) & set(held)
    f = tmp_path / "p.txt"
    f.write_text("One\nTwo\nThree\n")
    assert TeacherText(prompts_file=str(f)).prompts("eval") == ["Two"]


def test_per_source_evaluation_equals_each_source_alone(tok, two_files, tmp_path):
    teacher, student = tiny_model("llama", 0), tiny_model("llama", 1)
    mix = DataMix.of(two_files, "0.5,0.5")
    sets = eval_sets(mix, tok, 3, SEQ, seed=1, docs=(0.6, 1.0), model=teacher, cache_dir=tmp_path)
    assert list(sets) == ["animals.txt", "science.txt", BREADTH] and all(s.shape[1] == SEQ for s in sets.values())
    got = evaluate_sources(teacher, student, sets, batch_size=2)
    for name, blocks in sets.items():
        alone = evaluate_student(teacher, student, blocks, 2)
        assert got[name]["ppl"] == pytest.approx(alone["ppl"], rel=1e-6)
        assert got[name]["kl"] == pytest.approx(alone["kl"], rel=1e-6)
        assert got[name]["teacher_ppl"] == pytest.approx(alone["teacher_ppl"], rel=1e-6)
    assert got["animals.txt"]["ppl"] != pytest.approx(got["science.txt"]["ppl"], rel=1e-3)
    # the breadth texts come from prompts training never sees
    texts = json.loads(next(tmp_path.glob("teacher-eval-*.json")).read_text())["texts"]
    train_prompts = set(TeacherText().prompts("train"))
    assert texts and not any(t.startswith(p) for t in texts for p in train_prompts)


def test_cancel_and_resume_keep_the_data_order_of_a_mix(tok, two_files, tmp_path):
    teacher = tiny_model("llama", 0)
    mix = DataMix.of([two_files[0], "teacher:6"], "0.6,0.4")
    cfg = DistillConfig(steps=6, batch_size=2, seq_len=SEQ, lr=3e-3, warmup_steps=1, eval_every=3,
                        checkpoint_every=2, eval_samples=2)
    cache = tmp_path / "generated"
    train, _, info = mix_blocks(mix, tok, 12, SEQ, seed=0, model=teacher, cache_dir=cache)
    assert [i["blocks"] for i in info] == [7, 5]
    held = train[:2]
    full = tiny_model("llama", 1)
    distill(teacher, full, train, held, cfg, tmp_path / "a")
    ref = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if not r.get("eval")}
    stops = iter([False] * 2 + [True])  # cancel after step 3
    out = distill(teacher, tiny_model("llama", 1), train, held, cfg, tmp_path / "b",
                  should_stop=lambda: next(stops, True))
    assert out["stopped"] and out["steps"] == 3
    # the resumed job rebuilds its blocks: the teacher text comes back from the run folder's cache
    rebuilt, _, _ = mix_blocks(mix, tok, 12, SEQ, seed=0, model=None, cache_dir=cache)
    assert torch.equal(rebuilt, train)
    out = distill(teacher, tiny_model("llama", 5), rebuilt, held, cfg, tmp_path / "b")
    got = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if not r.get("eval")}
    assert sorted(got) == list(range(1, 7))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k


@pytest.mark.slow
def test_pipeline_on_a_mix_reports_each_source(tmp_path, corpus, tiny_llama_pair, monkeypatch):
    """prune + distill on 70% file + 30% teacher text: calibration and training take each source's
    share, summary.json and eval_sources.jsonl hold perplexity and KL per source and for breadth."""
    from engine.jobs import execute
    from engine.pipeline import PipelineConfig, create_run
    from engine.runs import Run, read_json

    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    mix = DataMix.of([str(corpus), "teacher"], "0.7,0.3")
    cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=mix.to_config(), calib_samples=10, calib_seq_len=32,
                         targets={"ffn": 24, "layers": 3}, eval_samples=3,
                         distill=DistillConfig(steps=4, batch_size=5, seq_len=32, warmup_steps=1, eval_every=2,
                                               checkpoint_every=2, eval_samples=3))
    run = create_run(tmp_path / "run", cfg)
    assert execute(run.path) == "done", (run.path / "job.log").read_text()[-2000:]
    s = read_json(run.path / "summary.json")
    assert [m["blocks"] for m in s["calib_mix"]] == [7, 3]
    assert [m["tokens"] for m in s["data_mix"]] == [14 * 32, 6 * 32]  # 4 steps x 5 blocks
    assert "70%" in s["data"] and "teacher-generated" in s["data"]
    per = s["eval_sources"]
    assert list(per) == ["corpus.txt", "breadth"]
    assert per["corpus.txt"]["ppl_one_shot"] == s["ppl_one_shot"]
    for row in per.values():
        assert {"ppl_one_shot", "kl_one_shot", "ppl_distilled", "kl_distilled", "ppl_teacher"} <= set(row)
    rows = read_jsonl(run.path / "eval_sources.jsonl")
    assert sorted({(r["step"], r["source"]) for r in rows}) == [(st, n) for st in (0, 2, 4)
                                                                 for n in ("breadth", "corpus.txt")]
    assert per["breadth"]["kl_distilled"] == next(r["kl"] for r in rows if r["step"] == 4 and r["source"] == "breadth")
    assert len(list((run.path / "generated").glob("teacher-*.json"))) == 2  # training and breadth texts
    assert Run(run.path).status()["state"] == "done"
    card = (run.path / "model" / "README.md").read_text()  # the model card carries the same numbers per source
    assert "## Quality (held-out text)" in card and f"| perplexity | {s['ppl_teacher']:.2f} |" in card
    for name, row in per.items():
        assert f"| {name} | {row['ppl_teacher']:.2f} | {row['ppl_one_shot']:.2f} | {row['ppl_distilled']:.2f} |" in card


@pytest.mark.slow
def test_calibration_data_of_its_own_scores_on_it_while_training_mixes(tmp_path, corpus, tiny_llama_pair,
                                                                      monkeypatch):
    """calib_data = the file, data = 70% file + 30% teacher text (the Distill page with a teacher share):
    the run's scores are those of the file alone (the Importance page's), training still mixes."""
    from engine.data import DataSource
    from engine.importance import Scores, score, score_config_for
    from engine.jobs import execute
    from engine.models import load
    from engine.pipeline import PipelineConfig, create_run
    from engine.runs import read_json

    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    mix = DataMix.of([str(corpus), "teacher"], "0.7,0.3")
    cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=mix.to_config(), calib_data=str(corpus),
                         calib_samples=10, calib_seq_len=32, targets={"ffn": 24}, eval_samples=3,
                         distill=DistillConfig(steps=2, batch_size=5, seq_len=32, warmup_steps=1, eval_every=2,
                                               checkpoint_every=2, eval_samples=3))
    assert PipelineConfig.from_dict(cfg.to_dict()).calib_data == str(corpus)
    run = create_run(tmp_path / "run", cfg)
    assert execute(run.path) == "done", (run.path / "job.log").read_text()[-2000:]
    s = read_json(run.path / "summary.json")
    assert "calib_mix" not in s and [m["tokens"] for m in s["data_mix"]] == [7 * 32, 3 * 32]
    teacher = load(cfg.model, dtype=cfg.dtype, device=cfg.device)  # as the job loads it
    alone, _ = score(teacher, DataSource.parse(str(corpus), docs=cfg.train_range), 10, 32, seed=0,
                     config=score_config_for(cfg.targets.depth_by, 0))
    got = Scores.load(run.path / "scores")
    assert got.meta["data"] == alone.meta["data"]
    for k, v in alone.tensors.items():
        assert torch.equal(got.tensors[k], v), k


def test_cli_repeated_data_and_mix_build_the_configs_mix(tmp_path, two_files):
    from engine.cli import build_parser
    from engine.pipeline import PipelineConfig

    def cfg(*argv: str) -> PipelineConfig:
        args = build_parser().parse_args(["distill", "--student", "s", "--run-dir", str(tmp_path), *argv])
        return PipelineConfig(student="s", data=args.data)

    assert cfg().data == "generated" and cfg("--data", two_files[0]).data == two_files[0]
    got = cfg("--mix", "3,1", "--data", two_files[0], "--data", "teacher:0:0.7").data
    assert got == [{"data": two_files[0], "weight": 0.75}, {"data": "teacher:0:0.7", "weight": 0.25}]
    assert cfg("--data", "a.txt", "--data", "b.txt").data == [{"data": "a.txt", "weight": 0.5},
                                                              {"data": "b.txt", "weight": 0.5}]
    assert PipelineConfig.from_dict(PipelineConfig(data=got).to_dict()).data == got
    with pytest.raises(DataError, match="2 weights for 3"):
        cfg("--data", "a", "--data", "b", "--data", "c", "--mix", "0.5,0.5")
    run = build_parser().parse_args(["run", "--ffn", "8", "--run-dir", str(tmp_path), "--data", two_files[0], "--data", "teacher", "--mix",
                                     "0.7,0.3", "--calib-data", two_files[0]])
    assert run.calib_data == two_files[0] and len(run.data) == 2


@pytest.mark.slow
def test_pipeline_on_a_mix_resumes_with_the_same_data_from_its_cache(tmp_path, corpus, tiny_llama_pair, monkeypatch):
    """Cancelled during distillation and resumed, a pipeline on a mix repeats the uninterrupted run's
    losses step for step; the resumed process takes the teacher's text from the run folder (generating
    it again would fail here)."""
    import engine.prompts
    from engine.errors import Cancelled
    from engine.pipeline import PipelineConfig, create_run, run_pipeline

    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=DataMix.of([str(corpus), "teacher"], "0.5,0.5").to_config(),
                         calib_samples=4, calib_seq_len=32, targets={"ffn": 24}, eval_samples=2,
                         distill=DistillConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1, eval_every=3,
                                               checkpoint_every=2, eval_samples=2))

    def losses(path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(path / "metrics.jsonl") if not r.get("eval")}

    ref = create_run(tmp_path / "a", cfg)
    run_pipeline(ref.path)
    run = create_run(tmp_path / "b", cfg)
    stop = lambda: len(losses(run.path)) >= 3  # noqa: E731 - cancel after step 3 (checkpoint at step 4)
    with pytest.raises(Cancelled):
        run_pipeline(run.path, stop)
    assert 3 <= len(losses(run.path)) < 6

    def no_generation(*a, **k):
        raise AssertionError("the resumed job generated teacher text again")

    monkeypatch.setattr(engine.prompts, "generate_prompted", no_generation)
    run_pipeline(run.path)
    want, got = losses(ref.path), losses(run.path)
    assert sorted(got) == list(range(1, 7))
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
