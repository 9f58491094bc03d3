"""The prune + distill job: score -> plan -> prune -> evaluate -> distill -> evaluate_final -> export.

`run_pipeline(run_dir)` does the stages of the run folder's config.json; each stage reports its
progress into status.json, and a resumed job skips the stages already done (the pruned student is
rebuilt from plan.json, which is deterministic and cheap; distillation continues from its last
checkpoint). A config with `student` set is a distill-only job for an already-pruned model:
evaluate -> distill -> evaluate_final -> export.

It runs as the "pipeline" and "distill" kinds of job (engine.jobs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from engine.distill import DistillConfig, distill
from engine.errors import Cancelled
from engine.fileio import read_json, write_json
from engine.runs import Run, barrier, world

log = logging.getLogger(__name__)

STAGES = ("score", "plan", "prune", "evaluate", "distill", "evaluate_final", "export")
DISTILL_STAGES = ("evaluate", "distill", "evaluate_final", "export")


@dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline (or distill-only) job does; saved as the run folder's config.json."""

    model: str = "default"  # the teacher / source model spec
    data: str = "generated"  # DataSource spec
    text_column: str | None = None
    train_range: tuple[float, float] = (0.0, 0.6)  # documents for calibration and training
    eval_range: tuple[float, float] = (0.6, 1.0)  # held-out documents for evaluation
    calib_samples: int = 32
    calib_seq_len: int = 256
    targets: dict = field(default_factory=dict)  # engine.plan.Targets fields
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval_samples: int = 16
    student: str | None = None  # an already-pruned model: distill-only job
    seed: int = 0
    dtype: str = "auto"  # teacher weights; the student trains with fp32 master weights
    device: str = "auto"

    @property
    def kind(self) -> str:
        return "distill" if self.student else "pipeline"

    @property
    def stages(self) -> tuple[str, ...]:
        return DISTILL_STAGES if self.student else STAGES

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(distill=self.distill.to_dict(), kind=self.kind, train_range=list(self.train_range),
                 eval_range=list(self.eval_range))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["distill"] = DistillConfig.from_dict(kw.get("distill") or {})
        for k in ("train_range", "eval_range"):
            if k in kw:
                kw[k] = tuple(float(x) for x in kw[k])
        return cls(**kw)


def create_run(run_dir: str | Path, config: PipelineConfig, force: bool = False) -> Run:
    """A new run folder holding this config (refuses an existing run unless force)."""
    if config.kind == "pipeline":
        from engine.plan import Targets

        Targets.from_dict(config.targets)  # fail now, not in the worker
    return Run.create(run_dir, config.to_dict(), force=force)


# ---------------------------------------------------------------- helpers


