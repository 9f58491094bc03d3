"""The prune + distill job: score -> plan -> prune -> evaluate -> distill -> evaluate_final -> export.

`run_pipeline(run_dir)` does the stages of the run folder's config.json; each stage reports its
progress into status.json, and a resumed job skips the stages already done (the pruned student is
rebuilt from plan.json, which is deterministic and cheap; distillation continues from its last
checkpoint). A config with `student` set is a distill-only job for an already-pruned model:
evaluate -> distill -> evaluate_final -> export.

It runs as the "pipeline" and "distill" kinds of job (engine.jobs).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.arch import get_adapter
from engine.data import DataSource, get_blocks
from engine.devices import resolve_device, resolve_dtype
from engine.distill import DistillConfig, distill
from engine.errors import Cancelled
from engine.evaluate import evaluate_student
from engine.export import export_model, write_quality_section
from engine.fileio import read_json, read_jsonl, write_json
from engine.importance import Scores, compute_scores, score, score_config_for
from engine.mix import DataMix, eval_sets, evaluate_sources, mix_blocks
from engine.models import checkpoint_dtype, count_parameters, load, resolve_spec
from engine.plan import Plan, make_plan
from engine.prompts import is_teacher_spec
from engine.prune import apply_plan
from engine.refit import refit, refit_summary
from engine.resources import check_seq_len, model_config, preflight
from engine.runs import Run, barrier, world
from engine.targets import Targets

log = logging.getLogger(__name__)

STAGES = ("score", "plan", "prune", "evaluate", "distill", "evaluate_final", "export")
DISTILL_STAGES = ("evaluate", "distill", "evaluate_final", "export")


@dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline (or distill-only) job does; saved as the run folder's config.json."""

    model: str = "default"  # the teacher / source model spec
    data: str | list = "generated"  # a source spec, `mix:FILE` or [{"data", "weight"}, ...] (engine.mix)
    text_column: str | None = None
    train_range: tuple[float, float] = (0.0, 0.6)  # documents for calibration and training
    eval_range: tuple[float, float] = (0.6, 1.0)  # held-out documents for evaluation
    calib_samples: int = 32
    calib_seq_len: int = 256
    targets: Targets = field(default_factory=Targets)  # a dict is accepted and converted (validated)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval_samples: int = 16
    student: str | None = None  # an already-pruned model: distill-only job
    seed: int = 0
    dtype: str = "auto"  # teacher weights; the student trains with fp32 master weights
    device: str = "auto"
    teacher_correction_tokens: int = 0  # > 0: first fine-tune the teacher on the training data (CE)
    teacher_correction_lr: float = 1e-5
    breadth: str | None = "teacher"  # teacher text evaluated beside the held-out data (engine.mix); None: off
    calib_data: str | list | None = None  # calibration source(s) when they differ from `data` (None: `data`)

    def __post_init__(self) -> None:
        if isinstance(self.targets, dict):
            object.__setattr__(self, "targets", Targets.from_dict(self.targets))
        for name in ("data", "calib_data"):  # a mix checked, in its saved form
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value.startswith("mix:")):
                object.__setattr__(self, name, DataMix.of(value).to_config())

    @property
    def kind(self) -> str:
        return "distill" if self.student else "pipeline"

    @property
    def stages(self) -> tuple[str, ...]:
        first = ("correct_teacher",) if self.teacher_correction_tokens else ()
        return first + (DISTILL_STAGES if self.student else STAGES)

    @property
    def loads_teacher(self) -> bool:
        """Whether the job needs the teacher at all: a distill-only job whose method never runs it
        (cpt, LoRA on ce) on file data does not load it (evaluations then report no KL)."""
        return (self.kind == "pipeline" or self.distill.needs_teacher or self.teacher_correction_tokens > 0
                or DataMix.of(self.data).needs_model)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(distill=self.distill.to_dict(), kind=self.kind, targets=self.targets.to_dict(),
                 train_range=list(self.train_range),
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


def check_sizes(config: PipelineConfig) -> None:
    """Before a job exists: sequence lengths within the models' positions, and the estimated peak
    memory of a distillation step within the device's free memory (ResourceError naming what fits)."""
    d = config.distill
    dev = resolve_device(config.device)
    amp = resolve_dtype(d.dtype, dev) == torch.bfloat16
    source = model_config(config.model)
    if source is not None and config.kind == "pipeline":
        check_seq_len(source, config.calib_seq_len, "--calib-seq-len")
    preflight(config.student or config.model, kind="distill", batch=d.batch_size, seq_len=d.seq_len,
              device=config.device, teacher=config.model if d.needs_teacher else None, amp=amp)


def create_run(run_dir: str | Path, config: PipelineConfig, force: bool = False) -> Run:
    """A new run folder holding this config (refuses an existing run unless force); the targets
    were validated when the config was made, and the sizes are checked here, before any job starts."""
    check_sizes(config)
    return Run.create(run_dir, config.to_dict(), force=force)


# ---------------------------------------------------------------- what the stages share


@dataclass
class Job:
    """What the stages of one pipeline job read and write (one per process)."""

    run: Run
    cfg: PipelineConfig
    stop: Callable[[], bool]
    main: bool  # rank 0 under torchrun: it scores, plans, evaluates, exports and writes the folder
    summary: dict
    teacher: Any = None  # engine.models.LoadedModel (None when the job does not need it)
    tokenizer: Any = None
    train_src: DataSource | None = None
    eval_src: DataSource | None = None
    calib_src: DataSource | None = None  # the one calibration source (None: a mix, see calib_mix)
    calib_mix: DataMix | None = None
    dcfg: DistillConfig | None = None
    eval_blocks: torch.Tensor | None = None
    mix: DataMix | None = None  # the sources with their weights (one source: weight 1)
    eval_sets: dict[str, torch.Tensor] = field(default_factory=dict)  # held-out blocks per source + breadth
    scores: Any = None  # engine.importance.Scores
    plan: Any = None  # engine.plan.Plan
    student: torch.nn.Module | None = None
    result: dict | None = None
    t0: float = 0.0

    def save_summary(self) -> None:
        if self.main:
            write_json(self.run.path / "summary.json", self.summary)

    def begin(self, name: str, message: str = "") -> Callable[[float, str], None]:
        """Enter a stage: stop if asked, report it, start its clock; its progress callback."""
        if self.stop():
            raise Cancelled()
        self.run.set_stage(name, 0.0, message or f"{name}…")
        self.t0 = time.time()
        return self.run.progress_cb(name)

    def done(self, name: str, **info) -> None:
        secs = self.summary.setdefault("stage_seconds", {})
        secs[name] = round(time.time() - self.t0 + secs.get(name, 0), 2)
        self.save_summary()
        self.run.finish_stage(name, **info)


# ---------------------------------------------------------------- the stages


def correct_teacher_stage(job: Job) -> None:
    """Teacher correction (Minitron in practice): fine-tune a copy of the teacher on the training
    data with next-token cross-entropy, keep it in the run folder (teacher_corrected/), and use it
    for every later stage. Resumable like distillation; a finished correction is loaded, not redone."""


    folder = job.run.path / "teacher_corrected"
    if job.run.stage_done("correct_teacher") and folder.is_dir():
        corrected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        cb = job.begin("correct_teacher", "fine-tuning the teacher on the training data")
        before = evaluate_student(None, job.teacher.model, job.eval_blocks, job.dcfg.eval_batch_size)["ppl"]
        ccfg = replace(job.dcfg, method="cpt", tokens=job.cfg.teacher_correction_tokens, lr=job.cfg.teacher_correction_lr,
                       hidden_weight=0.0, layer_map=None)
        n = ccfg.total_steps(world()[1]) * ccfg.global_batch(world()[1])
        train = train_blocks(job, n, ccfg.seq_len, job.cfg.seed + 2, "correction_mix")
        corrected = copy.deepcopy(job.teacher.model)
        r = distill(None, corrected, train, job.eval_blocks, ccfg, job.run.path / "teacher_correction",
                    progress=cb, should_stop=job.stop)
        if r["stopped"]:
            raise Cancelled()
        after = (r.get("last_eval") or {}).get("ppl") or evaluate_student(None, corrected, job.eval_blocks)["ppl"]
        if job.main:
            corrected.save_pretrained(folder, safe_serialization=True)
        barrier()
        job.summary.update(ppl_teacher_original=before, ppl_teacher_corrected=after,
                           teacher_correction_tokens=r["tokens"])
        job.done("correct_teacher", ppl_before=before, ppl_after=after)
    corrected.to(next(job.teacher.model.parameters()).device).eval().requires_grad_(False)
    job.teacher.model = corrected


def score_stage(job: Job) -> None:
    """Importance scores of the teacher on the calibration data (the engine's cache, then a copy)."""

    cb = job.begin("score")
    targets = job.cfg.targets
    n_layers = get_adapter(job.teacher.model).n_layers
    config = score_config_for(targets.depth_by, n_layers - (targets.layers or n_layers))
    if job.calib_src is None:  # a mix (or teacher text): calibration blocks honour its weights, no cache
        blocks = calibration_blocks(job)
        scores = compute_scores(job.teacher.model, blocks, config, progress=cb)
        scores.meta.update(data=job.calib_mix.label, n_samples=int(blocks.shape[0]), seq_len=int(blocks.shape[1]),
                           seed=job.cfg.seed, model=job.teacher.name)
        scores.save(job.run.path / "scores")
        job.done("score")
        return
    scores, folder = score(job.teacher, job.calib_src, job.cfg.calib_samples, job.cfg.calib_seq_len,
                           seed=job.cfg.seed, config=config, progress=cb)
    scores.save(job.run.path / "scores")
    job.done("score", cache=str(folder))


def calibration_blocks(job: Job) -> torch.Tensor:
    """The calibration blocks the scores were computed on (the ones `score()` takes from one source, or the
    mix's); the refit fits on the same tokens."""
    cfg = job.cfg
    if job.calib_src is None:
        return train_blocks(job, cfg.calib_samples, cfg.calib_seq_len, cfg.seed, "calib_mix", job.calib_src,
                            job.calib_mix)
    return get_blocks(job.calib_src, job.tokenizer, cfg.calib_samples, cfg.calib_seq_len, cfg.seed,
                      model=teacher_model(job))


def load_scores(job: Job) -> None:

    job.scores = Scores.load(job.run.path / "scores")


def plan_stage(job: Job) -> None:

    job.begin("plan")
    make_plan(job.scores, job.cfg.targets).save(job.run.path / "plan.json")
    job.done("plan")


def load_plan(job: Job) -> None:

    job.plan = Plan.load(job.run.path / "plan.json")


def prune_stage(job: Job) -> None:
    """The student: trimmed from the teacher by the plan and, with targets.refit, refitted on the calibration
    blocks (both rebuilt on resume: deterministic), or the given pruned model of a distill-only job."""

    cb = job.begin("prune" if job.plan is not None else "evaluate", "building the student")
    if job.plan is not None:
        job.student = apply_plan(job.teacher.model, job.plan)
        if job.plan.targets.refit:
            report = refit(job.teacher.model, job.student, job.plan, calibration_blocks(job),
                           progress=lambda f, m: cb(0.05 + 0.95 * f, m))
            job.summary["refit"] = refit_summary(report)
            job.plan = job.plan.with_info(refit=job.summary["refit"])
    else:
        path, kw = resolve_spec(job.cfg.student)
        job.student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
        job.student.to(resolve_device(job.cfg.device))
    n = count_parameters(job.student)
    job.summary.update(params_student=n)
    if job.summary.get("params_teacher"):
        job.summary["params_ratio"] = n / job.summary["params_teacher"]
    if job.plan is not None and not job.run.stage_done("prune"):
        job.done("prune")


def evaluate_stage(job: Job) -> None:
    """One-shot quality of the student on the held-out blocks, with the teacher's perplexity."""

    cb = job.begin("evaluate")
    r = evaluate_student(teacher_model(job), job.student, job.eval_blocks, job.dcfg.eval_batch_size,
                         job.dcfg.temperature, progress=lambda f, m: cb(0.2 + 0.8 * f, m))
    job.summary.update(ppl_teacher=r["teacher_ppl"], ppl_one_shot=r["ppl"], kl_one_shot=r["kl"],
                       eval_blocks=list(job.eval_blocks.shape))
    evaluate_per_source(job, "one_shot", r)
    job.done("evaluate")


def distill_stage(job: Job) -> None:
    """Distillation, continued from its last checkpoint (also re-entered to get the trained
    weights back when only the export is left)."""
    cb = job.begin("distill")
    world_size = world()[1]
    n_train = job.dcfg.total_steps(world_size) * job.dcfg.global_batch(world_size)
    train = train_blocks(job, n_train, job.dcfg.seq_len, job.cfg.seed, "data_mix")
    job.result = r = distill(teacher_model(job), job.student, train, job.eval_blocks, job.dcfg, job.run.path,
                             progress=cb, should_stop=job.stop,
                             kept_channels=job.plan.channels if job.plan is not None else None,
                             eval_sets=job.eval_sets if len(job.eval_sets) > 1 else None)
    if r["stopped"]:
        job.summary.setdefault("stage_seconds", {})["distill"] = round(time.time() - job.t0, 2)
        job.save_summary()
        raise Cancelled()
    if not job.run.stage_done("distill"):
        job.summary.update(steps=r["steps"], tokens=r["tokens"], train_blocks=train.shape[0],
                           tokens_per_s=r["tokens"] / max(r["elapsed_s"], 1e-9),
                           peak_memory_bytes=r["peak_memory_bytes"])
        job.done("distill")


def final_evaluate_stage(job: Job) -> None:
    """Quality after distillation: distillation's last evaluation when it covered the last step."""

    cb = job.begin("evaluate_final")
    last = (job.result or {}).get("last_eval") or {}
    if last.get("step") == job.dcfg.total_steps() and last.get("ppl") is not None:
        r = {"ppl": last["ppl"], "kl": last["kl"]}  # the same blocks
    else:
        r = evaluate_student(teacher_model(job), job.student, job.eval_blocks, job.dcfg.eval_batch_size,
                             job.dcfg.temperature, progress=cb)
    job.summary.update(ppl_distilled=r["ppl"], kl_distilled=r["kl"])
    evaluate_per_source(job, "distilled", r, step=job.dcfg.total_steps())
    job.done("evaluate_final")


def export_dtype(job: Job):
    """Exports keep the source checkpoint's storage dtype (the student trains in fp32 master weights)."""
    if job.teacher is not None:
        return job.teacher.source_dtype

    path, kw = resolve_spec(job.cfg.student)
    return checkpoint_dtype(path, **kw)


def export_stage(job: Job) -> None:

    job.begin("export")
    out = export_model(job.student, job.tokenizer, job.run.path / "model", plan=job.plan,
                       scores_meta=job.scores.meta if job.scores is not None else None,
                       source_name=job.teacher.name if job.teacher is not None else job.cfg.model, force=True,
                       dtype=export_dtype(job))
    write_quality_section(out, job.summary, job.dcfg.method)
    job.summary["model_dir"] = str(out)
    job.done("export")


@dataclass(frozen=True)
class Stage:
    """One step of the job. `main_only`: rank 0 does it, the others wait and then `load` its
    result; `again(job)`: run it even when status.json says it is done (resume needs its result)."""

    name: str
    work: Callable[[Job], None]
    main_only: bool = False
    load: Callable[[Job], None] | None = None
    again: Callable[[Job], bool] = lambda job: False


CORRECTION = Stage("correct_teacher", correct_teacher_stage, again=lambda job: True)  # loads when done
PIPELINE = (
    Stage("score", score_stage, main_only=True, load=load_scores),
    Stage("plan", plan_stage, main_only=True, load=load_plan),
    Stage("prune", prune_stage, again=lambda job: True),
    Stage("evaluate", evaluate_stage, main_only=True),
    Stage("distill", distill_stage, again=lambda job: not job.run.stage_done("export")),
    Stage("evaluate_final", final_evaluate_stage, main_only=True),
    Stage("export", export_stage, main_only=True),
)
DISTILL_ONLY = tuple(s for s in PIPELINE if s.name not in ("score", "plan"))


# ---------------------------------------------------------------- the job


def teacher_model(job: Job):
    """The teacher's module, or None when the job does not load one."""
    return job.teacher.model if job.teacher is not None else None


def setup_job(run: Run, stop: Callable[[], bool]) -> Job:
    """Load the teacher (when needed), parse the data sources, take the held-out blocks (every rank)."""

    cfg = PipelineConfig.from_dict(run.config())
    summary = read_json(run.path / "summary.json") or {"kind": cfg.kind, "model": cfg.model, "stage_seconds": {}}
    job = Job(run=run, cfg=cfg, stop=stop, main=world()[0] == 0, summary=summary)
    run.set_stage(cfg.stages[0], 0.0, f"loading {cfg.model if cfg.loads_teacher else cfg.student}")
    if cfg.loads_teacher:
        job.teacher = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
        job.tokenizer = job.teacher.tokenizer
        summary["params_teacher"] = count_parameters(job.teacher.model)
    else:
        path, kw = resolve_spec(cfg.student)
        job.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    job.mix = DataMix.of(cfg.data)
    job.train_src = single_source(job.mix, cfg.text_column, cfg.train_range)
    job.eval_src = single_source(job.mix, cfg.text_column, cfg.eval_range)
    job.calib_mix = DataMix.of(cfg.calib_data) if cfg.calib_data is not None else job.mix
    job.calib_src = single_source(job.calib_mix, cfg.text_column, cfg.train_range)
    summary.update(data=job.train_src.label if job.train_src else job.mix.label, method=cfg.distill.method)
    job.dcfg = cfg.distill
    # held-out blocks of each source (the first is the main held-out set) + the teacher-text breadth set
    job.eval_sets = eval_sets(job.mix, job.tokenizer, cfg.eval_samples, job.dcfg.seq_len, cfg.seed + 1,
                              docs=cfg.eval_range, breadth=cfg.breadth if job.teacher is not None else None,
                              model=teacher_model(job), column=cfg.text_column, cache_dir=run.path / "generated",
                              model_name=cfg.model)
    job.eval_blocks = next(iter(job.eval_sets.values()))
    return job


def single_source(mix: DataMix, column: str | None, docs: tuple[float, float]) -> DataSource | None:
    """The mix's one file / dataset / generated source over `docs`; None for a mix or teacher text."""
    if len(mix.specs) == 1 and not is_teacher_spec(mix.specs[0]):
        return DataSource.parse(mix.specs[0], column=column, docs=docs)
    return None


def train_blocks(job: Job, n: int, seq_len: int, seed: int, key: str, src: DataSource | None = None,
                 mix: DataMix | None = None) -> torch.Tensor:
    """Up to n training / calibration blocks: from the one source, or from the mix honouring its
    weights (the blocks and tokens taken from each source go into summary[key]). Default: the
    training data (`src` / `mix` choose another, as the calibration data)."""
    src, mix = (src, mix) if mix is not None else (job.train_src, job.mix)
    if src is not None:
        return get_blocks(src, job.tokenizer, n, seq_len, seed, model=teacher_model(job), up_to=True)
    blocks, _, info = mix_blocks(mix, job.tokenizer, n, seq_len, seed, docs=job.cfg.train_range,
                                 model=teacher_model(job), column=job.cfg.text_column,
                                 cache_dir=job.run.path / "generated", model_name=job.cfg.model)
    job.summary[key] = info
    return blocks


def evaluate_per_source(job: Job, when: str, main: dict, step: int | None = None) -> None:
    """Perplexity and KL of the student on each evaluation source alone, into summary["eval_sources"]
    as {source: {"ppl_<when>", "kl_<when>", "ppl_teacher", "blocks"}}. The main held-out set reuses
    `main`; distillation's rows of `step` in eval_sources.jsonl are reused when there."""
    if len(job.eval_sets) < 2:
        return
    done = {r["source"]: r for r in read_jsonl(job.run.path / "eval_sources.jsonl")
            if step is not None and r.get("step") == step}
    todo = {k: v for k, v in job.eval_sets.items() if v is not job.eval_blocks and k not in done}
    fresh = evaluate_sources(teacher_model(job), job.student, todo, job.dcfg.eval_batch_size, job.dcfg.temperature)
    per = job.summary.setdefault("eval_sources", {})
    for name, blocks in job.eval_sets.items():
        r = main if blocks is job.eval_blocks else fresh.get(name) or done[name]
        row = per.setdefault(name, {"blocks": int(blocks.shape[0])})
        row.update({f"ppl_{when}": r["ppl"], f"kl_{when}": r["kl"]})
        if r.get("teacher_ppl") is not None:
            row["ppl_teacher"] = r["teacher_ppl"]


def run_pipeline(run_dir: str | Path | Run, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run (or resume) the stages of the run folder's config; returns summary.json's content.

    Raises `engine.errors.Cancelled` when stopped (after distillation's final checkpoint)."""
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)  # one Run per process: shared status
    job = setup_job(run, should_stop or (lambda: False))
    stages = PIPELINE if job.cfg.kind == "pipeline" else DISTILL_ONLY
    for stage in ((CORRECTION,) if job.cfg.teacher_correction_tokens else ()) + stages:
        if stage.name == "distill" and job.plan is not None and job.dcfg.hidden_weight and job.dcfg.layer_map is None:
            job.dcfg = replace(job.dcfg, layer_map=tuple(job.plan.kept_layers))
        if not stage.main_only:
            if stage.again(job) or not run.stage_done(stage.name):
                stage.work(job)
            continue
        if job.main and not run.stage_done(stage.name):
            stage.work(job)
        barrier()
        if stage.load is not None:
            stage.load(job)
    job.summary["finished"] = time.time()
    job.save_summary()
    return job.summary
