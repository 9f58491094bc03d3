"""Run folders as the dashboard sees them: create + start a pipeline job, read its files, and the
CLI command that reproduces it. Thin wrappers over engine.runs / engine.pipeline (no Streamlit)."""

from __future__ import annotations

import re
import shlex
import shutil
import time
from pathlib import Path

from dashboard import state
from engine.data import parse_doc_range
from engine.run_files import number, read_status

TERMINAL = ("done", "failed", "cancelled", "stale")


def run_dir(run_id: str) -> Path:
    """The folder of a run id (a folder name under the runs root; no path tricks)."""
    if not run_id or not re.fullmatch(r"[A-Za-z0-9._-]+", run_id) or run_id in (".", ".."):
        raise ValueError(f"not a run id: {run_id!r}")
    return state.runs_root() / run_id


def new_run_id(model: str, targets: dict) -> str:
    name = "smollm2" if model in ("default", "builtin", "") else Path(model.rstrip("/")).name
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:24] or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


# The Distill page's default share of teacher-generated text in the training tokens. Measured on the
# built-in model (docs/BENCHMARKS.md, "Data mixes"): 30% kept most of the teacher's breadth for at most
# 5% more in-domain perplexity, on a depth- and on a width-pruned student.
TEACHER_SHARE = 0.3


