"""The "search" and "preview" job kinds (see engine.jobs): run folders, resumable stages.

search: load -> score (unless a scores folder is given) -> enumerate -> teacher -> preview -> tournament
-> export. Files in the run folder:

    config.json        SearchConfig.to_dict() (kind "search")
    scores/            importance scores, when the job computed them
    shapes.json        every valid shape within the budget (exact parameters)
    candidates.jsonl   one row per previewed shape (appended; a resumed job previews only the rest)
    candidates.csv     every shape, its exact parameters and one-shot metrics (+ tournament results)
    metrics.jsonl      the tournament's rows (train: step, candidate, loss, kl_loss, grad_norm, lr,
                       blocks; eval: step, candidate, kl, ppl; ranking rows: ranking, kendall_tau)
    tournament/        checkpoints (safetensors + state.json)
    winner/            the winner, exported as a Hugging Face folder (promote it with `promote`)
    summary.json       counts, seconds per stage, the winner and the final ranking

preview: one set of targets, answered from the model's preview store when tried before.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.distill import DistillConfig
from engine.errors import Cancelled, PlanError, RunError
from engine.fileio import append_jsonl, atomic_write_text, read_json, read_jsonl, write_json
from engine.search import store
from engine.search.shapes import SearchSpace, Shape
from engine.search.store import PreviewConfig, eval_data  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CSV_COLUMNS = ("rank", "name", "kind", "hidden", "ffn", "heads", "layers", "params", "fraction", "kl", "ppl",
               "teacher_ppl", "seconds", "tournament_kl", "tournament_ppl", "tournament_steps", "tournament_rank",
               "experts")  # experts: per sparse layer of a mixture of experts (0: a dense model)


def cpu_distill() -> DistillConfig:
    """The tournament's default recipe on a CPU: 8 steps of 2 x 128 tokens per student."""
    return DistillConfig(steps=8, batch_size=2, seq_len=128, warmup_steps=2, eval_every=4, checkpoint_every=4)


@dataclass(frozen=True)
class SearchConfig:
    """What a search job does (config.json of its run folder)."""

    model: str = "default"
    data: str = "generated"
    text_column: str | None = None
    train_range: tuple[float, float] = (0.0, 0.6)
    eval_range: tuple[float, float] = (0.6, 1.0)
    space: dict = field(default_factory=lambda: {"budget": 0.75})  # SearchSpace fields
    scores: str | None = None  # a scores folder of this model; None: score it in the run folder
    calib_samples: int = 32
    calib_seq_len: int = 256
    eval_samples: int = 8
    eval_seq_len: int = 256
    eval_batch_size: int = 4
    top: int = 4
    halving: bool = False
    distill: DistillConfig = field(default_factory=cpu_distill)
    max_candidates: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        SearchSpace.from_dict(self.space)  # validate now, not in the worker
        if self.top < 1 or self.eval_samples < 1 or self.eval_seq_len < 2:
            raise PlanError("top and eval_samples must be >= 1 and eval_seq_len >= 2")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(kind="search", distill=self.distill.to_dict(), train_range=list(self.train_range),
                 eval_range=list(self.eval_range))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        kw = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        kw["distill"] = DistillConfig.from_dict(kw.get("distill") or {})
        for k in ("train_range", "eval_range"):
            if k in kw:
                kw[k] = tuple(float(x) for x in kw[k])
        return cls(**kw)


def create_search(run_dir: str | Path, config: SearchConfig, force: bool = False):
    """A new run folder for this search (engine.runs.Run)."""
    from engine.runs import Run

    return Run.create(run_dir, config.to_dict(), force=force)


# ---------------------------------------------------------------- shared setup


