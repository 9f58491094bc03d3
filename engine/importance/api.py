"""The scoring API: `compute_scores` (in memory) and `score` (cached scores folder).

One calibration batch at a time: a width+BI forward pass of the base model (no lm_head unless a
perplexity is asked for) with hooks; when perplexities are asked for, the same pass caches the
input of every layer *for this batch only* (memory L x batch x T x D in the model dtype), the base
NLL is taken from its output, and the layer / block removal sweep restarts from those inputs.
Taylor+ is a separate pass with gradients.

A streamed model (`engine.importance.stream`, `load(..., stream=...)`) runs on its execution device
with each module's weights copied there only while it runs; the scores are the same, Taylor+ is
refused (it needs every layer's gradients at once), and meta["stream"] says how the weights rested.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

import engine
from engine.arch import get_adapter
from engine.importance.aggregate import DEFAULT_AGGREGATION, parse_aggregation, spearman
from engine.importance.criteria import criterion_tensors
from engine.importance.depth import lm_nll, removal_nll
from engine.importance.experts import ExpertCollector
from engine.importance.scores import ScoreError, Scores
from engine.importance.stream import execution_device, stream_info
from engine.importance.sweep import format_seconds, lm_head_layers
from engine.importance.taylor import taylor_scores
from engine.importance.width import WidthCollector
from engine.progress import Progress

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 1  # bump when a score's definition changes (invalidates caches)


@dataclass(frozen=True)
class ScoreConfig:
    """What to compute. `aggregation` is "<batch>_<seq>", each of l2 | mean | var."""

    aggregation: str = DEFAULT_AGGREGATION
    depth_ppl: bool = False  # per-layer perplexity increase sweep
    block_size: int | None = None  # contiguous blocks of n layers (block_bi always when set)
    block_ppl: bool = False  # also ppl with each block removed
    taylor: bool = False
    batch_size: int = 8
    # calibration samples the perplexity sweeps use (the first ones); None: all in compute_scores, the
    # device's default in score() (all on a GPU, at most 8 on a CPU)
    depth_samples: int | None = None

    def validate(self, n_layers: int) -> None:
        parse_aggregation(self.aggregation)
        if self.batch_size < 1:
            raise ScoreError(f"batch size must be >= 1, got {self.batch_size}")
        if self.depth_samples is not None and self.depth_samples < 1:
            raise ScoreError(f"depth samples must be >= 1 (or None for all), got {self.depth_samples}")
        if self.block_size is not None and not 1 <= self.block_size <= n_layers:
            raise ScoreError(f"block size must be between 1 and the model's {n_layers} layers, "
                             f"got {self.block_size}")
        if self.block_ppl and self.block_size is None:
            raise ScoreError("block perplexity needs a block size (--blocks N)")


def score_config_for(depth_by: str, drop: int, base: ScoreConfig | None = None) -> ScoreConfig:
    """The scores a depth criterion needs when `drop` layers go: the perplexity sweep for "ppl",
    Taylor+ for "taylor", block scores of `drop` layers for "block" (on top of `base`)."""
    cfg = base or ScoreConfig()
    if not drop:
        return cfg
    want = {"ppl": {"depth_ppl": True}, "taylor": {"taylor": True}, "block": {"block_size": drop}}
    return replace(cfg, **want.get(depth_by, {}))


class _Meter:
    """Maps work units (layer passes) to a 0..1 progress fraction, and an ETA, for the callback."""

    def __init__(self, total: float, progress: Progress | None):
        self.total, self.done, self.progress = max(total, 1e-9), 0.0, progress
        self.t0 = time.perf_counter()

    def step(self, units: float, message: str) -> None:
        self.done += units
        if self.progress is not None:
            elapsed = time.perf_counter() - self.t0
            if self.done < self.total and elapsed > 1.0:
                message += f" · about {format_seconds(elapsed * (self.total - self.done) / self.done)} left"
            self.progress(min(1.0, self.done / self.total), message)


def check_streaming(model: torch.nn.Module, config: ScoreConfig) -> None:
    """ScoreError for what a streamed model cannot score (Taylor+)."""
    info = stream_info(model)
    if info is not None and config.taylor:
        raise ScoreError(
            f"Taylor+ cannot be scored on a streamed model (weights kept on {info.offload}): it needs the "
            "gradients of every layer's weights at once, while streaming keeps only the running module's "
            "weights on the device; score Taylor+ without --stream / stream=, or drop --taylor")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sweep_batch(adapter, ids: torch.Tensor, final_hidden: torch.Tensor, captured: list[torch.Tensor],
                 config: ScoreConfig, sums: dict, timings: dict, meter: _Meter, units: dict, msg: str) -> None:
    """Base NLL and the layer / block removal sweeps of one batch (ids (m, T), captured layer inputs)."""
    L, n, m = adapter.n_layers, config.block_size, ids.shape[0]
    t0 = time.perf_counter()
    sums["base"] += lm_nll(adapter, final_hidden, ids).item()
    timings["base_ppl"] = timings.get("base_ppl", 0.0) + time.perf_counter() - t0
    meter.step(units["base"] * m, f"base perplexity, {msg}")
    head = units["base"]
    if config.depth_ppl:
        t0 = time.perf_counter()
        sums["layer"] += removal_nll(adapter, ids, captured, 1, on_step=lambda i: meter.step(
            (L - 1 - i + head) * m, f"perplexity without layer {i}, {msg}"))
        timings["depth_ppl"] = timings.get("depth_ppl", 0.0) + time.perf_counter() - t0
    if config.block_ppl:
        t0 = time.perf_counter()
        sums["block"] += removal_nll(adapter, ids, captured, n, on_step=lambda b: meter.step(
            (L - b - n + head) * m, f"perplexity without layers {b}..{b + n - 1}, {msg}"))
        timings["block_ppl"] = timings.get("block_ppl", 0.0) + time.perf_counter() - t0


def _depth_results(tensors: dict, sums: dict, config: ScoreConfig, D: int, T: int) -> dict:
    """Perplexity increases from the sweeps' summed NLLs (into `tensors`); their meta fields."""
    meta: dict = {}
    if not (config.depth_ppl or config.block_ppl):
        return meta
    n_pred = D * (T - 1)
    meta["base_ppl"] = math.exp(sums["base"] / n_pred)
    meta["depth_samples"] = D
    if config.depth_ppl:
        tensors["ppl_increase"] = (torch.exp(sums["layer"] / n_pred) - meta["base_ppl"]).float()
        if "bi" in tensors:
            meta["spearman_bi_ppl"] = spearman(tensors["bi"], tensors["ppl_increase"])
    if config.block_ppl:
        tensors["block_ppl_increase"] = (torch.exp(sums["block"] / n_pred) - meta["base_ppl"]).float()
    return meta