def make_config(targets: dict, steps: int, batch: int, seq_len: int, lr: float, eval_every: int,
                eval_samples: int, kl_weight: float = 1.0, ce_weight: float = 0.0, hidden_weight: float = 0.0,
                temperature: float = 1.0, warmup: int | None = None, teacher_share: float = 0.0,
                teacher_temperature: float = 0.8, method: str = "kd", lora_rank: int = 16, lora_loss: str = "kd",
                correct_teacher_tokens: int = 0):
    """A PipelineConfig from the session's model/data/calibration settings and these knobs;
    teacher_share > 0 mixes that share of teacher-generated text into the training data (calibration
    stays on the session's data, the one the Importance page scored and its heatmaps show)."""
    from engine.distill import DistillConfig
    from engine.pipeline import PipelineConfig

    train = parse_doc_range(state.get("data_range"))
    if train[1] >= 1.0:
        raise ValueError("the calibration/training share of the documents ends at 100%, leaving nothing held out "
                         "for evaluation; lower it on the Model and data page (e.g. 0-0.6)")
    dcfg = DistillConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, eval_every=eval_every,
                         eval_samples=eval_samples, kl_weight=kl_weight, ce_weight=ce_weight,
                         hidden_weight=hidden_weight, temperature=temperature,
                         warmup_steps=min(10, max(1, steps // 10)) if warmup is None else warmup,
                         checkpoint_every=max(eval_every, 50), method=method, lora_rank=lora_rank, lora_loss=lora_loss)
    t = {k: v for k, v in targets.items() if v not in (None, False) or k == "depth_by"}
    data = calib = state.get("data")
    if teacher_share > 0:
        data = [{"data": calib, "weight": 1 - teacher_share},
                {"data": f"teacher:0:{teacher_temperature:g}", "weight": teacher_share}]
    return PipelineConfig(model=state.get("model"), data=data, calib_data=calib if teacher_share > 0 else None,
                          text_column=state.get("text_column") or None,
                          train_range=train, eval_range=(train[1], 1.0), calib_samples=int(state.get("samples")),
                          calib_seq_len=int(state.get("seq_len")), targets=t, distill=dcfg, eval_samples=eval_samples,
                          teacher_correction_tokens=int(correct_teacher_tokens))


def launch(run_id: str, config) -> Path:
    """Create the run folder and start its detached job."""
    from engine.pipeline import create_run
    from engine.runs import start_job

    path = run_dir(run_id)
    create_run(path, config)
    start_job(path)
    return path


def cli_command(cfg: dict, path: Path) -> str:
    """The `prunescope run` (or `distill`) command that reproduces a run's config.json."""
    d = cfg.get("distill") or {}
    kind = cfg.get("kind", "pipeline")
    cmd = ["prunescope", "run" if kind == "pipeline" else "distill"]
    if kind == "pipeline":
        cmd += ["--model", cfg.get("model", "default")]
        t = cfg.get("targets") or {}
        for k in ("hidden", "ffn", "heads", "layers"):
            if t.get(k) is not None:
                cmd += [f"--{k}", str(t[k])]
        if t.get("depth_by") == "list" and isinstance(t.get("drop_layers"), list):
            cmd += ["--drop-layers", ",".join(str(i) for i in t["drop_layers"])]
        elif t.get("depth_by", "bi") != "bi":
            cmd += ["--depth-by", str(t["depth_by"])]
        if t.get("merge_heads"):
            cmd += ["--merge-heads"]
        if t.get("refit"):
            cmd += ["--refit"]
        if t.get("criterion"):
            cmd += ["--criterion", str(t["criterion"])]
        cmd += ["--calib-samples", str(cfg.get("calib_samples")), "--calib-seq-len", str(cfg.get("calib_seq_len"))]
        if isinstance(cfg.get("calib_data"), str):  # the Distill page's runs with teacher text: one source
            cmd += ["--calib-data", cfg["calib_data"]]
    else:
        cmd += ["--teacher", cfg.get("model", "default"), "--student", str(cfg.get("student"))]
    data = cfg.get("data")
    if isinstance(data, list):  # a mix: one --data per source, then their weights
        for m in data:
            cmd += ["--data", str(m["data"])]
        cmd += ["--mix", ",".join(f"{float(m['weight']):g}" for m in data)]
    else:
        cmd += ["--data", str(data)]
    if cfg.get("text_column"):
        cmd += ["--text-column", cfg["text_column"]]
    for flag, key in (("--train-range", "train_range"), ("--eval-range", "eval_range")):
        lo, hi = cfg.get(key) or (0, 1)
        cmd += [flag, f"{lo:g}:{hi:g}"]
    for flag, key in (("--steps", "steps"), ("--batch", "batch_size"), ("--seq-len", "seq_len"), ("--lr", "lr"),
                      ("--warmup", "warmup_steps"), ("--eval-every", "eval_every"),
                      ("--checkpoint-every", "checkpoint_every")):
        if d.get(key) is not None:
            cmd += [flag, f"{d[key]:g}" if isinstance(d[key], float) else str(d[key])]
    for flag, key, default in (("--kl-weight", "kl_weight", 1.0), ("--ce-weight", "ce_weight", 0.0),
                               ("--hidden-weight", "hidden_weight", 0.0), ("--temperature", "temperature", 1.0)):
        if d.get(key) is not None and float(d[key]) != default:
            cmd += [flag, f"{d[key]:g}"]
    if d.get("method", "kd") != "kd":
        cmd += ["--method", d["method"]]
        if d["method"] == "lora":
            cmd += ["--lora-rank", str(d.get("lora_rank", 16)), "--lora-loss", d.get("lora_loss", "kd")]
    if cfg.get("teacher_correction_tokens"):
        cmd += ["--correct-teacher-tokens", str(cfg["teacher_correction_tokens"])]
    cmd += ["--eval-samples", str(cfg.get("eval_samples", 16)), "--run-dir", str(path), "--detach"]
    return wrap_command(cmd)


def wrap_command(cmd: list[str], width: int = 88) -> str:
    """A shell command over several lines (`\\` continuations), breaking before `--flag`s."""
    lines, cur = [], ""
    i = 0
    while i < len(cmd):
        part = shlex.quote(cmd[i])
        if cmd[i].startswith("--") and i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
            part += " " + shlex.quote(cmd[i + 1])
            i += 1
        if cur and len(cur) + 1 + len(part) > width:
            lines.append(cur)
            cur = "  " + part
        else:
            cur = f"{cur} {part}" if cur else part
        i += 1
    lines.append(cur)
    return " \\\n".join(lines)


def is_mix(value) -> bool:
    """A data mix as config.json stores it (engine.mix.DataMix.to_config): [{"data": spec, "weight": w}, ...]."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("data"), str) and number(m.get("weight")) is not None for m in value)


def clean_config(raw) -> tuple[dict, list[str]]:
    """config.json content with the fields the pages read of the right type, and what was wrong."""
    if not isinstance(raw, dict):
        return {}, ["config.json is missing, unreadable or not a JSON object"]
    cfg, problems = dict(raw), []
    for key in ("targets", "distill"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            problems.append(f"config.json: {key} is not an object")
            cfg[key] = {}
    if cfg.get("data") is not None and not (isinstance(cfg["data"], str) or is_mix(cfg["data"])):
        problems.append(f"config.json: data {cfg['data']!r} is neither a data spec nor a list of "
                        "{data, weight} sources")
        cfg["data"] = str(cfg["data"])
    for key in ("model", "kind", "student", "text_column"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            problems.append(f"config.json: {key} {cfg[key]!r} is not text")
            cfg[key] = str(cfg[key])
    for key in ("train_range", "eval_range"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 2 and all(number(x) is not None for x in v)):
            problems.append(f"config.json: {key} {v!r} is not a [start, end] pair")
            cfg[key] = None
    return cfg, problems


def _clean_metrics(rows: list[dict]) -> list[dict]:
    """Metric rows whose step (and elapsed time, when present) are numbers; damaged rows are dropped."""
    return [r for r in rows if number(r.get("step")) is not None
            and ("elapsed_s" not in r or number(r["elapsed_s"]) is not None)]


def read_run(path: Path) -> dict:
    """status (cleaned, with `effective`), config, summary, metrics rows and `problems` (what is damaged
    in the run's files: a reader shows them as this run's error instead of failing)."""
    from engine.runs import Run, read_json, read_jsonl

    run = Run.open(path)
    status, problems = read_status(run.path)
    cfg, cfg_problems = clean_config(read_json(run.config_file))
    return {"status": status, "config": cfg, "summary": read_json(run.path / "summary.json") or {},
            "metrics": _clean_metrics(read_jsonl(run.metrics_file)), "problems": problems + cfg_problems}


def list_runs(root: Path) -> list[dict]:
    """Run folders under `root`, newest first: name, path, status, config, summary, problems. A run
    whose files are damaged is listed with its problems; one that cannot be read at all too."""
    from engine.runs import read_json

    out = []
    if not Path(root).is_dir():
        return out
    for d in sorted(Path(root).iterdir()):
        if not (d.is_dir() and (d / "config.json").is_file()):
            continue
        status, problems = read_status(d)
        cfg, cfg_problems = clean_config(read_json(d / "config.json"))
        out.append({"name": d.name, "path": str(d), "status": status, "config": cfg,
                    "summary": read_json(d / "summary.json") or {}, "problems": problems + cfg_problems})
    out.sort(key=lambda r: r["status"].get("created") or 0.0, reverse=True)
    return out


def eta_seconds(status: dict, rows: list[dict], total_steps: int) -> float | None:
    """Seconds left in distillation from the recent step rate (None before the first steps)."""
    train = [r for r in _clean_metrics(rows) if not r.get("eval") and "elapsed_s" in r]
    if status.get("stage") != "distill" or len(train) < 2:
        return None
    recent = train[-20:]
    dt = recent[-1]["elapsed_s"] - recent[0]["elapsed_s"]
    ds = recent[-1]["step"] - recent[0]["step"]
    if ds <= 0 or dt <= 0:
        return None
    return max(0.0, (total_steps - recent[-1]["step"]) * dt / ds)


def delete_run(path: Path) -> None:
    """Remove a finished run folder (refuses a live one)."""
    from engine.runs import RunError

    eff = read_status(path)[0]["effective"]
    if eff in ("queued", "running"):
        raise RunError(f"{path.name} is still {eff}; cancel it first")
    shutil.rmtree(path)


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def scores_csv(folder: Path) -> str:
    """Every score of a scores folder as long-form CSV: tensor, layer, index, score."""
    import io

    from engine.importance import Scores

    s = Scores.load(folder)
    buf = io.StringIO()
    buf.write("tensor,layer,index,score\n")
    for name in sorted(s.tensors):
        t = s.tensors[name].float()
        if t.dim() == 2:  # (L, X)
            for layer, row in enumerate(t.tolist()):
                buf.writelines(f"{name},{layer},{i},{v:.6g}\n" for i, v in enumerate(row))
        else:  # per layer / per block / per channel vectors
            per_layer = name in ("bi", "ppl_increase", "taylor", "block_bi", "block_ppl_increase")
            buf.writelines(f"{name},{i if per_layer else ''},{'' if per_layer else i},{v:.6g}\n"
                           for i, v in enumerate(t.tolist()))
    return buf.getvalue()


def run_rows(runs: list[dict]) -> list[dict]:
    """One table row per run: status and key numbers; a damaged run's row says what is wrong."""
    out = []
    for r in runs:
        st, cfg, s = r["status"], r["config"], r.get("summary") or {}
        t = cfg.get("targets") or {}
        problems = r.get("problems") or []
        created = number(st.get("created"))
        out.append({
            "run": r["name"], "state": "damaged" if problems else st.get("effective"),
            "stage": st.get("stage") or "", "progress": st.get("progress") or 0.0,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "",
            "model": cfg.get("model", ""),
            "targets": " ".join(f"{k}={t[k]}" for k in ("hidden", "ffn", "heads", "layers") if t.get(k) is not None),
            "params": number(s.get("params_student")), "of teacher": number(s.get("params_ratio")),
            "ppl teacher": number(s.get("ppl_teacher")), "ppl pruned": number(s.get("ppl_one_shot")),
            "ppl distilled": number(s.get("ppl_distilled")),
            "steps": int(steps) if (steps := number(s.get("steps")) or
                                    number((cfg.get("distill") or {}).get("steps"))) else None,
            "error": "; ".join(problems),
        })
    return out
