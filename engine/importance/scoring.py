"""`score()`: scores of a loaded model on a data source, kept in a folder and reused.

Cache policy
- The cache key hashes what the numbers depend on: model fingerprint, data source, n_samples,
  seq_len, seed, aggregation, model dtype, engine and algorithm versions. It is stored in
  meta["cache_key"]; the default folder is `cache_dir()/scores/<key>` (`-blocks<n>` appended when a
  block size is set, so different block sizes live side by side).
- The optional parts (depth_ppl, block_size / block_ppl, taylor) are not in the key. A request whose
  parts are all in the folder is answered from it (a subset reuses a superset). A request that needs
  more computes only the missing optional parts (plus the one width pass they all share) and merges
  them into the folder, so nothing cached is lost.
- The perplexity sweeps run on the first `config.depth_samples` samples; None here means the
  device's default (all on a GPU, at most 8 on a CPU: engine.importance.sweep). Sweeps recorded
  with another sample count are recomputed when asked for (meta["depth_samples"]).
- Scores are verified on load (size + sha256 recorded in scores.json). A damaged entry of the
  cache is recomputed (with a warning in the log); a damaged folder given as `out_dir` raises
  ScoreError (recompute it with force=True).
- A folder holding scores with a different key, or block scores of another block size, raises
  ScoreError naming the differences, unless `force=True`, which recomputes and overwrites.
- batch_size is not part of the key: it changes only float rounding.
- Streaming (`load(..., stream=...)`) is not part of the key either: it changes where the weights
  rest between forwards, not the arithmetic (same kernels, same weights, same device), so streamed
  and unstreamed scores are equal and share a folder; meta["stream"] records how the last
  computation ran ("off" | "cpu" | "disk"), and a streamed model's fingerprint is read from its
  offloaded weights, so it matches the unstreamed model's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

import engine
from engine.arch import get_adapter
from engine.data import DataSource, get_blocks
from engine.importance.aggregate import spearman
from engine.importance.api import ALGORITHM_VERSION, ScoreConfig, check_streaming, compute_scores
from engine.importance.criteria import add_criteria
from engine.importance.scores import ScoreError, Scores
from engine.importance.stream import execution_device
from engine.importance.sweep import default_depth_samples
from engine.models import BUILTIN_NAME, LoadedModel, cache_dir, fingerprint, load
from engine.progress import Progress

log = logging.getLogger(__name__)

KEY_FIELDS = ("fingerprint", "data_source", "n_samples", "seq_len", "seed", "aggregation", "dtype",
              "engine_version", "algorithm_version")


def key_inputs(loaded: LoadedModel, source: DataSource, n_samples: int, seq_len: int, seed: int,
               config: ScoreConfig) -> dict:
    """The inputs the cache key is a hash of (also saved in the metadata)."""
    p = next(loaded.model.parameters())
    return {
        "fingerprint": fingerprint(loaded.model), "data_source": source.to_dict(), "n_samples": n_samples,
        "seq_len": seq_len, "seed": seed, "aggregation": config.aggregation,
        "dtype": str(p.dtype).replace("torch.", ""), "engine_version": engine.__version__,
        "algorithm_version": ALGORITHM_VERSION,
    }


def cache_key(inputs: dict) -> str:
    blob = json.dumps({k: inputs[k] for k in KEY_FIELDS}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _normalise(value):
    return json.loads(json.dumps(value, default=list))  # tuples -> lists, as read back from JSON


def _differences(cached: dict, inputs: dict) -> list[str]:
    out = []
    for k in KEY_FIELDS:
        if _normalise(cached.get(k)) != _normalise(inputs[k]):
            out.append(f"{k}: cached {cached.get(k)!r}, requested {inputs[k]!r}")
    return out


def _depth_samples(config: ScoreConfig, n_samples: int) -> int:
    """The calibration samples a sweep asked for by `config` runs on."""
    return min(config.depth_samples or n_samples, n_samples)


def _missing(cached: Scores, config: ScoreConfig) -> ScoreConfig | None:
    """The optional parts the cached scores lack (None if they hold everything asked for). Perplexity
    sweeps made on another number of samples count as missing."""
    n_samples = int(cached.meta.get("n_samples") or 0)
    # sweeps saved before depth_samples was recorded ran on every sample
    same_d = int(cached.meta.get("depth_samples") or n_samples) == _depth_samples(config, n_samples)
    need_blocks = config.block_size is not None and (
        cached.meta.get("block_size") != config.block_size or not cached.has("block_bi")
        or (config.block_ppl and not (cached.has("block_ppl_increase") and same_d)))
    miss = dataclasses.replace(
        config, depth_ppl=config.depth_ppl and not (cached.has("ppl_increase") and same_d),
        taylor=config.taylor and not cached.has("taylor"),
        block_size=config.block_size if need_blocks else None,
        block_ppl=config.block_ppl and need_blocks)
    if not (miss.depth_ppl or miss.taylor or miss.block_size):
        return None
    return miss


def _needs_width(cached: Scores | None, todo: ScoreConfig) -> bool:
    """Whether the width + BI pass must run: no scores yet, or block BI of a new block size."""
    if cached is None:
        return True
    return bool(todo.block_size) and not (cached.has("block_bi") and cached.meta.get("block_size") == todo.block_size)


def _merge(cached: Scores, new: Scores) -> Scores:
    """Cached optional tensors not recomputed are kept; recomputed ones replace them. Cached perplexity
    sweeps over another number of samples than the new ones are dropped (their base ppl differs)."""
    stale = new.meta.get("depth_samples") is not None and \
        (cached.meta.get("depth_samples") or cached.meta.get("n_samples")) != new.meta["depth_samples"]
    kept = {k: v for k, v in cached.tensors.items()
            if not (stale and k in ("ppl_increase", "block_ppl_increase") and k not in new.tensors)}
    tensors = {**kept, **new.tensors}
    meta = {**cached.meta, **{k: v for k, v in new.meta.items() if v is not None}}
    meta["timings"] = {**cached.meta.get("timings", {}), **new.meta.get("timings", {})}
    if "ppl_increase" in tensors:
        meta["spearman_bi_ppl"] = spearman(tensors["bi"], tensors["ppl_increase"])
    meta["block_size"] = new.meta.get("block_size") or cached.meta.get("block_size")
    return Scores(tensors, meta)


def _load_cached(folder: Path, own: bool) -> Scores | None:
    """The scores in `folder`; a damaged entry of the cache (`own`) is logged and recomputed (None), a
    damaged folder the user named raises its one-line ScoreError."""
    try:
        return Scores.load(folder)
    except ScoreError as e:
        if not own:
            raise
        log.warning("cached scores are damaged, recomputing them: %s", e)
        return None


def score(loaded: LoadedModel, source: DataSource, n_samples: int, seq_len: int, seed: int = 0,
          config: ScoreConfig = ScoreConfig(), out_dir: str | Path | None = None,
          progress: Progress | None = None, force: bool = False) -> tuple[Scores, Path]:
    """Scores of `loaded` on `n_samples` blocks of `seq_len` tokens from `source`, saved in a folder.

    Returns (scores, folder). meta["reused"] tells what happened: "all" (answered from the folder),
    "partial" (missing parts computed and merged) or "none". See the module docstring for the policy.
    """
    config.validate(get_adapter(loaded.model).n_layers)
    check_streaming(loaded.model, config)
    if (config.depth_ppl or config.block_ppl) and config.depth_samples is None:  # the device's default
        config = dataclasses.replace(config, depth_samples=default_depth_samples(
            n_samples, execution_device(loaded.model).type))
    inputs = key_inputs(loaded, source, n_samples, seq_len, seed, config)
    key = cache_key(inputs)
    suffix = f"-blocks{config.block_size}" if config.block_size else ""
    folder = Path(out_dir) if out_dir is not None else cache_dir() / "scores" / f"{key}{suffix}"
    todo, cached = config, None
    if Scores.exists(folder) and not force:
        cached = _load_cached(folder, own=out_dir is None)
    if cached is not None:
        if cached.meta.get("cache_key") != key:
            diffs = _differences(cached.meta, inputs) or ["cache key (scores from another prunescope version?)"]
            raise ScoreError(f"{folder} holds scores made with different inputs ({'; '.join(diffs)}); "
                             "use another output folder, or --force / force=True to overwrite them")
        cb = cached.meta.get("block_size")
        if config.block_size and cb and cb != config.block_size and cached.has("block_bi"):
            raise ScoreError(f"{folder} holds block scores for blocks of {cb} layers, requested {config.block_size}; "
                             "use another output folder, or --force / force=True to replace them")
        if add_criteria(loaded.model, cached):  # made before the weight-aware criteria: same model (key)
            cached.save(folder)
            log.info("weight-aware criteria added to the scores in %s", folder)
        todo = _missing(cached, config)
        if todo is None:
            log.info("scores reused from %s", folder)
            cached.meta["reused"] = "all"
            if progress is not None:
                progress(1.0, f"scores reused from {folder}")
            return cached, folder
    t0 = time.perf_counter()
    blocks = get_blocks(source, loaded.tokenizer, n_samples, seq_len, seed, model=loaded.model,
                        progress=(lambda f, m: progress(0.05 * f, m)) if progress else None)
    t_data = time.perf_counter() - t0
    inner = (lambda f, m: progress(0.05 + 0.95 * f, m)) if progress else None
    new = compute_scores(loaded.model, blocks, todo, progress=inner, width=_needs_width(cached, todo))
    new.meta["timings"]["data"] = round(t_data, 4)
    new.meta.update(inputs)
    new.meta.update({"cache_key": key, "model": loaded.name, "data": source.label})
    result = _merge(cached, new) if cached is not None else new
    result.meta.pop("reused", None)
    result.meta["config"] = dataclasses.asdict(dataclasses.replace(
        config, depth_ppl=result.has("ppl_increase"), taylor=result.has("taylor"),
        block_size=result.meta.get("block_size"), block_ppl=result.has("block_ppl_increase")))
    result.save(folder)
    result.meta["reused"] = "partial" if cached is not None else "none"
    log.info("scores written to %s", folder)
    return result, folder


def model_spec_of(meta: dict) -> str:
    """The model spec to load for a scores file (the built-in model is recorded by its name)."""
    name = meta.get("model") or "default"
    return "default" if name == BUILTIN_NAME else str(name)


def calibration_of(meta: dict, where: str = "the scores") -> tuple[DataSource, int, int, int]:
    """(source, n_samples, seq_len, seed) of the calibration blocks a scores file was computed on."""
    d = dict(meta.get("data_source") or {})
    if not d or not meta.get("n_samples") or not meta.get("seq_len"):
        raise ScoreError(f"{where} does not record its data source and sizes; rescore with `prunescope score`")
    d["docs"] = tuple(d.get("docs", (0.0, 1.0)))
    return DataSource(**d), int(meta["n_samples"]), int(meta["seq_len"]), int(meta.get("seed") or 0)


def calibration_blocks(meta: dict, loaded: LoadedModel) -> torch.Tensor:
    """The calibration blocks a scores file was computed on, again (deterministic: same source, sizes, seed)."""
    source, n, t, seed = calibration_of(meta)
    return get_blocks(source, loaded.tokenizer, n, t, seed, model=loaded.model)


def add_depth_scores(folder: str | Path, loaded: LoadedModel | None = None, depth_samples: int | None = None,
                     block_size: int | None = None, block_ppl: bool = False, device: str = "auto",
                     progress: Progress | None = None) -> Scores:
    """Add the per-layer perplexity sweep (and, with `block_ppl`, the block sweep) to the scores in `folder`,
    on the data, samples, seed and dtype recorded there, without recomputing the width scores.

    loaded: the scored model (None: loaded from the spec and dtype in the scores, on `device`).
    depth_samples: calibration samples for the sweep, the first ones (None: all on a GPU, at most 8 on a
    CPU; see engine.importance.sweep). block_size: for the block sweep, default the scores' own.
    Returns the merged scores (also written to `folder`; meta["reused"] says what was computed).
    """
    folder = Path(folder)
    meta = Scores.load(folder).meta  # verified: a damaged folder is a ScoreError here
    if loaded is None:
        loaded = load(model_spec_of(meta), dtype=meta.get("dtype") or "auto", device=device)
    source, n, t, seed = calibration_of(meta, str(folder))
    if depth_samples is None:
        depth_samples = default_depth_samples(n, execution_device(loaded.model).type)
    block_size = block_size or (meta.get("block_size") if block_ppl else None)
    if block_ppl and not block_size:
        raise ScoreError(f"{folder} has no block scores: give a block size for the block perplexity sweep")
    config = ScoreConfig(aggregation=meta.get("aggregation") or ScoreConfig.aggregation, depth_ppl=True,
                         block_size=block_size, block_ppl=block_ppl, depth_samples=depth_samples,
                         batch_size=int((meta.get("config") or {}).get("batch_size") or ScoreConfig.batch_size))
    scores, _ = score(loaded, source, n, t, seed=seed, config=config,
                      out_dir=folder, progress=progress)
    return scores
