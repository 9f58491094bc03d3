"""Teacher-generated text: continuations the teacher samples from varied prompts.

Distilling on one narrow data set teaches the student that domain and loses the rest; text the
teacher writes itself carries its own distribution without any data set. The built-in prompts cover
everyday topics; the even-numbered ones feed training, the odd-numbered ones the "breadth"
evaluation set, so breadth text is never trained on in the same run.

A spec reads `teacher[:N[:TEMPERATURE[:PROMPTS_FILE]]]`: N documents (0 or left out: as many as
the blocks asked for need), sampled at TEMPERATURE (default 0.8) from the built-in prompts or
from a text file of prompts (one per line). The texts are cached in a folder (the run folder's
`generated/`) as JSON with the seed, temperature and prompts that made them, and reused when all of
those match; a longer cached run serves a shorter one (its first whole batches are the same texts).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import DataError
from engine.fileio import read_json, write_json
from engine.progress import Progress

log = logging.getLogger(__name__)

GENERATION_BATCH = 16  # prompts sampled together; the cache reuse below counts in whole batches


BUILTIN_PROMPTS: tuple[str, ...] = (
    "The best way to cook rice is",
    "Yesterday the weather in the mountains",
    "When I started learning to play the guitar,",
    "The history of the bicycle begins",
    "A good night's sleep depends on",
    "Our neighbourhood library has",
    "To plant tomatoes in a small garden,",
    "The football match last Saturday",
    "Most people who move to a new city",
    "The recipe for a simple bread needs",
    "Cats and dogs differ in the way they",
    "The train to the coast was late because",
    "My grandmother always told me that",
    "A budget for a family of four",
    "The first time I saw the ocean,",
    "Learning a second language as an adult",
    "The museum opened a new exhibition about",
    "Before a job interview, it helps to",
    "The village market sells",
    "Running a marathon takes months of",
    "The old bridge over the river was built",
    "Children learn to read when",
    "A healthy breakfast usually includes",
    "The city council voted on a plan to",
    "During the winter holidays, many families",
    "The smartphone changed the way people",
    "Coffee was first grown in",
    "To fix a flat tyre on a bicycle,",
    "The orchestra played a concert of",
    "Our hiking trip through the forest",
    "A small business owner has to think about",
    "The moon affects the tides because",
    "The new restaurant downtown serves",
    "Saving money for a holiday is easier if",
    "The weather forecast for the weekend says",
    "In the nineteenth century, most people travelled",
    "The school science fair had projects on",
    "A friend asked me how to",
    "The rules of chess are simple:",
    "Volunteers cleaned up the beach and found",
    "Painting a room yourself requires",
    "The doctor explained that a cold",
    "Birds migrate south in autumn because",
    "The story of the novel follows a young woman who",
    "Electric cars are becoming popular as",
    "A typical day on a dairy farm starts",
    "The price of groceries has",
    "To write a good letter of complaint,",
    "The festival in the town square featured",
    "Swimming is good exercise because",
    "The team finished the project by",
    "Honey bees live in colonies where",
    "The best advice I ever received about work was",
    "On the first day of spring,",
    "A map of the old town shows",
    "Baking cookies with children is",
    "The island is famous for its",
    "Recycling at home works best when",
    "The film tells the story of",
    "Our family dinner on Sunday",
    "The mechanic said the car needed",
    "A walk in the park after rain",
    "The history teacher explained why the empire",
    "Growing up on the coast meant",
)


@dataclass(frozen=True)
class TeacherText:
    """Where teacher-generated text comes from: documents, temperature, prompts, length."""

    n_docs: int = 0  # 0: as many as the requested blocks need
    temperature: float = 0.8
    prompts_file: str | None = None  # one prompt per line; None: BUILTIN_PROMPTS
    new_tokens: int = 256

    @classmethod
    def parse(cls, spec: str) -> TeacherText:
        """`teacher[:N[:TEMPERATURE[:PROMPTS_FILE]]]` -> TeacherText (DataError on anything else)."""
        head, *rest = spec.split(":", 3)
        if head != "teacher":
            raise DataError(f"not a teacher-generated source: {spec!r}; valid: teacher[:N[:TEMPERATURE[:FILE]]]")
        try:
            n = int(rest[0]) if rest and rest[0] else 0
            temp = float(rest[1]) if len(rest) > 1 and rest[1] else 0.8
        except ValueError:
            raise DataError(f"teacher[:N[:TEMPERATURE[:FILE]]] needs a whole N and a number, got {spec!r}") from None
        if n < 0 or not 0.0 < temp <= 2.0:
            raise DataError(f"teacher text needs N >= 0 and 0 < TEMPERATURE <= 2, got {spec!r}")
        return cls(n, temp, rest[2] if len(rest) > 2 and rest[2] else None)

    @property
    def label(self) -> str:
        where = Path(self.prompts_file).name if self.prompts_file else "built-in prompts"
        n = f"{self.n_docs} docs" if self.n_docs else "sized to the blocks"
        return f"teacher-generated text ({n}, T={self.temperature:g}, {where}; not real data)"

    def prompts(self, part: str) -> list[str]:
        """The prompts of one part: "train" (even-numbered) or "eval" (odd-numbered)."""
        if self.prompts_file:
            p = Path(self.prompts_file).expanduser()
            if not p.is_file():
                raise DataError(f"prompts file not found: {p} (one prompt per line)")
            all_prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            all_prompts = list(BUILTIN_PROMPTS)
        if len(all_prompts) < 2:
            raise DataError(f"{self.prompts_file}: needs at least 2 prompts (one for training, one for evaluation)")
        return all_prompts[0 if part == "train" else 1::2]


def is_teacher_spec(spec: str) -> bool:
    return spec == "teacher" or spec.startswith("teacher:")


def generate_prompted(model, tokenizer, prompts: list[str], n_docs: int, new_tokens: int, temperature: float,
                      seed: int, batch_size: int = GENERATION_BATCH, progress: Progress | None = None,
                      done: list[str] | None = None) -> list[str]:
    """`n_docs` texts: prompt i % len(prompts) followed by the model's sampled continuation (seeded,
    batched with left padding; the global RNG is left as it was). Batch k draws its seed k-th, so
    `done` (the first whole batches of an earlier call with the same settings) is continued exactly."""
    import torch

    from engine.importance.stream import execution_device

    device = execution_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to batch prompts with")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    limit = int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
                or 1 << 30)
    state = torch.random.get_rng_state()
    docs = list((done or [])[: min(len(done or []), n_docs) // batch_size * batch_size])  # whole batches only
    for _ in range(len(docs) // batch_size):  # the seeds those batches drew
        torch.randint(0, 2**31 - 1, (1,), generator=gen)
    try:
        with torch.no_grad():
            for b0 in range(len(docs), n_docs, batch_size):
                batch = [prompts[i % len(prompts)] for i in range(b0, min(n_docs, b0 + batch_size))]
                enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in batch]
                width = max(len(e) for e in enc)
                ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], dtype=torch.long, device=device)
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                n_new = max(1, min(new_tokens, limit - width))  # learned positions (GPT-2) end at the limit
                out = model.generate(ids, attention_mask=mask, do_sample=True, top_p=0.95, temperature=temperature,
                                     max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad)
                cont = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
                docs += [f"{p}{c}" for p, c in zip(batch, cont, strict=True)]
                if progress:
                    progress(min(1.0, len(docs) / n_docs), f"teacher wrote {len(docs)}/{n_docs} texts")
    finally:
        torch.random.set_rng_state(state)
    return docs


def _longest_cached(folder: Path, part: str, meta: dict) -> list[str]:
    """The texts of the longest cached run in `folder` made with the same settings as `meta` (any
    count): its first whole batches are what a run of another count would generate first."""
    best: list[str] = []
    same = {k: v for k, v in meta.items() if k != "n_docs"}
    for f in sorted(folder.glob(f"teacher-{part}-*.json")) if folder.is_dir() else []:
        cached = read_json(f) or {}
        m, texts = cached.get("meta") or {}, cached.get("texts") or []
        if {k: v for k, v in m.items() if k != "n_docs"} == same and len(texts) == m.get("n_docs") and len(texts) > len(best):
            best = list(texts)
    return best


def cached_teacher_text(src: TeacherText, part: str, n_docs: int, seed: int, model, tokenizer,
                        cache_dir: str | Path | None, model_name: str = "",
                        progress: Progress | None = None) -> list[str]:
    """The teacher's texts for one part ("train" / "eval"), from `cache_dir` when a file there was made
    with the same prompts, count, length, temperature, seed and model; generated (and saved) otherwise."""
    prompts = src.prompts(part)
    meta = {"part": part, "n_docs": n_docs, "new_tokens": src.new_tokens, "temperature": src.temperature,
            "seed": seed, "model": model_name, "prompts_sha1": hashlib.sha1(json.dumps(prompts).encode()).hexdigest()}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"teacher-{part}-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        cached = read_json(path) or {}
        if cached.get("meta") == meta and len(cached.get("texts") or []) == n_docs:
            log.info("teacher text from %s", path)
            return list(cached["texts"])
    done = _longest_cached(Path(cache_dir), part, meta) if cache_dir else []
    if min(len(done), n_docs) // GENERATION_BATCH * GENERATION_BATCH == n_docs:
        log.info("teacher text: the first %d texts of a longer cached run", n_docs)
        texts = done[:n_docs]
    elif model is None or tokenizer is None:
        raise DataError("teacher-generated text needs the teacher model (it is not loaded in this job)")
    else:
        texts = generate_prompted(model, tokenizer, prompts, n_docs, src.new_tokens, src.temperature, seed,
                                  progress=progress, done=done)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"meta": meta, "source": asdict(src), "texts": texts})
    return texts
