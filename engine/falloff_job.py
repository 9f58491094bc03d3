"""The "falloff" kind of job: how sharply a layer's output degrades as its lowest-ranked units are
zeroed, one curve per importance criterion (engine.importance.falloff), for the Importance page.

Run folder: `<scores folder>/falloff/layer<L>-<axis>-n<N>`; the curves are result.json. Torch-free
here: the work function imports the engine's heavy parts when the job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.errors import Cancelled
from engine.fileio import read_json, write_json
from engine.runs import Run, job_status, start_job


def falloff_job_dir(scores_folder: str | Path, layer: int, axis: str, n_samples: int) -> Path:
    return Path(scores_folder) / "falloff" / f"layer{int(layer)}-{axis}-n{int(n_samples)}"


def start_falloff_job(scores_folder: str | Path, layer: int, axis: str, n_samples: int) -> Path:
    """Create the job's folder (replacing an earlier one of the same settings) and start it detached."""
    path = falloff_job_dir(scores_folder, layer, axis, n_samples)
    cfg = {"kind": "falloff", "scores": str(Path(scores_folder).resolve()), "layer": int(layer), "axis": axis,
           "n_samples": int(n_samples), "device": "cpu"}
    Run.create(path, cfg, force=True)
    start_job(path)
    return path


def falloff_result(path: Path) -> list[dict] | None:
    """The curves of a finished job (None while there are none)."""
    st = job_status(path)
    if not st or st.get("state") != "done":
        return None
    return (read_json(path / "result.json") or {}).get("curves")


def run_falloff_job(run: Run, should_stop: Callable[[], bool]) -> dict:
    """Work of a "falloff" job: load the scored model, zero units in rank order, measure the output."""
    from engine.importance.falloff import falloff_for_scores

    cfg = run.config()
    run.set_stage("falloff", 0.05, "loading the scored model")
    if should_stop():
        raise Cancelled()
    curves = [c.to_dict() for c in falloff_for_scores(cfg["scores"], cfg["layer"], cfg["axis"],
                                                       n_samples=cfg["n_samples"], device=cfg.get("device", "cpu"))]
    write_json(run.path / "result.json", {"curves": curves})
    run.finish_stage("falloff")
    return {"curves": len(curves)}
