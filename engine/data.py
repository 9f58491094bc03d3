"""Text sources -> fixed-length token blocks for calibration, distillation and evaluation.

Sources: a Hugging Face dataset, a local file (.txt, .jsonl, .parquet, .csv) or text the model
generates itself (for machines with no data). Documents are joined with the tokenizer's EOS and
cut into non-overlapping blocks; a seed picks which blocks, so results are deterministic.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import DataError
from engine.progress import Progress
from engine.textcheck import (
    TextReport,
    check_characters,
    check_token_ratio,
    decode_utf8,
    preview_lines,
)

if TYPE_CHECKING:  # imported where blocks are made: parsing a data spec (the dashboard) needs no torch
    import torch

log = logging.getLogger(__name__)


FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet", ".csv")
_ARTICLE_HEADING = re.compile(r"^ = [^=].*[^=] = $")




@dataclass(frozen=True)
class DataSource:
    """Where calibration / training text comes from.

    kind: "file", "hf" or "generated".
    docs: a (start, end) fraction of the documents to use, e.g. (0.0, 0.6) for a calibration split.
    """

    kind: str
    path: str = ""  # file path, or HF dataset name
    config: str | None = None  # HF dataset config
    split: str = "train"
    column: str | None = None  # text column (jsonl / parquet / csv / HF); default "text"
    docs: tuple[float, float] = (0.0, 1.0)
    n_generated: int = 64  # documents to generate when kind == "generated"
    generated_tokens: int = 256

    @classmethod
    def parse(cls, spec: str, column: str | None = None, docs: tuple[float, float] = (0.0, 1.0)) -> DataSource:
        """Parse a CLI/dashboard spec.

        - a path to a local file
        - `hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`, e.g. `hf:wikitext:wikitext-2-raw-v1:train:text`
        - `generated` or `generated:N` (N documents written by the model itself)
        """
        if spec.startswith("hf:"):
            parts = spec[3:].split(":")
            if not parts[0]:
                raise DataError("hf: needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1:train:text")
            return cls("hf", parts[0], parts[1] if len(parts) > 1 and parts[1] else None,
                       parts[2] if len(parts) > 2 and parts[2] else "train",
                       parts[3] if len(parts) > 3 and parts[3] else column, docs)
        if spec == "generated" or spec.startswith("generated:"):
            n = spec.split(":", 1)[1] if ":" in spec else "64"
            if not n.isdigit() or int(n) < 1:
                raise DataError(f"generated:N needs a positive document count, got {spec!r}")
            return cls("generated", docs=docs, n_generated=int(n))
        return cls("file", spec, column=column, docs=docs)

    @property
    def label(self) -> str:
        """How the source is shown to people (generated text is always labelled as such)."""
        rng = "" if self.docs == (0.0, 1.0) else f" [docs {self.docs[0]:g}-{self.docs[1]:g}]"
        if self.kind == "generated":
            return f"model-generated text ({self.n_generated} docs, not real data){rng}"
        if self.kind == "hf":
            return f"hf:{self.path}:{self.config or ''}:{self.split}:{self.column or 'text'}{rng}"
        return f"{self.path}{rng}"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_doc_range(text: str | None, what: str = "--data-range") -> tuple[float, float]:
    """'START:END' fractions of the documents -> (start, end); either side may be left out
    ('0.6:' = 0.6 to the end, '' = everything). Raises DataError on anything else."""
    lo, sep, hi = (text or "").partition(":")
    try:
        start, end = float(lo or 0.0), float(hi or 1.0)
    except ValueError:
        raise DataError(f"{what} takes START:END fractions of the documents, e.g. 0:0.6; got {text!r}") from None
    if text and not sep:
        raise DataError(f"{what} takes START:END fractions of the documents, e.g. 0:0.6; got {text!r}")
    if not 0.0 <= start < end <= 1.0:
        raise DataError(f"{what} needs 0 <= START < END <= 1, got {text!r}")
    return start, end


# ---------------------------------------------------------------- reading documents


def split_articles(text: str) -> list[str]:
    """Split WikiText-style text into articles at ` = Title = ` lines; text without such headings
    is split into paragraphs at blank lines (so a document range still selects something)."""
    lines = text.splitlines(keepends=True)
    has_headings = any(_ARTICLE_HEADING.match(line.rstrip("\n")) for line in lines)
    docs: list[list[str]] = []
    for line in lines:
        starts = _ARTICLE_HEADING.match(line.rstrip("\n")) if has_headings else not line.strip()
        if starts or not docs:
            docs.append([])
        docs[-1].append(line)
    return [d for d in ("".join(x).strip() for x in docs) if d]


def _read_table(path: Path, column: str | None) -> list[str]:
    import pandas as pd

    col = column or "text"
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError) as e:  # pyarrow: ArrowInvalid is a ValueError
            raise DataError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]})") from e
    elif path.suffix == ".csv":
        decode_utf8(path.read_bytes(), str(path))
        df = pd.read_csv(path)
    else:  # jsonl / json lines
        rows = []
        for i, line in enumerate(decode_utf8(path.read_bytes(), str(path)).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i} is not valid JSON ({e.msg})") from e
        df = pd.DataFrame(rows)
    if col not in df.columns:
        raise DataError(
            f"{path} has no column {col!r}; its columns are: {', '.join(map(str, df.columns)) or '(none)'}"
        )
    return [str(t) for t in df[col].dropna().tolist() if str(t).strip()]


def read_file(path: str | Path, column: str | None = None) -> list[str]:
    """Documents from a local file: .txt/.raw (articles), .jsonl/.json, .parquet or .csv (a column)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"{p} is a folder; give a file ({', '.join(FILE_SUFFIXES)})")
    if p.suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported data file type {p.suffix!r} ({p.name}); valid: {', '.join(FILE_SUFFIXES)}")
    if p.stat().st_size == 0:
        raise DataError(f"data file is empty: {p}")
    is_text = p.suffix in (".txt", ".raw")
    docs = split_articles(decode_utf8(p.read_bytes(), str(p))) if is_text else _read_table(p, column)
    if not docs:
        raise DataError(f"data file holds no text: {p}")
    check_characters(docs, str(p), lines=is_text)
    return docs


