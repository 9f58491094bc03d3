"""Is this text? Checks that refuse binary data, other encodings and byte soup before calibrating on it.

- decoding: a text file must be UTF-8 (random bytes and Latin-1 text fail here, with the offset);
- control characters: more than 1 in 1,000 characters (other than tab, newline, carriage return,
  form feed) is binary data, not text;
- line length: a .txt/.raw file is read as lines; one line longer than MAX_LINE_CHARS is a dump
  (minified data, a binary blob), not prose;
- tokens per byte, relative to the same tokenizer on REFERENCE_TEXT (an English paragraph): with
  the built-in SmolLM2 tokenizer natural language measured 1.13x (WikiText-2), 1.7x (German), 2.2x
  (Russian), 2.75x (Chinese), while base64 measured 3.9x, hex dumps 4.3x and tables of random
  integers 4.8x (the tokenizer finds no words: close to one token per byte). MAX_TOKEN_RATIO sits
  between them. Random lowercase letters and spaces (2.9x) pass: they are pseudo-words.
  A tokenizer with a tiny vocabulary reads everything at about one token per byte, so the check
  never refuses anything there.

Torch-free (the dashboard imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.errors import DataError

MAX_CONTROL_FRACTION = 1e-3
MAX_LINE_CHARS = 200_000
MAX_TOKEN_RATIO = 3.2  # tokens per byte of the data / tokens per byte of REFERENCE_TEXT
PREVIEW_LINES = 8
PREVIEW_CHARS = 240
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")

REFERENCE_TEXT = (
    "The river rises in the hills north of the town and flows south through farmland for about forty "
    "miles before it reaches the sea. In the nineteenth century it carried timber and grain to the port, "
    "and several mills were built along its banks. Most of them closed after the railway arrived, but "
    "two have been restored and are open to visitors in the summer. The valley is also known for its "
    "birds: herons, kingfishers and, in recent years, a small colony of otters have returned to the "
    "water as it became cleaner. Local schools take part in a yearly survey of the wildlife."
)


@dataclass(frozen=True)
class TextReport:
    """What a data check found: sizes, the tokenizer's view of the text and the first lines."""

    docs: int
    chars: int
    bytes: int
    tokens: int
    tokens_per_byte: float
    reference_tokens_per_byte: float
    preview: list[str] = field(default_factory=list)

    @property
    def token_ratio(self) -> float:
        """Tokens per byte relative to the reference English paragraph (1.0 = like English prose)."""
        return self.tokens_per_byte / self.reference_tokens_per_byte if self.reference_tokens_per_byte else 0.0


def decode_utf8(data: bytes, what: str) -> str:
    """Strict UTF-8 decoding with newlines normalised to \\n (as text mode reads \\r\\n and \\r);
    DataError naming the first bad byte and what would be valid."""
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        hint = " (it looks like Latin-1/Windows-1252 text: convert it, e.g. iconv -f latin1 -t utf-8)" \
            if _mostly_printable(data) else " (it looks like binary data, not text)"
        raise DataError(f"{what} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start:,} does not "
                        f"decode{hint}; give a UTF-8 text file") from None


def _mostly_printable(data: bytes) -> bool:
    """True when 95% of the bytes are printable ASCII, whitespace or Latin-1 letters (>= 0xa0)."""
    sample = data[: 1 << 16]
    ok = sum(1 for b in sample if 32 <= b < 127 or b in (9, 10, 13) or b >= 0xA0)
    return ok >= 0.95 * len(sample)


def check_characters(docs: list[str], what: str, lines: bool = False) -> None:
    """DataError for control characters (binary data) or, with `lines`, for a line too long to be prose."""
    n_chars = sum(len(d) for d in docs)
    n_ctrl, first = 0, None
    for d in docs:
        found = _CONTROL.findall(d)
        if found and first is None:
            first = found[0]
        n_ctrl += len(found)
    if n_chars and n_ctrl > MAX_CONTROL_FRACTION * n_chars:
        raise DataError(f"{what} holds {n_ctrl:,} control characters in {n_chars:,} (e.g. U+{ord(first):04X}): "
                        f"binary data, not text; at most 1 in {int(1 / MAX_CONTROL_FRACTION):,} is accepted")
    if lines:
        longest = max((len(line) for d in docs for line in d.split("\n")), default=0)
        if longest > MAX_LINE_CHARS:
            raise DataError(f"{what} has a line of {longest:,} characters: not prose (minified data or a dump?); "
                            f"text files are read as lines of at most {MAX_LINE_CHARS:,} characters")


def reference_tokens_per_byte(tokenizer) -> float:
    """Tokens per UTF-8 byte of REFERENCE_TEXT with `tokenizer`."""
    return len(tokenizer(REFERENCE_TEXT, add_special_tokens=False)["input_ids"]) / len(REFERENCE_TEXT.encode())


def check_token_ratio(n_tokens: int, n_bytes: int, tokenizer, what: str) -> tuple[float, float]:
    """(tokens per byte, reference tokens per byte); DataError when the tokenizer reads the data as byte
    soup (MAX_TOKEN_RATIO x the reference English paragraph or more)."""
    ref = reference_tokens_per_byte(tokenizer)
    tpb = n_tokens / max(n_bytes, 1)
    if ref > 0 and tpb > MAX_TOKEN_RATIO * ref:
        raise DataError(f"{what} does not read as natural language to this tokenizer: {tpb:.2f} tokens per byte, "
                        f"{tpb / ref:.1f}x its rate on English prose ({ref:.2f}); random characters, base64, hex "
                        f"or number tables look like this. Accepted: up to {MAX_TOKEN_RATIO:g}x")
    return tpb, ref


def preview_lines(docs: list[str], n: int = PREVIEW_LINES, width: int = PREVIEW_CHARS) -> list[str]:
    """The first `n` non-empty lines of `docs` (each cut to `width` characters): what calibration sees first."""
    out: list[str] = []
    for d in docs:
        for line in d.split("\n"):
            if line.strip():
                out.append(line if len(line) <= width else line[: width - 1] + "…")
                if len(out) >= n:
                    return out
    return out
