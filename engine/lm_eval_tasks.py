"""lm-evaluation-harness on exported models, with local tasks that need no download.

`write_local_tasks(docs, folder)` turns the documents prunescope already reads (a local file or a
Hugging Face dataset, after `--data-range`) into lm-eval task definitions (YAML + a JSONL file that
lm-eval's `json` dataset builder reads offline):

- `prunescope_ppl`: word perplexity of whole documents (`loglikelihood_rolling`, as lm-eval's
  `wikitext` task), also byte perplexity and bits per byte;
- `prunescope_lastword`: LAMBADA-style last-word prediction: a passage of up to 200 words ending a
  sentence, the model sees all but its last word and must give that word; accuracy = the word is
  the greedy continuation, perplexity over the target words.

`run_lm_eval(path, tasks, ...)` runs lm-eval's Hugging Face backend (`model="hf"`) on a model folder.

How the numbers relate to prunescope's own perplexity (engine.evaluate.perplexity): both are
exp(mean negative log-likelihood), but lm-eval divides by *words* (whitespace-separated, its
`count_words`) and prunescope by *tokens*; `token_ppl(word_ppl, words, tokens)` converts:
exp(ln(word_ppl) x words / tokens). The contexts differ too: lm-eval scores each document on its own
in windows of `max_length` predicted tokens (the first after the BOS token, each later one seeing
only the token before it plus its own), while prunescope scores blocks of `--seq-len` tokens cut
from all documents joined with EOS (S - 1 predictions per block, across document boundaries, the
joining EOS tokens included, the remainder dropped). With max_length = S - 1 the windows are the
same size; what remains is where the windows start.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from engine.errors import DataError, UserError

log = logging.getLogger(__name__)

PPL_TASK = "prunescope_ppl"
LASTWORD_TASK = "prunescope_lastword"
LOCAL_TASKS = (PPL_TASK, LASTWORD_TASK)
RESULT_FILE = "prunescope_lm_eval.json"
CARD_HEADING = "## lm-evaluation-harness"
MAX_PASSAGE_WORDS = 200
# (metric key in lm-eval's results, label, lower is better)
METRICS = {PPL_TASK: [("word_perplexity,none", "word perplexity", True),
                      ("byte_perplexity,none", "byte perplexity", True),
                      ("bits_per_byte,none", "bits per byte", True)],
           LASTWORD_TASK: [("acc,none", "last-word accuracy", False),
                           ("perplexity,none", "target perplexity", True)]}

_PPL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

_LASTWORD_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word perplexity (its Task.count_words)."""
    return len(re.split(r"\s+", text))


def lastword_items(docs: list[str], max_words: int = MAX_PASSAGE_WORDS) -> list[dict]:
    """One passage per document: up to `max_words` words from its start, cut after the last sentence
    that ends in a plain word followed by '.', '!' or '?'; context = all but that word."""
    items = []
    for doc in docs:
        words = doc.split()[:max_words]
        for end in range(len(words) - 1, 0, -1):
            w = words[end]
            if w in (".", "!", "?") and _WORD.match(words[end - 1]):  # WikiText spacing: "word ."
                target, ctx = words[end - 1], words[: end - 1]
            elif w[-1:] in ".!?" and _WORD.match(w[:-1]):
                target, ctx = w[:-1], words[:end]
            else:
                continue
            if len(ctx) >= 8:
                items.append({"context": " ".join(ctx), "target": target})
            break
    return items


def write_local_tasks(docs: list[str], folder: str | Path, label: str = "") -> dict:
    """Write both local tasks for these documents into `folder`; returns {task: number of items}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{label or 'the data'} selects no documents to build the local lm-eval tasks from")
    items = lastword_items(docs)
    if not items:
        raise DataError(f"{label or 'the data'} has no passage ending in a word and '.', '!' or '?' for the "
                        "last-word task")
    for name, rows, yaml in ((PPL_TASK, [{"text": d} for d in docs], _PPL_YAML),
                             (LASTWORD_TASK, items, _LASTWORD_YAML)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(yaml.format(name=name, data=json.dumps(str(data.resolve()))))
    (folder / "source.json").write_text(json.dumps({"data": label, "documents": len(docs),
                                                    "lastword_items": len(items)}, indent=2))
    return {PPL_TASK: len(docs), LASTWORD_TASK: len(items)}


def parse_tasks(text: str) -> list[str]:
    """`--tasks T1,T2` -> names (local ones and any lm-eval registry task)."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks needs task names separated by commas, e.g. {','.join(LOCAL_TASKS)}; got {text!r}")
    return tasks


