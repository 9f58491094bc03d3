from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from engine.data import DataError, DataSource, get_blocks, make_blocks, read_file, split_articles

WIKI_LIKE = "\n".join(
    f" = Article {i} = \n\n Paragraph {i} talks about topic {i} at some length , with words .\n" for i in range(10)
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_split_articles_at_wikitext_headings():
    docs = split_articles(WIKI_LIKE)
    assert len(docs) == 10
    assert docs[3].startswith("= Article 3 =") and "topic 3" in docs[3]
    assert split_articles("just one paragraph\nand another line\n") == ["just one paragraph\nand another line"]
    # no headings: blank lines separate documents, so a docs range can split them
    assert split_articles("first para\nstill first\n\n\nsecond para\n\nthird\n") == [
        "first para\nstill first", "second para", "third"]


def test_blocks_shape_eos_joined_and_deterministic(tmp_path, tok):
    f = tmp_path / "w.txt"
    f.write_text(WIKI_LIKE)
    src = DataSource.parse(str(f))
    a = get_blocks(src, tok, n_samples=3, seq_len=16, seed=1)
    b = get_blocks(src, tok, n_samples=3, seq_len=16, seed=1)
    c = get_blocks(src, tok, n_samples=3, seq_len=16, seed=2)
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # documents joined with EOS: a stream over all 10 docs holds 9 EOS separators
    stream = make_blocks(torch.arange(100), 5, 20)
    assert stream.shape == (5, 20)
    from engine.data import tokenize_documents
    ids = tokenize_documents(split_articles(WIKI_LIKE), tok)
    assert (ids == tok.eos_token_id).sum() == 9


def test_docs_fraction_splits_without_overlap(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(WIKI_LIKE)
    from engine.data import load_documents
    calib = load_documents(DataSource.parse(str(f), docs=(0.0, 0.6)))
    held = load_documents(DataSource.parse(str(f), docs=(0.6, 1.0)))
    assert len(calib) == 6 and len(held) == 4
    assert "Article 5 " in calib[-1] and "Article 6 " in held[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_table_files_with_column(tmp_path, tok, suffix):
    rows = [{"body": f"document number {i} " * 5, "id": i} for i in range(8)]
    f = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        f.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(f)
    else:
        pd.DataFrame(rows).to_csv(f, index=False)
    assert read_file(f, "body")[2] == rows[2]["body"]
    blocks = get_blocks(DataSource.parse(str(f), column="body"), tok, 2, 8)
    assert blocks.shape == (2, 8)
    with pytest.raises(DataError, match=r"no column 'text'; its columns are: body, id"):
        read_file(f)


def test_clear_errors(tmp_path, tok):
    with pytest.raises(DataError, match="data file not found"):
        read_file(tmp_path / "nope.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_file(empty)
    bad = tmp_path / "x.docx"
    bad.write_text("hi")
    with pytest.raises(DataError, match="unsupported data file type '.docx'.*valid: .txt"):
        read_file(bad)
    small = tmp_path / "s.txt"
    small.write_text("a few words only")
    with pytest.raises(DataError, match=r"has \d+ tokens, enough for \d+ blocks of 64; 10 x 64 = 640"):
        get_blocks(DataSource.parse(str(small)), tok, 10, 64)


def test_unknown_hf_dataset_offline_is_clear(tok):
    with pytest.raises(DataError, match="could not load Hugging Face dataset 'no-such/dataset-xyz'.*Offline"):
        get_blocks(DataSource.parse("hf:no-such/dataset-xyz"), tok, 1, 8)


def test_generated_source_is_seeded_and_labelled(tok):
    model = tiny_model("llama")
    src = DataSource.parse("generated:3")
    src = DataSource(**{**src.to_dict(), "generated_tokens": 12})
    steps = []
    from engine.data import load_documents
    a = load_documents(src, model, tok, seed=5, progress=lambda f, m: steps.append(f))
    b = load_documents(src, model, tok, seed=5)
    assert a == b and len(a) == 3 and steps[-1] == 1.0
    assert "model-generated" in src.label


def test_doc_range_parsing():
    from engine.data import parse_doc_range

    assert parse_doc_range("0:0.6") == (0.0, 0.6)
    assert parse_doc_range("0.6:") == (0.6, 1.0)
    assert parse_doc_range("") == parse_doc_range(None) == (0.0, 1.0)
    for bad, msg in (("0.6", "START:END"), ("a:b", "START:END"), ("0.7:0.2", "--train-range needs 0 <= START < END <= 1"),
                     ("0:1.5", "needs 0 <= START")):
        with pytest.raises(DataError, match=msg):
            parse_doc_range(bad, "--train-range")