def _blocks(source, tokenizer, n_max: int, seq_len: int, seed: int, model) -> object:
    """Up to n_max (N, seq_len) blocks of a source (all it has when fewer)."""
    import torch

    from engine.data import DataError, load_documents, make_blocks, tokenize_documents

    docs = load_documents(source, model=model, tokenizer=tokenizer, seed=seed)
    stream = tokenize_documents(docs, tokenizer) if docs else torch.zeros(0, dtype=torch.long)
    n = min(n_max, stream.numel() // seq_len)
    if n < 1:
        raise DataError(f"{source.label} has {stream.numel()} tokens: not one block of {seq_len}")
    return make_blocks(stream, n, seq_len, seed, what=source.label)


def _scores(cfg_scores: str | None, loaded, run_path: Path | None, make: Callable | None):
    """The scores (loaded from a folder, or computed by `make`) after checking they fit the model."""
    from engine.importance import Scores
    from engine.models import fingerprint

    if cfg_scores:
        scores = Scores.load(cfg_scores)
    elif run_path is not None and Scores.exists(run_path / "scores"):
        scores = Scores.load(run_path / "scores")
    else:
        scores = make()
    fp = fingerprint(loaded.model)
    if scores.meta.get("fingerprint") and scores.meta["fingerprint"] != fp:
        raise PlanError(f"the scores were computed on another model (fingerprint {scores.meta['fingerprint']}, "
                        f"{loaded.name} has {fp}); rescore this model")
    return scores, fp


def preview_row(key: str, fp: str, skey: str, targets: dict, data: dict, n: int, t: int, result: dict,
                source: str, run: str) -> dict:
    return {"key": key, "model": fp, "scores": skey, "targets": targets, "data": data, "eval": [n, t],
            **result, "source": source, "run": run, "time": time.time()}


# ---------------------------------------------------------------- candidates.csv


def write_candidates_csv(path: Path, rows: list[dict], final: dict | None = None) -> None:
    """Every previewed shape, best one-shot KL first, with the tournament's results where present."""
    final = final or {}
    ordered = sorted(rows, key=lambda r: (r["kl"], r["name"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rank, r in enumerate(ordered, 1):
        f = final.get(r["name"]) or {}
        w.writerow({**r, **r.get("sizes", {}), "rank": rank, "seconds": round(r.get("seconds", {}).get("total", 0), 3),
                    "tournament_kl": f.get("kl"), "tournament_ppl": f.get("ppl"), "tournament_steps": f.get("step"),
                    "tournament_rank": f.get("rank")})
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------- the search job


class _Stages:
    """Stage bookkeeping of a job: start / finish with seconds in the summary; stop checks."""

    def __init__(self, run, summary: dict, should_stop: Callable[[], bool]):
        self.run, self.summary, self.should_stop = run, summary, should_stop

    def start(self, name: str, message: str = "") -> Callable[[float, str], None]:
        if self.should_stop():
            raise Cancelled()
        self.run.set_stage(name, 0.0, message or f"{name}…")
        self._t0 = time.time()
        return self.run.progress_cb(name)

    def finish(self, name: str, **info) -> None:
        sec = self.summary.setdefault("stage_seconds", {})
        sec[name] = round(sec.get(name, 0.0) + time.time() - self._t0, 2)
        write_json(self.run.path / "summary.json", self.summary)
        self.run.finish_stage(name, **info)


def search_job(run, should_stop: Callable[[], bool]) -> dict:
    """Run (or resume) a search in its run folder; returns summary.json's content."""
    from engine.arch.base import ArchSpec
    from engine.data import DataSource
    from engine.models import load
    from engine.plan import kept_layers
    from engine.search.preview import scores_digest, teacher_side
    from engine.search.shapes import enumerate_shapes
    from engine.targets import Targets

    cfg = SearchConfig.from_dict(run.config())
    space = SearchSpace.from_dict(cfg.space)
    summary = read_json(run.path / "summary.json") or {"kind": "search", "model": cfg.model}
    st = _Stages(run, summary, should_stop)
    st.start("load", f"loading {cfg.model}")
    loaded = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    st.finish("load")
    train_src = DataSource.parse(cfg.data, column=cfg.text_column, docs=cfg.train_range)

    def make_scores():
        from engine.importance import ScoreConfig, score

        cb = st.start("score")
        sc, _ = score(loaded, train_src, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed,
                      config=ScoreConfig(depth_ppl=space.depth_by == "ppl", taylor=space.depth_by == "taylor"),
                      progress=cb)
        sc.save(run.path / "scores")
        st.finish("score")
        return sc

    scores, fp = _scores(cfg.scores, loaded, run.path, make_scores)
    spec = ArchSpec.from_dict(scores.meta["arch"])
    st.start("enumerate")
    shapes = enumerate_shapes(spec, space, kept_layers=lambda n: kept_layers(
        scores, spec, Targets(layers=n, depth_by=space.depth_by), n))
    if cfg.max_candidates and len(shapes) > cfg.max_candidates:
        raise PlanError(f"{len(shapes)} shapes are within the budget, more than the {cfg.max_candidates} allowed; "
                        "use a coarser rounding, tighter bounds, fewer axes or a smaller tolerance")
    write_json(run.path / "shapes.json", {"space": space.to_dict(), "shapes": [s.to_dict() for s in shapes]})
    summary.update(n_candidates=len(shapes), source_params=shapes[0].params / shapes[0].fraction)
    st.finish("enumerate", candidates=len(shapes))

    st.start("teacher", "teacher log-probabilities on the evaluation set")
    eval_src = DataSource.parse(cfg.data, column=cfg.text_column, docs=cfg.eval_range)
    blocks = _blocks(eval_src, loaded.tokenizer, cfg.eval_samples, cfg.eval_seq_len, cfg.seed + 1, loaded.model)
    side = teacher_side(loaded.model, blocks, fp, cfg.eval_batch_size)
    summary.update(teacher_ppl=side.ppl, eval_blocks=list(blocks.shape))
    st.finish("teacher")

    rows = _preview_all(run, st, loaded, scores, spec, space, shapes, side, fp, scores_digest(scores), cfg)
    summary["preview_seconds_mean"] = sum(r["seconds"]["total"] for r in rows) / len(rows)
    result = _tournament(run, st, loaded, scores, spec, space, rows, side, cfg, train_src)
    final = {n: {**v, "rank": i + 1} for i, n in enumerate(result["final_ranking"])
             for v in [result["final"][n]]}
    write_candidates_csv(run.path / "candidates.csv", rows, final)
    summary.update(winner=result["winner"], final_ranking=result["final_ranking"], finished=time.time(),
                   top=[r["name"] for r in sorted(rows, key=lambda r: (r["kl"], r["name"]))[:cfg.top]])
    _export_winner(run, st, loaded, scores, spec, space, result["winner"])
    write_json(run.path / "summary.json", summary)
    return summary


def _preview_all(run, st: _Stages, loaded, scores, spec, space, shapes: list[Shape], side, fp: str, skey: str,
                 cfg: SearchConfig) -> list[dict]:
    """One-shot preview of every shape (reusing rows already in the run or the model's store)."""
    from engine.search.preview import preview

    model, calib = loaded.model, _calib(loaded, scores, space)

    cb = st.start("preview", f"{len(shapes)} candidates")
    path = store.store_path(fp)
    data = eval_data(cfg.data, cfg.text_column, cfg.eval_range, cfg.eval_samples, cfg.eval_seq_len, cfg.seed)
    done = {r["name"]: r for r in read_jsonl(run.path / "candidates.jsonl") if "kl" in r}
    rows = []
    for i, shape in enumerate(shapes):
        if st.should_stop():
            raise Cancelled()
        if shape.name not in done:
            targets = space.targets_for(shape, spec).to_dict()
            key = store.preview_key(fp, skey, targets, data, cfg.eval_samples, cfg.eval_seq_len)
            hit = store.stored(path, key)
            if hit is None:
                res = preview(model, scores, space.targets_for(shape, spec), side, cfg.eval_batch_size, calib)
                hit = preview_row(key, fp, skey, targets, data, cfg.eval_samples, cfg.eval_seq_len, res,
                                  "search", str(run.path))
                store.record(path, hit)
            row = {**hit, "name": shape.name, "kind": shape.kind}
            append_jsonl(run.path / "candidates.jsonl", row)
            done[shape.name] = row
            write_candidates_csv(run.path / "candidates.csv", list(done.values()))
        rows.append(done[shape.name])
        cb((i + 1) / len(shapes), f"{i + 1}/{len(shapes)} candidates, best KL "
           f"{min(r['kl'] for r in done.values()):.4f}")
    st.finish("preview", candidates=len(rows))
    return rows


def _calib(loaded, scores, space: SearchSpace):
    """The scores' calibration blocks when the candidates are refitted (None otherwise)."""
    from engine.importance import calibration_blocks

    return calibration_blocks(scores.meta, loaded) if space.refit else None


def _student(loaded, scores, spec, space: SearchSpace, name: str):
    """The one-shot pruned (and, with space.refit, refitted) student of a candidate (deterministic: rebuilt
    on resume)."""
    from engine.plan import make_plan
    from engine.prune import apply_plan
    from engine.refit import refit

    plan = make_plan(scores, space.targets_for(shape_of(name), spec))
    student = apply_plan(loaded.model, plan, check_fingerprint=False)
    if space.refit:
        refit(loaded.model, student, plan, _calib(loaded, scores, space))
    return student, plan


def shape_of(name: str) -> Shape:
    """A Shape from its name h<hidden>-f<ffn>-q<heads>-l<layers>[-e<experts>] (sizes only)."""
    return Shape.from_name(name)


def _truncate_metrics(run, step: int) -> None:
    """Keep the tournament rows up to the checkpoint's step: a resumed run rewrites the rest identically."""
    import json

    rows = [r for r in read_jsonl(run.metrics_file) if int(r.get("step", 0)) <= step]
    atomic_write_text(run.metrics_file, "".join(json.dumps(r, default=float) + "\n" for r in rows))


def _tournament(run, st: _Stages, loaded, scores, spec, space, rows: list[dict], side, cfg: SearchConfig,
                train_src) -> dict:
    """Distill the top K one-shot candidates side by side (resumes from tournament/)."""
    from engine.search.tournament import STATE_FILE, Tournament, schedule

    result = read_json(run.path / "tournament.json")
    if run.stage_done("tournament") and result:
        return result
    cb = st.start("tournament")
    top = [r["name"] for r in sorted(rows, key=lambda r: (r["kl"], r["name"]))[:cfg.top]]
    students = {name: _student(loaded, scores, spec, space, name)[0] for name in top}
    d = cfg.distill
    n_train = schedule(len(top), d.total_steps(), cfg.halving)[-1][0] * d.global_batch()  # steps of the longest
    train = _blocks(train_src, loaded.tokenizer, max(n_train, 1), d.seq_len, cfg.seed, loaded.model)
    folder = run.path / "tournament"
    state = read_json(folder / STATE_FILE)
    _truncate_metrics(run, int(state["step"]) if state and state.get("names") == top else -1)
    t = Tournament(loaded.model, students, train, side, d, folder, halving=cfg.halving, log_row=run.log_metrics,
                   eval_batch_size=cfg.eval_batch_size)
    result = t.run(should_stop=st.should_stop, progress=cb)
    if result["stopped"]:
        raise Cancelled()
    write_json(run.path / "tournament.json", result)
    st.finish("tournament", winner=result["winner"])
    return result


def _export_winner(run, st: _Stages, loaded, scores, spec, space, winner: str) -> None:
    """The winner's distilled weights as a Hugging Face folder (run/winner), for promotion."""
    from safetensors.torch import load_file

    from engine.export import export_model
    from engine.search.tournament import STATE_FILE

    if run.stage_done("export"):
        return
    st.start("export")
    student, plan = _student(loaded, scores, spec, space, winner)
    state = read_json(run.path / "tournament" / STATE_FILE) or {}
    weights = load_file(str(run.path / "tournament" / state["dir"] / f"{winner}.safetensors"))
    student.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")}, strict=False)
    export_model(student, loaded.tokenizer, run.path / "winner", plan=plan, scores_meta=scores.meta,
                 source_name=loaded.name, force=True)
    st.finish("export", model_dir=str(run.path / "winner"))


def promote(search_dir: str | Path, run_dir: str | Path, steps: int | None = None, start: bool = True) -> Path:
    """A prune + distill run (kind "distill") that continues from the search winner's weights."""
    from engine.pipeline import PipelineConfig, create_run

    search = Path(search_dir)
    summary = read_json(search / "summary.json") or {}
    if not (search / "winner" / "config.json").is_file() or not summary.get("winner"):
        raise RunError(f"{search} has no finished tournament winner to promote (is the search done?)")
    cfg = SearchConfig.from_dict(read_json(search / "config.json") or {})
    from dataclasses import replace

    steps = steps or 60
    dcfg = replace(cfg.distill, steps=steps, tokens=None, eval_every=max(1, steps // 4),
                   checkpoint_every=max(1, steps // 4))
    pc = PipelineConfig(model=cfg.model, data=cfg.data, text_column=cfg.text_column, train_range=cfg.train_range,
                        eval_range=cfg.eval_range, distill=dcfg, student=str((search / "winner").resolve()),
                        seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    run = create_run(run_dir, pc)
    if start:
        from engine.runs import start_job

        start_job(run.path)
    return run.path


# ---------------------------------------------------------------- the preview job


def preview_job(run, should_stop: Callable[[], bool]) -> dict:
    """One preview: answered from the store when tried before, else computed and stored."""
    from engine.data import DataSource
    from engine.models import load
    from engine.search.preview import preview, teacher_side
    from engine.targets import Targets

    cfg = PreviewConfig.from_dict(run.config())
    fp, key, skey = cfg.key()
    path = store.store_path(fp)
    hit = store.stored(path, key)
    if hit is None:
        run.set_stage("preview", 0.0, f"loading {cfg.model}")
        loaded = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
        scores, fp_model = _scores(cfg.scores, loaded, None, None)
        if should_stop():
            raise Cancelled()
        run.set_stage("preview", 0.3, "teacher log-probabilities")
        src = DataSource.parse(cfg.data, column=cfg.text_column, docs=cfg.eval_range)
        blocks = _blocks(src, loaded.tokenizer, cfg.eval_samples, cfg.eval_seq_len, cfg.seed + 1, loaded.model)
        side = teacher_side(loaded.model, blocks, fp_model, cfg.eval_batch_size)
        if should_stop():
            raise Cancelled()
        run.set_stage("preview", 0.6, "pruning in memory and evaluating")
        targets, calib = Targets.from_dict(cfg.targets), None
        if targets.refit:
            from engine.importance import calibration_blocks

            run.set_stage("preview", 0.5, "refit on the calibration data")
            calib = calibration_blocks(scores.meta, loaded)
        res = preview(loaded.model, scores, targets, side, cfg.eval_batch_size, calib)
        data = eval_data(cfg.data, cfg.text_column, cfg.eval_range, cfg.eval_samples, cfg.eval_seq_len, cfg.seed)
        hit = preview_row(key, fp, skey, cfg.targets, data, cfg.eval_samples, cfg.eval_seq_len, res, "preview",
                          str(run.path))
        store.record(path, hit)
    write_json(run.path / "result.json", hit)
    run.finish_stage("preview", kl=hit["kl"], ppl=hit["ppl"])
    return hit
