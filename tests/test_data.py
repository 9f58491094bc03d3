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


# ---------------------------------------------------------------- is it text?


@pytest.fixture(scope="module")
def real_tok():
    """The built-in model's tokenizer (a real vocabulary: the tokens-per-byte check needs one)."""
    from transformers import AutoTokenizer

    from engine.models import builtin_model_dir

    return AutoTokenizer.from_pretrained(builtin_model_dir())


def test_random_bytes_and_latin1_are_refused_with_the_reason(tmp_path, tok):
    import random

    rnd = random.Random(0)
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(rnd.randbytes(60_000))
    with pytest.raises(DataError, match=r"garbage.txt is not UTF-8 text: byte 0x[0-9a-f]{2} at offset .*binary data"):
        get_blocks(DataSource.parse(str(garbage)), tok, 4, 64)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Le café était fermé, mais la pâtisserie à côté vendait des crêpes.\n" * 200).encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 0xe9 at offset 6 .*Latin-1.*iconv"):
        read_file(latin)
    # the same text as UTF-8 is fine
    latin.write_text(latin.read_bytes().decode("latin-1"), encoding="utf-8")
    assert len(read_file(latin)[0]) > 1000
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="bad.jsonl is not UTF-8 text"):
        read_file(bad_jsonl)


def test_control_characters_and_a_giant_line_are_refused(tmp_path):
    binaryish = tmp_path / "b.txt"
    binaryish.write_text("some words\x00\x01\x02 and more\x03 words\n" * 100)
    with pytest.raises(DataError, match=r"control characters in .* \(e.g. U\+0000\): binary data"):
        read_file(binaryish)
    few = tmp_path / "few.txt"  # one stray control character in a long text is tolerated
    few.write_text("an ordinary sentence about rivers and hills.\n" * 100 + "\x1b[0m stray escape\n")
    assert read_file(few)
    one_line = tmp_path / "line.txt"
    one_line.write_text("word " * 600_000)  # a single 3 MB line (the trailing space is stripped)
    with pytest.raises(DataError, match=r"a line of 2,999,999 characters: not prose"):
        read_file(one_line)


def test_byte_soup_is_refused_by_tokens_per_byte_and_prose_passes(tmp_path, real_tok, wikitext):
    import base64
    import random

    from engine.data import inspect_source
    from engine.textcheck import MAX_TOKEN_RATIO

    rnd = random.Random(1)
    for name, text in (("b64.txt", base64.b64encode(rnd.randbytes(60_000)).decode()),
                       ("hex.txt", rnd.randbytes(30_000).hex()),
                       ("digits.txt", " ".join(str(rnd.randint(0, 10**6)) for _ in range(8000)))):
        f = tmp_path / name
        f.write_text("\n".join(text[i:i + 76] for i in range(0, len(text), 76)))
        with pytest.raises(DataError, match=rf"{name} does not read as natural language.*Accepted: up to "
                                            rf"{MAX_TOKEN_RATIO:g}x"):
            get_blocks(DataSource.parse(str(f)), real_tok, 2, 64)
        with pytest.raises(DataError, match="does not read as natural language"):
            inspect_source(DataSource.parse(str(f)), real_tok)
    report = inspect_source(DataSource.parse(str(wikitext), docs=(0.0, 0.1)), real_tok)
    assert 0.7 < report.token_ratio < 1.5 and report.docs > 3 and report.tokens > 10_000
    german = tmp_path / "de.txt"
    german.write_text("Die Katze sitzt auf der Matte und schaut aus dem Fenster. Morgen fahren wir nach München, "
                      "um die Großeltern zu besuchen.\n" * 300)
    assert 1.0 < inspect_source(DataSource.parse(str(german)), real_tok).token_ratio < MAX_TOKEN_RATIO
    chinese = tmp_path / "zh.txt"  # a script this English tokenizer reads poorly still counts as text
    chinese.write_text("今天天气很好，我们去公园散步吧。这是一个关于机器学习的例子，模型会学习语言的结构。\n" * 200)
    assert 2.0 < inspect_source(DataSource.parse(str(chinese)), real_tok).token_ratio < MAX_TOKEN_RATIO


def test_preview_shows_the_first_lines_of_the_selected_documents(tmp_path, tok):
    from engine.data import inspect_source

    f = tmp_path / "w.txt"
    f.write_text(WIKI_LIKE)
    report = inspect_source(DataSource.parse(str(f), docs=(0.6, 1.0)), tok)
    assert report.docs == 4
    assert report.preview[0] == "= Article 6 = " and report.preview[1].startswith(" Paragraph 6 talks")
    assert len(report.preview) == 8 and report.tokens > 0 and report.bytes == sum(
        len(d.encode()) for d in split_articles(WIKI_LIKE)[6:])
    long = tmp_path / "long.txt"
    long.write_text("x" * 1000 + "\n")
    from engine.textcheck import PREVIEW_CHARS, preview_lines

    assert preview_lines(["x" * 1000])[0] == "x" * (PREVIEW_CHARS - 1) + "…"