def _score_meta(model: torch.nn.Module, adapter, config: ScoreConfig, N: int, T: int, device: torch.device,
                timings: dict) -> dict:
    """What a scores file records about the model, the data sizes, the settings and the timings."""
    p = next(model.parameters())
    spec = adapter.spec()
    stream = stream_info(model)
    if stream is not None:  # `meta` placeholders all share data_ptr 0: tiedness was read before offloading
        spec = replace(spec, tied=stream.tied)
    return {
        "model_type": spec.model_type, "n_layers": adapter.n_layers, "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "arch": spec.to_dict(), "n_samples": N, "seq_len": T,
        "aggregation": config.aggregation, "block_size": config.block_size, "engine_version": engine.__version__,
        "algorithm_version": ALGORITHM_VERSION, "config": asdict(config),
        "dtype": str(p.dtype).replace("torch.", ""), "device": str(device),
        "stream": stream.offload if stream is not None else "off",
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def _progress_units(adapter, config: ScoreConfig, N: int, rows: int, D: int) -> tuple[dict, float]:
    """Progress in layer passes per sample: the cost of each kind of pass, and the whole job's."""
    L, n = adapter.n_layers, config.block_size
    head = lm_head_layers(adapter.spec().to_dict())
    units = {"forward": L, "base": head, "layer": L * (L - 1) / 2 + L * head,
             "block": sum(L - b - n for b in range(L - n + 1)) + (L - n + 1) * head if n else 0.0}
    total = rows * L + D * (head + (units["layer"] if config.depth_ppl else 0)
                            + (units["block"] if config.block_ppl else 0))
    return units, total + (3 * L * N if config.taylor else 0)


def compute_scores(model: torch.nn.Module, blocks: torch.Tensor, config: ScoreConfig = ScoreConfig(),
                   progress: Progress | None = None, width: bool = True) -> Scores:
    """Every importance score of `model` on calibration `blocks` (N, T) token ids; nothing written.

    Works on any model an adapter supports, pruned or not (widths are read from the activations).
    The perplexity sweeps use the first `config.depth_samples` blocks (all when None). `width=False`
    skips the width + BI statistics and computes only the sweeps / Taylor+ asked for (to add them to
    existing scores). `progress(fraction, message)` is called as work completes, with an ETA.
    """
    adapter = get_adapter(model)
    L = adapter.n_layers
    config.validate(L)
    check_streaming(model, config)
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] < 1:
        raise ScoreError(f"calibration blocks must be (n_samples, seq_len >= 2), got {tuple(blocks.shape)}")
    blocks = blocks.long()
    N, T = blocks.shape
    n = config.block_size
    device = execution_device(model)  # not `meta`, where a streamed model's weights rest between forwards
    bs = config.batch_size
    need_ppl = config.depth_ppl or config.block_ppl
    D = min(config.depth_samples or N, N) if need_ppl else 0  # samples the sweeps run on
    rows = N if width else D  # samples that go through the (capturing) forward pass
    n_batches = math.ceil(rows / bs)
    units, total = _progress_units(adapter, config, N, rows, D)
    meter = _Meter(total, progress)
    timings: dict[str, float] = {"width_bi": 0.0} if width else {}
    sums = {"base": 0.0, "layer": torch.zeros(L, dtype=torch.float64),
            "block": torch.zeros(L - n + 1, dtype=torch.float64) if n else None}
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    collector = WidthCollector(adapter, config.aggregation, n, capture=need_ppl)
    experts = ExpertCollector(model, when=lambda: collector.enabled) if width and ExpertCollector.applies(model) \
        else None  # mixtures of experts: experts and their neurons, from the same pass
    try:
        with torch.no_grad(), collector, experts or contextlib.nullcontext():
            for k in range(n_batches):
                ids = blocks[k * bs:min((k + 1) * bs, rows)].to(device)  # (b, T)
                m = max(0, min(D - k * bs, ids.shape[0]))  # rows of this batch the sweeps use
                msg = f"batch {k + 1}/{n_batches}"
                t0 = time.perf_counter()
                collector.enabled, collector.capture = True, m > 0
                collector.count_tokens(ids)
                out = adapter.base_model(input_ids=ids, use_cache=False)
                collector.enabled = False
                _sync(device)
                timings["width_bi" if width else "capture"] = timings.get(
                    "width_bi" if width else "capture", 0.0) + time.perf_counter() - t0
                meter.step(L * ids.shape[0], f"{'width + BI' if width else 'capture'} pass, {msg}")
                if m:
                    _sweep_batch(adapter, ids[:m], out.last_hidden_state[:m],
                                 [c[:m] for c in collector.captured], config, sums, timings, meter, units, msg)
                del out
                collector.clear_batch()
        tensors = collector.result() if width else {}
        if experts is not None:
            tensors.update(experts.result())
        if width:  # the weight-aware criteria: weight norms only, no extra pass
            info = stream_info(model)
            tensors.update(criterion_tensors(adapter, tensors, info.weights if info is not None else None))
        if config.taylor:
            t0 = time.perf_counter()
            tensors["taylor"] = taylor_scores(adapter, blocks, bs, on_batch=lambda k: meter.step(
                3 * L * bs, f"Taylor+ gradients, batch {k + 1}/{math.ceil(N / bs)}"))
            _sync(device)
            timings["taylor"] = time.perf_counter() - t0
    finally:
        model.train(was_training)

    meta = _depth_results(tensors, sums, config, D, T)
    timings["total"] = time.perf_counter() - t_start
    meta.update(_score_meta(model, adapter, config, N, T, device, timings))
    meta.setdefault("spearman_bi_ppl", None)
    meta.setdefault("base_ppl", None)
    log.info("scored %d layers on %d x %d tokens in %.1fs", L, N, T, timings["total"])
    if progress is not None:
        progress(1.0, "scores done")
    return Scores(tensors, meta)
