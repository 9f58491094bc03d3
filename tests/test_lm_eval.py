"""lm-evaluation-harness on exported models with local tasks (engine.lm_eval_tasks, `eval --tasks`).

lm-eval never reaches the network here: conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, and the
local tasks read a JSONL file through the `json` dataset builder."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny, tiny_tokenizer

from engine.cli import main
from engine.lm_eval_tasks import (
    LASTWORD_TASK,
    PPL_TASK,
    RESULT_FILE,
    count_words,
    lastword_items,
    run_lm_eval,
    token_ppl,
    write_local_tasks,
)

pytest.importorskip("lm_eval")

DOCS = [
    "The quick brown fox jumps over the lazy dog . Pruning removes heads and neurons from the model . "
    "Distillation teaches the small model from the large one.",
    "Paris is the capital of France . Water boils at one hundred degrees . The dog sleeps near the door !",
    "Heads , neurons and layers are scored first . The plan keeps the most important of them all . "
    "Then the weights are trimmed and the model is saved",
]


def test_lastword_items_follow_the_sentence_ends():
    items = lastword_items(DOCS)
    assert items[0] == {"context": DOCS[0][: DOCS[0].index(" one.")], "target": "one"}  # "word." at the end
    assert items[1]["target"] == "door" and items[1]["context"].endswith("The dog sleeps near the")  # "word !"
    assert items[2]["target"] == "all" and items[2]["context"].endswith("important of them")  # last "word ."
    assert lastword_items(["too short ."]) == []


def test_local_task_files(tmp_path):
    counts = write_local_tasks(DOCS, tmp_path, "test docs")
    assert counts == {PPL_TASK: 3, LASTWORD_TASK: 3}
    rows = [json.loads(x) for x in (tmp_path / f"{PPL_TASK}.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == DOCS
    assert "output_type: loglikelihood_rolling" in (tmp_path / f"{PPL_TASK}.yaml").read_text()


def _loglik(model, ids: list[int], prefix: list[int]) -> tuple[float, bool]:
    """Sum of log p(ids | prefix + earlier ids), and whether every token is the greedy choice."""
    x = torch.tensor([prefix + ids])
    with torch.no_grad():
        logp = F.log_softmax(model(x).logits[0, len(prefix) - 1: -1].double(), -1)
    tgt = torch.tensor(ids)
    return logp.gather(1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())


def test_lm_eval_scores_equal_a_direct_computation(tmp_path):
    """The hf backend on a saved tiny model gives exactly the log-likelihoods computed here by hand:
    word perplexity over whole documents after the BOS token, and LAMBADA-style last-word accuracy."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny("llama", tmp_path / "model")
    write_local_tasks(DOCS, tmp_path / "tasks", "test docs")
    r = run_lm_eval(str(folder), [PPL_TASK, LASTWORD_TASK], tmp_path / "tasks")["results"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = tiny_tokenizer()
    bos = [tok.bos_token_id]
    total = sum(_loglik(model, tok(d, add_special_tokens=False)["input_ids"], bos)[0] for d in DOCS)
    words = sum(count_words(d) for d in DOCS)
    assert r[PPL_TASK]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    lls, hits = [], []
    for it in lastword_items(DOCS):
        ctx = tok(it["context"], add_special_tokens=False)["input_ids"]
        whole = tok(it["context"] + " " + it["target"], add_special_tokens=False)["input_ids"]
        ll, greedy = _loglik(model, whole[len(ctx):], ctx)
        lls.append(ll)
        hits.append(greedy)
    assert r[LASTWORD_TASK]["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert r[LASTWORD_TASK]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_token_ppl_conversion():
    # 10 words, 25 tokens, word perplexity e^5: total NLL 50 nats -> per token 2 -> e^2
    assert token_ppl(math.exp(5), 10, 25) == pytest.approx(math.exp(2))


def test_cli_eval_tasks_side_by_side(tmp_path, capsys, tiny_llama_pair):
    from transformers import AutoModelForCausalLM

    from dashboard.exports import lm_eval_frame
    from engine.export import export_model

    teacher, plain = tiny_llama_pair
    student = export_model(AutoModelForCausalLM.from_pretrained(plain), tiny_tokenizer(), tmp_path / "export",
                           verify=False)  # a prunescope export: the results are recorded in it
    data = tmp_path / "docs.txt"
    data.write_text("".join(f" = Doc {i} = \n\n {d}\n\n" for i, d in enumerate(DOCS)))
    rc = main(["eval", str(student), "--teacher", str(teacher), "--data", str(data), "--data-range", "0:1",
               "--tasks", f"{PPL_TASK},{LASTWORD_TASK}", "--limit", "2", "--json", str(tmp_path / "r.json"),
               "--device", "cpu", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0 and "word perplexity" in out and "last-word accuracy" in out and "model/teacher" in out
    assert "token perplexity (from words)" in out and f"{PPL_TASK}: 2 documents" in out
    res = json.loads((tmp_path / "r.json").read_text())
    m, t = (res["results"][k][PPL_TASK]["word_perplexity,none"] for k in ("model", "teacher"))
    assert m != t and m > 1 and t > 1  # two different random models, scored separately
    assert json.loads((student / RESULT_FILE).read_text())["results"] == res["results"]
    card = (student / "README.md").read_text()
    assert "## lm-evaluation-harness" in card and f"teacher ({teacher})" in card and "| last-word accuracy |" in card
    rows = lm_eval_frame(student)  # what Compare shows
    assert {r["metric"] for r in rows} >= {"word perplexity", "last-word accuracy", "token perplexity (from words)"}
    assert not (plain / RESULT_FILE).exists()


def test_cli_eval_tasks_refusals(tmp_path, capsys, tiny_llama_pair):
    _, student = tiny_llama_pair
    assert main(["eval", str(student), "--tasks", PPL_TASK]) == 2
    assert "built from --data" in capsys.readouterr().err
    data = tmp_path / "d.txt"
    data.write_text(DOCS[0])
    assert main(["eval", str(student), "--tasks", "no_such_task_xyz", "--data", str(data), "--data-range", "0:1"]) == 2
    assert "unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err
    assert main(["eval", str(student)]) == 2
    assert "--data is required" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_model_agrees_with_prunescope_perplexity(wikitext, tmp_path):
    """SmolLM2-135M on held-out WikiText passages shorter than lm-eval's window: lm-eval's word
    perplexity, converted to tokens, equals prunescope's perplexity (engine.evaluate.perplexity) of
    each passage as one block after the BOS token. (On blocks cut from passages joined with EOS, as
    `prunescope eval` does, the two differ by where windows start: see BENCHMARKS.)"""
    from engine.data import DataSource, load_documents
    from engine.devices import compute_dtype
    from engine.evaluate import perplexity
    from engine.models import builtin_model_dir, load

    docs = [" ".join(d.split()[:120]) for d in load_documents(DataSource.parse(str(wikitext), docs=(0.6, 1)))][:3]
    write_local_tasks(docs, tmp_path, "wikitext held-out")
    r = run_lm_eval(str(builtin_model_dir()), [PPL_TASK, LASTWORD_TASK], tmp_path, max_length=256)["results"]
    builtin = load("default", dtype="float32", device="cpu")  # as lm-eval loads it (the fixture may be bf16)
    tok = builtin.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, tokens = 0.0, 0
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        assert len(ids) < 256  # one lm-eval window per passage
        with compute_dtype("float32"):  # no bf16 autocast: lm-eval computes in fp32
            nll += math.log(perplexity(builtin.model, torch.tensor([[prefix] + ids]))) * len(ids)
        tokens += len(ids)
    converted = token_ppl(r[PPL_TASK]["word_perplexity,none"], sum(count_words(d) for d in docs), tokens)
    assert converted == pytest.approx(math.exp(nll / tokens), rel=1e-3)
    assert 0 <= r[LASTWORD_TASK]["acc,none"] <= 1 and r[LASTWORD_TASK]["perplexity,none"] > 1
