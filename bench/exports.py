"""Exports in other tools, measured on the built-in SmolLM2-135M: GGUF sizes and logit differences per
type, and lm-evaluation-harness scores on the local tasks next to prunescope's own perplexity.

    .venv/bin/python bench/exports.py --gguf            # GGUF: source and a hidden-516 pruned shape
    .venv/bin/python bench/exports.py --lm-eval --limit 8 [--student DIR ...]   # teacher and students

Results go to docs/quality/exports.json (merged per part) and are copied by hand into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from engine.data import DataSource, load_documents, make_blocks, tokenize_documents
from engine.evaluate import perplexity
from engine.export import export_model
from engine.models import builtin_model_dir, count_parameters, load
from engine.paths import SHARED_WIKITEXT

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "docs" / "quality" / "exports.json"


def gguf_part(tmp: Path) -> dict:
    """Sizes and reload differences of each GGUF type for the source and a pruned shape."""
    from engine.gguf_export import export_gguf
    from engine.plan import make_plan
    from engine.prune import apply_plan
    from engine.targets import Targets

    sys.path.insert(0, str(ROOT / "tests"))
    from test_plan import fake_scores  # magnitude-free random scores: the shape is what matters here

    loaded = load("default", dtype="float32", device="cpu")
    rows = []
    shapes = {"source (hidden 576, 9 heads)": None,
              "pruned: hidden 516, 6 heads, ffn 1024, 20 layers": Targets(hidden=516, heads=6, ffn=1024, layers=20)}
    for label, targets in shapes.items():
        model = loaded.model
        if targets is not None:
            model = apply_plan(model, make_plan(fake_scores(model), targets))
        folder = export_model(model, loaded.tokenizer, tmp / label.split(":")[0].split(" ")[0], verify=False,
                              force=True)
        for t in ("f32", "f16", "q8_0"):
            t0 = time.time()
            info = export_gguf(folder, t)
            c = info["check"]
            rows.append({"shape": label, "params": count_parameters(model), "type": t, "bytes": info["bytes"],
                         "safetensors_bytes": info["safetensors_bytes"], "tensor_types": info["tensor_types"],
                         "max_abs_diff": c["max_abs_diff"], "rel_diff": c["rel_diff"],
                         "argmax_agreement": c["argmax_agreement"], "passed": c["passed"],
                         "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]))
            Path(info["path"]).unlink()
    return {"gguf": rows}


def lm_eval_part(limit: int, max_length: int, words: int, students: list[Path]) -> dict:
    """The teacher and each student folder on the local tasks (held-out WikiText-2 articles), with
    prunescope's perplexity on the same text."""
    from engine.lm_eval_tasks import LASTWORD_TASK, PPL_TASK, run_lm_eval, write_local_tasks

    source = DataSource.parse(str(SHARED_WIKITEXT), docs=(0.6, 1.0))
    docs = [" ".join(d.split()[:words]) for d in load_documents(source) if d.strip()][:limit]  # CPU budget
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_local_tasks(docs, tmp, source.label)
        for name, folder in [("teacher", builtin_model_dir()), *((f.name, f) for f in students)]:
            t0 = time.time()
            res = run_lm_eval(str(folder), [PPL_TASK, LASTWORD_TASK], Path(tmp), limit=limit,
                              max_length=max_length)["results"]
            out[name] = own_perplexity(str(folder), docs, res, max_length, PPL_TASK)
            out[name].update(model=str(folder), lm_eval_seconds=round(time.time() - t0))
            print(json.dumps({name: out[name]}, indent=1), flush=True)
    teacher = out.pop("teacher")
    return {"lm_eval": teacher, **({"lm_eval_students": out} if out else {})}


def own_perplexity(folder: str, docs: list[str], res: dict, max_length: int, ppl_task: str) -> dict:
    """lm-eval's word perplexity converted to tokens, beside prunescope's perplexity of the same model on
    the same texts (blocks of 128 and of the lm-eval window + 1)."""
    from engine.devices import compute_dtype
    from engine.lm_eval_tasks import count_words, token_ppl

    loaded = load(folder, dtype="float32", device="cpu")
    tok = loaded.tokenizer
    n_words = sum(count_words(d) for d in docs)
    tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    wp = res[ppl_task]["word_perplexity,none"]
    stream = tokenize_documents(docs, tok)
    own = {}
    for seq in sorted({128, max_length + 1}):
        n = stream.numel() // seq
        with torch.inference_mode(), compute_dtype("float32"):  # lm-eval computes in fp32 too
            own[seq] = perplexity(loaded.model, make_blocks(stream, n, seq), batch_size=2 if seq > 256 else 8)
    return {"documents": len(docs), "words": n_words, "tokens": tokens, "lm_eval": res,
            "token_ppl_from_words": token_ppl(wp, n_words, tokens), "prunescope_ppl": own,
            "max_length": max_length, "ratio_same_window": token_ppl(wp, n_words, tokens) / own[max_length + 1],
            "ratio_128": token_ppl(wp, n_words, tokens) / own[128]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", action="store_true")
    p.add_argument("--lm-eval", action="store_true")
    p.add_argument("--limit", type=int, default=8, help="held-out articles for lm-eval")
    p.add_argument("--max-length", type=int, default=256, help="lm-eval context (prunescope blocks of this + 1)")
    p.add_argument("--words", type=int, default=600, help="first words of each article (CPU budget)")
    p.add_argument("--student", type=Path, action="append", default=[], metavar="DIR",
                   help="an exported student folder scored beside the teacher (repeatable)")
    a = p.parse_args()
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.gguf:
            data.update(gguf_part(Path(tmp)))
        if a.lm_eval:
            data.update(lm_eval_part(a.limit, a.max_length, a.words, a.student))
    data["machine"] = f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPU cores"
    OUT.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