def token_blocks(source, tokenizer, n_max: int, seq_len: int, seed: int, model=None) -> torch.Tensor:
    """Up to n_max (N, seq_len) blocks of a source: all it has when that is fewer."""
    from engine.data import DataError, load_documents, make_blocks, tokenize_documents

    docs = load_documents(source, model=model, tokenizer=tokenizer, seed=seed)
    stream = tokenize_documents(docs, tokenizer) if docs else torch.zeros(0, dtype=torch.long)
    n = min(n_max, stream.numel() // seq_len)
    if n < 1:
        raise DataError(f"{source.label} has {stream.numel()} tokens: not one block of {seq_len}")
    return make_blocks(stream, n, seq_len, seed, what=source.label)


def score_config_for(targets) -> object:
    """The scores the depth method of these targets needs."""
    from engine.importance import ScoreConfig

    kw: dict = {}
    if targets.layers is not None:
        if targets.depth_by == "ppl":
            kw["depth_ppl"] = True
        elif targets.depth_by == "taylor":
            kw["taylor"] = True
    return ScoreConfig(**kw)


# ---------------------------------------------------------------- the job


def run_pipeline(run_dir: str | Path | Run, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run (or resume) the stages of the run folder's config; returns summary.json's content.

    Raises `engine.runs.Cancelled` when stopped (after distillation's final checkpoint)."""
    from engine.data import DataSource
    from engine.evaluate import evaluate_student
    from engine.models import count_parameters, load

    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)  # one Run per process: shared status
    cfg = PipelineConfig.from_dict(run.config())
    summary = read_json(run.path / "summary.json") or {"kind": cfg.kind, "model": cfg.model, "stage_seconds": {}}
    stop = should_stop or (lambda: False)
    main = world()[0] == 0  # under torchrun: rank 0 scores, plans, evaluates and exports

    def save_summary() -> None:
        if main:
            write_json(run.path / "summary.json", summary)

    def stage(name: str) -> Callable[[float, str], None]:
        if stop():
            raise Cancelled()
        run.set_stage(name, 0.0, f"{name}…")
        return run.progress_cb(name)

    def finish(name: str, t0: float, **info) -> None:
        summary["stage_seconds"][name] = round(time.time() - t0 + summary["stage_seconds"].get(name, 0), 2)
        save_summary()
        run.finish_stage(name, **info)

    t0 = time.time()
    run.set_stage(cfg.stages[0], 0.0, f"loading {cfg.model}")
    teacher = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    tok = teacher.tokenizer
    train_src = DataSource.parse(cfg.data, column=cfg.text_column, docs=cfg.train_range)
    eval_src = DataSource.parse(cfg.data, column=cfg.text_column, docs=cfg.eval_range)
    summary.update(data=train_src.label, params_teacher=count_parameters(teacher.model))
    plan = scores = None

    if cfg.kind == "pipeline":
        from engine.importance import Scores, score
        from engine.plan import Plan, Targets, make_plan
        from engine.prune import apply_plan

        targets = Targets.from_dict(cfg.targets)
        if main and not run.stage_done("score"):
            cb, t0 = stage("score"), time.time()
            scores, folder = score(teacher, train_src, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed,
                                   config=score_config_for(targets), progress=cb)
            scores.save(run.path / "scores")
            finish("score", t0, cache=str(folder))
        barrier()
        scores = Scores.load(run.path / "scores")
        if main and not run.stage_done("plan"):
            stage("plan")
            t0 = time.time()
            make_plan(scores, targets).save(run.path / "plan.json")
            finish("plan", t0)
        barrier()
        plan = Plan.load(run.path / "plan.json")
        cb, t0 = stage("prune"), time.time()
        student = apply_plan(teacher.model, plan)  # rebuilt on resume too: deterministic
        if not run.stage_done("prune"):
            summary.update(params_student=count_parameters(student),
                           params_ratio=count_parameters(student) / summary["params_teacher"])
            finish("prune", t0)
    else:
        from transformers import AutoModelForCausalLM

        from engine.models import resolve_device, resolve_spec

        path, kw = resolve_spec(cfg.student)
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
        student.to(resolve_device(cfg.device))
        summary.update(params_student=count_parameters(student),
                       params_ratio=count_parameters(student) / summary["params_teacher"])

    dcfg = cfg.distill
    if plan is not None and dcfg.hidden_weight and dcfg.layer_map is None:
        dcfg = replace(dcfg, layer_map=tuple(plan.kept_layers))
    eval_blocks = token_blocks(eval_src, tok, cfg.eval_samples, dcfg.seq_len, cfg.seed + 1, teacher.model)
    if main and not run.stage_done("evaluate"):
        cb, t0 = stage("evaluate"), time.time()
        r = evaluate_student(teacher.model, student, eval_blocks, dcfg.eval_batch_size, dcfg.temperature,
                             progress=lambda f, m: cb(0.2 + 0.8 * f, m))
        summary.update(ppl_teacher=r["teacher_ppl"],
                       ppl_one_shot=r["ppl"], kl_one_shot=r["kl"], eval_blocks=list(eval_blocks.shape))
        finish("evaluate", t0)

    result = None
    if not run.stage_done("distill") or not run.stage_done("export"):
        cb, t0 = stage("distill"), time.time()
        n_train = dcfg.total_steps(world()[1]) * dcfg.global_batch(world()[1])
        train = token_blocks(train_src, tok, n_train, dcfg.seq_len, cfg.seed, teacher.model)
        result = distill(teacher.model, student, train, eval_blocks, dcfg, run.path, progress=cb,
                         should_stop=stop, kept_channels=plan.channels if plan is not None else None)
        if result["stopped"]:
            summary["stage_seconds"]["distill"] = round(time.time() - t0, 2)
            save_summary()
            raise Cancelled()
        if not run.stage_done("distill"):
            summary.update(steps=result["steps"], tokens=result["tokens"], train_blocks=train.shape[0],
                           tokens_per_s=result["tokens"] / max(result["elapsed_s"], 1e-9))
            finish("distill", t0)

    if not main:
        return summary
    if not run.stage_done("evaluate_final"):
        cb, t0 = stage("evaluate_final"), time.time()
        last = (result or {}).get("last_eval") or {}
        if last.get("step") == dcfg.total_steps() and last.get("ppl") is not None:
            r = {"ppl": last["ppl"], "kl": last["kl"]}  # distillation's last eval: same blocks
        else:
            r = evaluate_student(teacher.model, student, eval_blocks, dcfg.eval_batch_size, dcfg.temperature,
                                 progress=cb)
        summary.update(ppl_distilled=r["ppl"], kl_distilled=r["kl"])
        finish("evaluate_final", t0)

    if not run.stage_done("export"):
        from engine.export import export_model

        stage("export")
        t0 = time.time()
        out = export_model(student, tok, run.path / "model", plan=plan,
                           scores_meta=scores.meta if scores is not None else None,
                           source_name=teacher.name, force=True)
        summary["model_dir"] = str(out)
        finish("export", t0)
    summary["finished"] = time.time()
    save_summary()
    return summary