def read_hf(name: str, config: str | None, split: str, column: str | None) -> list[str]:
    """Documents from a Hugging Face dataset (cached locally by `datasets`)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DataError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Offline, use a local file "
            "or 'generated'."
        ) from e
    col = column or "text"
    if col not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {col!r}; columns: {', '.join(ds.column_names)}")
    docs = [t for t in ds[col] if isinstance(t, str) and t.strip()]
    check_characters(docs, f"dataset {name!r} column {col!r}")
    return docs


def generate_texts(model, tokenizer, n_docs: int, max_new_tokens: int = 256, seed: int = 0,
                   batch_size: int = 16, progress: Progress | None = None) -> list[str]:
    """Text sampled by the model from its BOS token (seeded, batched): data for offline machines."""
    import torch

    from engine.importance.stream import execution_device

    device = execution_device(model)  # not `meta` for a streamed model
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to start generation from")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state = torch.random.get_rng_state()
    docs: list[str] = []
    try:
        with torch.no_grad():
            for b0 in range(0, n_docs, batch_size):
                n = min(batch_size, n_docs - b0)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                ids = torch.full((n, 1), start, dtype=torch.long, device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                     temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                docs += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
                if progress:
                    progress(min(1.0, (b0 + n) / n_docs), f"generated {b0 + n}/{n_docs} documents")
    finally:
        torch.random.set_rng_state(state)
    return [d for d in docs if d.strip()]


def load_documents(source: DataSource, model=None, tokenizer=None, seed: int = 0,
                   progress: Progress | None = None) -> list[str]:
    """All documents of a source, restricted to its `docs` fraction range."""
    lo, hi = source.docs
    if not (0.0 <= lo < hi <= 1.0):
        raise DataError(f"docs range must satisfy 0 <= start < end <= 1, got {source.docs}")
    if source.kind == "file":
        docs = read_file(source.path, source.column)
    elif source.kind == "hf":
        docs = read_hf(source.path, source.config, source.split, source.column)
    elif source.kind == "generated":
        if model is None or tokenizer is None:
            raise DataError("generated data needs the model and tokenizer")
        docs = generate_texts(model, tokenizer, source.n_generated, source.generated_tokens, seed,
                              progress=progress)
    else:
        raise DataError(f"unknown data source kind {source.kind!r}; valid: file, hf, generated")
    n = len(docs)
    return docs[int(round(lo * n)): int(round(hi * n))]


# ---------------------------------------------------------------- blocks


def tokenize_documents(docs: list[str], tokenizer) -> torch.Tensor:
    """One long 1-D stream of token ids: documents joined with EOS."""
    import torch

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    ids: list[int] = []
    for i, enc in enumerate(tokenizer(docs, add_special_tokens=False)["input_ids"]):
        if i:
            ids.append(eos)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def make_blocks(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0,
                what: str = "the data") -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks and pick `n_samples` of them with `seed`.

    Returns a LongTensor of shape (n_samples, seq_len). Blocks keep their order in the stream.
    """
    if n_samples < 1 or seq_len < 2:
        raise DataError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    available = stream.numel() // seq_len
    if available < n_samples:
        raise DataError(
            f"{what} has {stream.numel()} tokens, enough for {available} blocks of {seq_len}; "
            f"{n_samples} x {seq_len} = {n_samples * seq_len} were asked for. Use fewer samples, a "
            "shorter sequence length or more text."
        )
    import torch

    blocks = stream[: available * seq_len].view(available, seq_len)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=gen)[:n_samples].sort().values
    return blocks[pick].clone()


