"""The "score" kind of job: importance scores of a model on a data source, for the dashboard.

The job's run folder is `<scores folder>/job` (config.json, status.json, job.log); the scores go to
the scores folder itself (`config["out"]`), after the engine's own cache folder (so a pipeline run
reuses them). `score_command` is the `prunescope score` command line that does the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engine.importance import Scores
from engine.runs import Run, start_job

JOB_SUBFOLDER = "job"


def score_job_dir(scores_folder: str | Path) -> Path:
    """The run folder of the scoring job that writes `scores_folder`."""
    return Path(scores_folder) / JOB_SUBFOLDER


def score_job_config(out: Path, model: str, data: str, samples: int, seq_len: int, data_range: str = "",
                     depth_ppl: bool = False, block_size: int | None = None, column: str = "",
                     stream: str = "", depth_samples: int | None = None, add: bool = False) -> dict:
    """The config.json of a scoring job. `add`: add the perplexity sweep / blocks to the scores
    already in `out` without recomputing them; depth_samples: the sweep's samples (None: all on a
    GPU, at most 8 on a CPU)."""
    return {"kind": "score", "out": str(Path(out).resolve()), "model": model, "data": data,
            "data_range": data_range or "0:1", "text_column": column or None, "samples": int(samples),
            "seq_len": int(seq_len), "depth_ppl": bool(depth_ppl), "block_size": int(block_size or 0),
            "stream": stream or "", "device": "cpu" if stream else "auto",
            "depth_samples": int(depth_samples) if depth_samples else None, "add": bool(add)}


def score_command(cfg: dict) -> list[str]:
    """The `prunescope score` command line equivalent to a scoring job's config (shown to users)."""
    cmd = ["prunescope", "score", "--model", cfg["model"], "--data", cfg["data"]]
    if cfg.get("data_range") and cfg["data_range"] != "0:1":
        cmd += ["--data-range", cfg["data_range"]]
    if cfg.get("text_column"):
        cmd += ["--text-column", cfg["text_column"]]
    cmd += ["--samples", str(cfg["samples"]), "--seq-len", str(cfg["seq_len"])]
    if cfg.get("depth_ppl"):
        cmd.append("--depth-ppl")
    if cfg.get("block_size"):
        cmd += ["--blocks", str(cfg["block_size"])]
    if cfg.get("stream"):
        cmd += ["--stream", cfg["stream"]]
    if cfg.get("depth_samples"):
        cmd += ["--depth-samples", str(cfg["depth_samples"])]
    if cfg.get("add"):
        return cmd + ["--add-to", cfg["out"]]
    return cmd + ["--out", cfg["out"]]


def start_score_job(cfg: dict) -> Path:
    """Create the scoring run folder (replacing an earlier scoring job's) and start it detached."""
    path = score_job_dir(cfg["out"])
    Run.create(path, cfg, force=True)
    start_job(path)
    return path


def run_score_job(run: Run, should_stop: Callable[[], bool]) -> dict:
    """Work of a "score" job: load the model, score, save into the scores folder."""
    from engine.data import DataSource, parse_doc_range
    from engine.errors import Cancelled
    from engine.importance import ScoreConfig, score
    from engine.models import load

    cfg = run.config()
    out = Path(cfg["out"])
    if cfg.get("add") and Scores.exists(out):
        return _add_to_scores(run, cfg, out)
    t0 = time.time()
    run.set_stage("score", 0.0, "loading the model")
    source = DataSource.parse(cfg["data"], column=cfg.get("text_column"), docs=parse_doc_range(cfg["data_range"]))
    loaded = load(cfg["model"], stream=cfg.get("stream") or False)
    if should_stop():
        raise Cancelled()
    progress = run.progress_cb("score")
    progress(0.02, f"model loaded in {time.time() - t0:.1f}s; reading {source.label}")
    blocks = cfg.get("block_size") or None
    config = ScoreConfig(depth_ppl=cfg["depth_ppl"], block_size=blocks, block_ppl=bool(blocks and cfg["depth_ppl"]),
                         depth_samples=cfg.get("depth_samples"))
    scores, cached = score(loaded, source, cfg["samples"], cfg["seq_len"], config=config, progress=progress)
    scores.meta.setdefault("model", cfg["model"])
    scores.save(Path(cfg["out"]))
    run.finish_stage("score", engine_cache=str(cached))
    return {"engine_cache": str(cached)}


def _add_to_scores(run: Run, cfg: dict, out: Path) -> dict:
    """The sweep (and block scores) added to the scores in `out`; their width scores are kept."""
    from engine.importance import add_depth_scores

    run.set_stage("score", 0.0, f"adding to the scores in {out}")
    blocks = cfg.get("block_size") or None
    scores = add_depth_scores(out, depth_samples=cfg.get("depth_samples"), block_size=blocks,
                              block_ppl=bool(blocks and cfg["depth_ppl"]), device=cfg.get("device", "auto"),
                              progress=run.progress_cb("score"))
    run.finish_stage("score", added=True)
    return {"reused": scores.meta.get("reused")}