def token_ppl(word_ppl: float, words: int, tokens: int) -> float:
    """lm-eval's word perplexity as a per-token perplexity over the same text: exp(ln(ppl) x words / tokens)."""
    return math.exp(math.log(word_ppl) * words / tokens)


def run_lm_eval(pretrained: str, tasks: list[str], task_dir: Path | None = None, limit: int | None = None,
                device: str = "cpu", dtype: str = "float32", batch_size: int = 1,
                max_length: int | None = None) -> dict:
    """lm-eval's Hugging Face backend on a model folder: {task: {metric: value}} plus the sample counts.

    max_length: the context lm-eval gives the model (default: the model's own, e.g. 8192 for SmolLM2).
    Word perplexity scores a document in windows of max_length predicted tokens (see the module
    docstring), like prunescope's perplexity on blocks of max_length + 1 tokens."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed: pip install 'prunescope[eval]' "
                        "(or pip install lm-eval)") from None
    tm = TaskManager(include_path=str(task_dir)) if task_dir else TaskManager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        local = f"; the local tasks ({', '.join(LOCAL_TASKS)}) need --data" if task_dir is None else ""
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}{local}; local tasks: {', '.join(LOCAL_TASKS)}, "
                        "or any task `lm_eval --tasks list` shows")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": pretrained, "dtype": dtype, "trust_remote_code": False,
                                **({"max_length": max_length} if max_length else {})},
        tasks=tasks, task_manager=tm, limit=limit, device=device, batch_size=batch_size, log_samples=False,
        bootstrap_iters=0)
    res = {t: {k: v for k, v in out["results"].get(t, {}).items() if isinstance(v, (int, float))} for t in tasks}
    return {"results": res, "n_samples": {t: (out.get("n-samples") or {}).get(t, {}) for t in tasks},
            "versions": {t: (out.get("versions") or {}).get(t) for t in tasks},
            "lm_eval_version": getattr(lm_eval, "__version__", "?")}


# ---------------------------------------------------------------- `prunescope eval --tasks`


def _spec_path(spec: str) -> str:
    from engine.models import resolve_spec

    return resolve_spec(spec)[0]


def run_tasks(args, out=log.info) -> int:
    """`prunescope eval MODEL [--teacher T] --tasks T1,T2 [--limit N] [--data D]`: lm-eval on the model
    and the teacher, side by side; `out` receives the lines to show (the CLI passes print)."""
    import tempfile

    from engine.devices import resolve_device, resolve_dtype

    tasks = parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be at least 2 tokens, got {args.max_length}")
    local = [t for t in tasks if t in LOCAL_TASKS]
    if local and not args.data:
        raise UserError(f"the local tasks {', '.join(local)} are built from --data (a text file or "
                        "hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]); give it")
    dev = resolve_device(args.device)
    dtype = str(resolve_dtype(args.dtype, dev)).replace("torch.", "")
    models = {"model": args.model, **({"teacher": args.teacher} if args.teacher else {})}
    with tempfile.TemporaryDirectory(prefix="prunescope-lm-eval-") as tmp:
        docs, label = [], ""
        if args.data:
            docs, label = _documents(args)
            write_local_tasks(docs, tmp, label)
        results = {role: run_lm_eval(_spec_path(spec), tasks, Path(tmp) if args.data else None, args.limit,
                                     str(dev), dtype, batch_size=1, max_length=args.max_length)
                   for role, spec in models.items()}
    data = {"tasks": tasks, "limit": args.limit, "data": label, "dtype": dtype, "models": models,
            "max_length": args.max_length,
            "results": {role: r["results"] for role, r in results.items()},
            "lm_eval_version": results["model"]["lm_eval_version"]}
    if PPL_TASK in tasks:
        data["ppl_counts"] = _counts(docs[: args.limit] if args.limit else docs, _spec_path(args.model))
    for line in format_comparison(data):
        out(line)
    folder = Path(_spec_path(args.model))
    if (folder / "prunescope_export.json").is_file():
        record(folder, data)
        out(f"recorded in {folder / RESULT_FILE} and the model card")
    if args.json:
        from engine.fileio import write_json

        write_json(Path(args.json), data)
        out(f"wrote {args.json}")
    return 0


def _documents(args) -> tuple[list[str], str]:
    from engine.data import DataSource, load_documents, parse_doc_range

    source = DataSource.parse(args.data, column=args.text_column, docs=parse_doc_range(args.data_range))
    if source.kind == "generated":
        raise UserError("the local lm-eval tasks need real text (a file or hf:...), not generated data")
    return load_documents(source), source.label


def _counts(docs: list[str], tokenizer_path: str) -> dict:
    """Words (lm-eval's rule) and tokens (the model's tokenizer, no special tokens) of the scored documents."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    docs = [d.strip() for d in docs if d.strip()]
    return {"documents": len(docs), "words": sum(count_words(d) for d in docs),
            "tokens": sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)}