def get_blocks(source: DataSource, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
               model=None, progress: Progress | None = None, up_to: bool = False) -> torch.Tensor:
    """Source -> (n_samples, seq_len) token blocks, deterministic for a given seed. With `up_to`,
    at most n_samples: all the source has when that is fewer (but at least one block)."""
    docs = load_documents(source, model=model, tokenizer=tokenizer, seed=seed, progress=progress)
    if not docs:
        raise DataError(f"{source.label} selects no documents")
    stream = tokenize_documents(docs, tokenizer)
    if source.kind != "generated":  # the model's own text is what it is; a file or dataset must read as text
        check_token_ratio(stream.numel(), sum(len(d.encode()) for d in docs), tokenizer, source.label)
    if up_to:
        n_samples = min(n_samples, stream.numel() // seq_len)
        if n_samples < 1:
            raise DataError(f"{source.label} has {stream.numel()} tokens: not one block of {seq_len}")
    return make_blocks(stream, n_samples, seq_len, seed, what=source.label)


def inspect_source(source: DataSource, tokenizer) -> TextReport:
    """Read, check and tokenise a file or dataset source as `get_blocks` would (DataError when it is
    not text), and report its sizes, tokens per byte and first lines (for the dashboard's data check)."""
    if source.kind == "generated":
        raise DataError("model-generated text is written at scoring time; there is nothing to check yet")
    docs = load_documents(source)
    if not docs:
        raise DataError(f"{source.label} selects no documents")
    n_tokens = int(tokenize_documents(docs, tokenizer).numel())
    n_bytes = sum(len(d.encode()) for d in docs)
    tpb, ref = check_token_ratio(n_tokens, n_bytes, tokenizer, source.label)
    return TextReport(docs=len(docs), chars=sum(len(d) for d in docs), bytes=n_bytes, tokens=n_tokens,
                      tokens_per_byte=tpb, reference_tokens_per_byte=ref, preview=preview_lines(docs))
