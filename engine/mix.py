"""Data mixes: several text sources with weights, cut into blocks that honour the weights.

A mix is any number of sources the product reads (a file, `hf:...`, `generated[:N]`, or
`teacher[:N[:T[:FILE]]]` for teacher-generated text, see engine.prompts), each with a weight.
Written as repeated `--data` with `--mix 0.7,0.3`, or as `mix:FILE` where FILE lists one
`WEIGHT SPEC` per line (or is JSON: [{"data": SPEC, "weight": W}, ...]). In a run's config.json,
`data` holds a single spec (a string) or that list.

`mix_blocks` takes round(weight x N) blocks from each source (largest remainders, so each count is
within one block of its share) from the seed alone, so a resumed run rebuilds exactly the same
blocks; each block's source is returned with it. `eval_sets` builds the held-out set of every
source plus the "breadth" set of teacher text from prompts never used for training.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.data import DataSource, load_documents, make_blocks, tokenize_documents
from engine.errors import DataError
from engine.progress import Progress
from engine.prompts import TeacherText, cached_teacher_text, is_teacher_spec
from engine.textcheck import check_token_ratio

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BREADTH = "breadth"  # the name of the teacher-text evaluation set


@dataclass(frozen=True)
class DataMix:
    """Sources and their weights (normalised to sum to 1)."""

    specs: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.specs:
            raise DataError("a data mix needs at least one source")
        if len(self.specs) != len(self.weights):
            raise DataError(f"--mix has {len(self.weights)} weights for {len(self.specs)} --data sources; "
                            "give one weight per source, e.g. --mix 0.7,0.3")
        if any(not math.isfinite(w) or w <= 0 for w in self.weights):
            raise DataError(f"mix weights must be positive numbers, got {list(self.weights)}")
        total = sum(self.weights)
        object.__setattr__(self, "weights", tuple(w / total for w in self.weights))

    @classmethod
    def of(cls, data: str | list | tuple | DataMix, weights: str | list | tuple | None = None) -> DataMix:
        """From a config value (a spec string, `mix:FILE`, or a list of {"data", "weight"}), or from
        CLI lists: several specs with `weights` ("0.7,0.3" or numbers; None: equal shares)."""
        if isinstance(data, DataMix):
            return data
        if isinstance(data, dict):  # the CLI's repeated --data and --mix (engine.commands.distill)
            return cls.of(list(data.get("specs") or []), data.get("weights"))
        if isinstance(data, str):
            if data.startswith("mix:"):
                return cls.read(data[4:])
            if weights is None:
                return cls((data,), (1.0,))
            data = [data]
        specs, ws = [], []
        for item in data:
            if isinstance(item, dict):
                specs.append(str(item.get("data") or ""))
                ws.append(float(item.get("weight", 1.0)))
            else:
                specs.append(str(item))
        if ws and weights is None:
            return cls(tuple(specs), tuple(ws))
        if isinstance(weights, str):
            try:
                weights = [float(x) for x in weights.split(",") if x.strip()]
            except ValueError:
                raise DataError(f"--mix takes comma-separated weights, e.g. 0.7,0.3; got {weights!r}") from None
        if any(not s for s in specs):
            raise DataError("a data mix source is empty; give a file, hf:NAME, generated[:N] or teacher[:N]")
        return cls(tuple(specs), tuple(weights) if weights else tuple(1.0 for _ in specs))

    @classmethod
    def read(cls, path: str | Path) -> DataMix:
        """A mix file: JSON [{"data": SPEC, "weight": W}, ...] or lines `WEIGHT SPEC` (# comments)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"mix file not found: {p} (lines of `WEIGHT SPEC`, e.g. `0.7 wiki.train.raw`)")
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                return cls.of(json.loads(text))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise DataError(f"{p}: not a JSON list of {{\"data\": SPEC, \"weight\": W}} ({e})") from None
        specs, ws = [], []
        for i, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            w, _, spec = line.partition(" ")
            try:
                ws.append(float(w))
            except ValueError:
                raise DataError(f"{p}: line {i} should read `WEIGHT SPEC`, e.g. `0.3 teacher`; got {line!r}") from None
            specs.append(spec.strip())
        return cls.of(specs, ws)

    def to_config(self) -> str | list[dict]:
        """What config.json stores: the spec alone for one source, else the list with weights."""
        if len(self.specs) == 1:
            return self.specs[0]
        return [{"data": s, "weight": round(w, 6)} for s, w in zip(self.specs, self.weights, strict=True)]

    @property
    def needs_model(self) -> bool:
        """Whether a source is written by the model (generated or teacher text)."""
        return any(s.startswith("generated") or is_teacher_spec(s) for s in self.specs)

    @property
    def label(self) -> str:
        return " + ".join(f"{w:.0%} {source_label(s)}" for s, w in zip(self.specs, self.weights, strict=True))

    def counts(self, n_blocks: int) -> list[int]:
        """Blocks per source: the largest-remainder split of n_blocks by weight (each within one block)."""
        exact = [w * n_blocks for w in self.weights]
        counts = [int(math.floor(x)) for x in exact]
        by_rest = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_rest[: n_blocks - sum(counts)]:
            counts[i] += 1
        return counts


def source_label(spec: str, column: str | None = None) -> str:
    """How one source of a mix is shown (model- and teacher-written text always say so)."""
    if is_teacher_spec(spec):
        return TeacherText.parse(spec).label
    return DataSource.parse(spec, column=column).label


def source_name(spec: str) -> str:
    """A short name for charts and metrics rows: the file name, hf dataset, `generated` or `teacher`."""
    if is_teacher_spec(spec):
        return "teacher"
    if spec.startswith("generated"):
        return "generated"
    if spec.startswith("hf:"):
        return spec.split(":")[1]
    return Path(spec).name


def source_stream(spec: str, part: str, docs: tuple[float, float], tokenizer, need_tokens: int, seed: int,
                  model=None, column: str | None = None, cache_dir: str | Path | None = None,
                  model_name: str = "", progress: Progress | None = None) -> torch.Tensor:
    """One source's token stream for `part` ("train" / "eval"): the `docs` range of a file or dataset,
    or teacher text from that part's prompts (enough documents for `need_tokens` when N is not set)."""
    if is_teacher_spec(spec):
        src = TeacherText.parse(spec)
        n = src.n_docs or max(1, math.ceil(need_tokens / max(1, src.new_tokens) * 1.25))
        texts = cached_teacher_text(src, part, n, seed, model, tokenizer, cache_dir, model_name, progress)
        return tokenize_documents(texts, tokenizer)
    src = DataSource.parse(spec, column=column, docs=docs)
    texts = load_documents(src, model=model, tokenizer=tokenizer, seed=seed, progress=progress)
    if not texts:
        raise DataError(f"{src.label} selects no documents")
    stream = tokenize_documents(texts, tokenizer)
    if src.kind != "generated":  # as get_blocks: a file or dataset must read as text
        check_token_ratio(stream.numel(), sum(len(d.encode()) for d in texts), tokenizer, src.label)
    return stream


def mix_blocks(mix: DataMix, tokenizer, n_blocks: int, seq_len: int, seed: int, *, docs=(0.0, 1.0),
               part: str = "train", model=None, column: str | None = None, cache_dir: str | Path | None = None,
               model_name: str = "", up_to: bool = True,
               progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(N, seq_len) blocks of the mix, the (N,) source index of each block, and per source
    {"data", "name", "weight", "blocks", "tokens"}. Deterministic for a seed. With `up_to`, a short
    source lowers N for every source so that the weights still hold; otherwise it is a DataError."""
    import torch

    streams, counts = [], mix.counts(n_blocks)
    for i, (spec, k) in enumerate(zip(mix.specs, counts, strict=True)):
        streams.append(source_stream(spec, part, docs, tokenizer, max(k, 1) * seq_len, seed + 7919 * i, model,
                                     column, cache_dir, model_name, progress))
    avail = [s.numel() // seq_len for s in streams]
    short = [i for i, (a, k) in enumerate(zip(avail, counts, strict=True)) if a < k]
    if short:
        fit = min(int(a / w) for a, w in zip(avail, mix.weights, strict=True))
        if not up_to or fit < 1:
            i = short[0]
            raise DataError(f"{source_label(mix.specs[i], column)} has {avail[i]} blocks of {seq_len} tokens; "
                            f"its {mix.weights[i]:.0%} share of {n_blocks} blocks needs {counts[i]}. Use more "
                            "text, fewer steps or a smaller share.")
        log.warning("data mix: a source is short; taking %d blocks instead of %d to keep the weights", fit, n_blocks)
        counts = mix.counts(fit)
    blocks, owner, info = [], [], []
    for i, (spec, s, k) in enumerate(zip(mix.specs, streams, counts, strict=True)):
        if k:
            blocks.append(make_blocks(s, k, seq_len, seed + 7919 * i, what=source_label(spec, column)))
            owner.append(torch.full((k,), i, dtype=torch.long))
        info.append({"data": spec, "name": source_name(spec), "weight": mix.weights[i], "blocks": k,
                     "tokens": k * seq_len})
    return torch.cat(blocks), torch.cat(owner), info


def eval_sets(mix: DataMix, tokenizer, n_blocks: int, seq_len: int, seed: int, *, docs=(0.6, 1.0),
              breadth: str | None = "teacher", model=None, column: str | None = None,
              cache_dir: str | Path | None = None, model_name: str = "") -> dict[str, torch.Tensor]:
    """Held-out blocks of every source of the mix (its `docs` range; teacher text from the evaluation
    prompts), plus `breadth`: teacher text from the evaluation prompts (None: no breadth set).
    Names are source_name()s, made unique; up to n_blocks blocks each."""
    specs = list(mix.specs)
    if breadth and not any(is_teacher_spec(s) for s in specs):
        specs.append(breadth)
    out: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(specs):
        name = BREADTH if is_teacher_spec(spec) else source_name(spec)
        while name in out:
            name += "'"
        s = source_stream(spec, "eval", docs, tokenizer, n_blocks * seq_len, seed + 7919 * i, model, column,
                          cache_dir, model_name)
        k = min(n_blocks, s.numel() // seq_len)
        if k < 1:
            raise DataError(f"{source_label(spec, column)} has {s.numel()} held-out tokens: not one block of {seq_len}")
        out[name] = make_blocks(s, k, seq_len, seed, what=source_label(spec, column))
    return out


def evaluate_sources(teacher, student, sets: dict[str, torch.Tensor], batch_size: int = 8,
                     temperature: float = 1.0) -> dict[str, dict]:
    """Perplexity, KL and the teacher's perplexity on each evaluation set, each evaluated alone:
    {name: {"ppl", "kl", "teacher_ppl", "tokens"}}."""
    from engine.evaluate import evaluate_student

    out = {}
    for name, blocks in sets.items():
        r = evaluate_student(teacher, student, blocks, batch_size, temperature)
        out[name] = {**r, "tokens": int(blocks.numel())}
    return out