def comparison_rows(data: dict) -> list[dict]:
    """One row per (task, metric): the model's value, the teacher's, and model / teacher."""
    rows = []
    res = data["results"]
    for task in data["tasks"]:
        known = METRICS.get(task) or [(k, k.split(",")[0], None) for k in res["model"].get(task, {})
                                      if not k.startswith(("sample_len", "alias")) and "stderr" not in k]
        for key, label, lower in known:
            m = res["model"].get(task, {}).get(key)
            t = res.get("teacher", {}).get(task, {}).get(key)
            rows.append({"task": task, "metric": label, "model": m, "teacher": t, "lower_is_better": lower,
                         "ratio": m / t if m is not None and t else None})
    counts = data.get("ppl_counts")
    if counts and counts.get("tokens"):
        for row in [r for r in rows if r["task"] == PPL_TASK and r["metric"] == "word perplexity"]:
            conv = {k: token_ppl(row[k], counts["words"], counts["tokens"]) if row[k] else None
                    for k in ("model", "teacher")}
            rows.append({"task": PPL_TASK, "metric": "token perplexity (from words)", **conv, "lower_is_better": True,
                         "ratio": conv["model"] / conv["teacher"] if conv["model"] and conv["teacher"] else None})
    return rows


def format_comparison(data: dict) -> list[str]:
    """The side-by-side table as text lines."""
    from engine.evaluate import format_table

    def cell(v):
        return "-" if v is None else f"{v:.4g}"

    teacher = "teacher" in data["results"]
    table = [{"task": r["task"], "metric": r["metric"], "model": cell(r["model"]),
              **({"teacher": cell(r["teacher"]), "model/teacher": cell(r["ratio"])} if teacher else {})}
             for r in comparison_rows(data)]
    lines = [format_table(table)]
    if data.get("ppl_counts"):
        c = data["ppl_counts"]
        lines.append(f"{PPL_TASK}: {c['documents']} documents, {c['words']:,} words, {c['tokens']:,} tokens "
                     f"({c['tokens'] / max(c['words'], 1):.3f} tokens per word)")
    return lines


def record(folder: Path, data: dict) -> None:
    """Write the results into an export folder (prunescope_lm_eval.json) and its model card."""
    from engine.fileio import atomic_write_text, write_json
    from engine.roundtrip import replace_section

    write_json(folder / RESULT_FILE, data)
    card = folder / "README.md"
    if card.is_file():
        atomic_write_text(card, replace_section(card.read_text(encoding="utf-8"), CARD_HEADING, card_section(data)))


def card_section(data: dict) -> str:
    """The model card's lm-eval section: the side-by-side table in Markdown."""
    teacher = data["models"].get("teacher")
    head = "| task | metric | this model |" + (f" teacher ({teacher}) |" if teacher else "")
    lines = [CARD_HEADING, "", f"lm-evaluation-harness {data.get('lm_eval_version', '')}, Hugging Face backend, "
             f"{data.get('dtype')}; data: {data.get('data') or 'lm-eval registry'}"
             + (f"; at most {data['limit']} documents per task" if data.get("limit") else "") + ".", "",
             head, "|---|---|---|" + ("---|" if teacher else "")]
    for r in comparison_rows(data):
        v = "-" if r["model"] is None else f"{r['model']:.4g}"
        t = (" " + ("-" if r["teacher"] is None else f"{r['teacher']:.4g}") + " |") if teacher else ""
        lines.append(f"| {r['task']} | {r['metric']} | {v} |{t}")
    return "\n".join(lines) + "\n"
