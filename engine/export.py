"""Export a pruned model as a plain Hugging Face folder with a model card.

The folder holds safetensors weights, the config the model was built from (rebuilt from the pruned
shapes by engine.prune, never the source config.json), tokenizer, generation config, README.md
(model card), prunescope_plan.json and prunescope_export.json (what was written, and the model's
fingerprint, so re-exporting the same model into the folder is allowed).

It is written into a temporary sibling folder first and moved into place at the end, so a failed
export leaves nothing half-written; an existing folder holding another model is never overwritten
without `force`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

import engine
from engine.arch import get_adapter
from engine.devices import resolve_dtype
from engine.estimate import estimate
from engine.fileio import atomic_write_text
from engine.models import count_parameters, fingerprint
from engine.plan import Plan, dumps
from engine.roundtrip import RESULT_FILE, replace_section, verify_export
from engine.targets import Targets

log = logging.getLogger(__name__)

MARKER = "prunescope_export.json"
PLAN_FILE = "prunescope_plan.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _existing_owner(out: Path) -> str | None:
    """Fingerprint of the model a previous export left in `out` ("" if a model of unknown origin)."""
    if (out / MARKER).is_file():
        try:
            return str(json.loads((out / MARKER).read_text()).get("fingerprint", ""))
        except (json.JSONDecodeError, OSError):
            return ""
    return "" if (out / "config.json").exists() else None


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def model_card(model: torch.nn.Module, plan: Plan | None, scores_meta: dict | None, source_name: str,
               params_source: int | None) -> str:
    """README.md: source, targets, parameter counts, calibration data, scores summary, usage."""
    a = get_adapter(model)
    spec, params = a.spec(), count_parameters(model)
    meta = scores_meta or {}
    source = source_name or (plan.model if plan else "") or meta.get("model", "") or "unknown"
    lines = ["---", "library_name: transformers", "tags: [prunescope, pruned, minitron]"]
    if source != "unknown":
        lines.append(f"base_model: {source}")
    lines += ["---", "", f"# Pruned {source}", "",
              f"Structurally pruned with prunescope {engine.__version__} (Minitron-style: heads, MLP neurons, "
              f"embedding channels, layers) on {_dt.date.today().isoformat()}. Not distilled unless noted: "
              "expect lower quality than the source until it is retrained.", "", "## Parameters", ""]
    if params_source:
        lines.append(f"- source: {params_source:,} ({_fmt(params_source)})")
        lines.append(f"- pruned: {params:,} ({_fmt(params)}, {100 * params / params_source:.1f}% of the source)")
    else:
        lines.append(f"- pruned: {params:,} ({_fmt(params)})")
    lines.append(f"- weights stored as: {str(next(model.parameters()).dtype).replace('torch.', '')}")
    lines += ["", "## Architecture", "", "| | source | pruned |", "|---|---|---|"]
    src = plan.spec if plan else None
    for label, key in (("model_type", "model_type"), ("layers", "n_layers"), ("hidden size", "hidden_size"),
                       ("MLP intermediate", "intermediate_size"), ("query heads", "n_heads"),
                       ("KV heads", "n_kv_heads"), ("head_dim", "head_dim"), ("tied embeddings", "tied")):
        lines.append(f"| {label} | {getattr(src, key) if src else '?'} | {getattr(spec, key)} |")
    if plan is not None:
        t = plan.targets
        dropped = [i for i in range(plan.spec.n_layers) if i not in plan.kept_layers]
        lines += ["", "## Targets", "", f"- hidden {t.hidden or 'kept'}, ffn {t.ffn or 'kept'}, heads "
                  f"{t.heads or 'kept'}, layers {t.layers or 'kept'}",
                  f"- depth chosen by: {t.depth_by}; dropped source layers: {dropped or 'none'}",
                  f"- importance criterion (heads, neurons, channels): {t.criterion}",
                  f"- residual merge of pruned heads: {'yes' if plan.head_merge else 'no'}",
                  f"- refit by least squares: {_refit_line(plan.info.get('refit')) if t.refit else 'no'}",
                  f"- plan: `{PLAN_FILE}` (kept indices per layer and axis, source numbering)"]
    lines += ["", "## Calibration data and scores", ""]
    if meta:
        for label, key in (("data", "data"), ("samples", "n_samples"), ("sequence length", "seq_len"),
                           ("aggregation", "aggregation"), ("base perplexity", "base_ppl"),
                           ("Spearman(BI, ppl increase)", "spearman_bi_ppl"), ("fingerprint", "fingerprint")):
            if meta.get(key) is not None:
                v = meta[key]
                lines.append(f"- {label}: {v:.4g}" if isinstance(v, float) else f"- {label}: {v}")
    else:
        lines.append("- no scores metadata given")
    if plan is not None and plan.info:
        for k in ("bi", "ppl_increase"):
            if k in plan.info:
                lines.append(f"- {k} per source layer: {plan.info[k]}")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")', 'tokenizer = AutoTokenizer.from_pretrained("PATH")',
              "```", ""]
    return "\n".join(lines)


def _refit_line(info: dict | None) -> str:
    """What the refit did, from `engine.refit.refit_summary` (kept in the plan's info)."""
    if not info:
        return "yes"
    if not info["modules"]:
        return "yes (no layer lost input units: nothing to refit)"
    return (f"yes ({', '.join(info['modules'])} of {info['layers']} layers on {info['tokens']:,} calibration tokens, "
            f"ridge {info['damping']:g} x mean diagonal; relative reconstruction error {info['error_before']:.4f} -> "
            f"{info['error_after']:.4f})")


QUALITY_HEADING = "## Quality (held-out text)"


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def quality_section(summary: dict, method: str | None = None) -> str:
    """The model card's quality section from a run's summary: perplexity and KL to the teacher one-shot and
    after retraining, the tokens it took, teacher correction when there was one, and one row per evaluation
    source (the held-out part of each training source and the breadth set) when there were several."""
    lines = [QUALITY_HEADING, ""]
    if summary.get("tokens"):
        lines.append(f"- retrained on {int(summary['tokens']):,} tokens" + (f" ({method})" if method else ""))
    if summary.get("ppl_teacher_corrected") is not None:
        lines.append(f"- teacher correction on {int(summary.get('teacher_correction_tokens') or 0):,} tokens: teacher "
                     f"perplexity {_num(summary.get('ppl_teacher_original'), '.2f')} -> "
                     f"{_num(summary['ppl_teacher_corrected'], '.2f')}")
    lines += ["", "| | teacher | one-shot | retrained |", "|---|---:|---:|---:|",
              f"| perplexity | {_num(summary.get('ppl_teacher'), '.2f')} | {_num(summary.get('ppl_one_shot'), '.2f')} "
              f"| {_num(summary.get('ppl_distilled'), '.2f')} |",
              f"| KL to the teacher (nats/token) | 0 | {_num(summary.get('kl_one_shot'), '.4f')} "
              f"| {_num(summary.get('kl_distilled'), '.4f')} |"]
    per = summary.get("eval_sources") or {}
    if per:
        lines += ["", "Per evaluation source (breadth: teacher text from prompts never trained on):", "",
                  "| source | teacher ppl | one-shot ppl | retrained ppl | retrained / teacher | KL retrained |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in per.items():
            t, d = r.get("ppl_teacher"), r.get("ppl_distilled")
            ratio = _num(d / t, ".2f") + "x" if isinstance(t, (int, float)) and isinstance(d, (int, float)) and t else "–"
            lines.append(f"| {name} | {_num(t, '.2f')} | {_num(r.get('ppl_one_shot'), '.2f')} | {_num(d, '.2f')} "
                         f"| {ratio} | {_num(r.get('kl_distilled'), '.4f')} |")
    return "\n".join(lines) + "\n"


def write_quality_section(folder: Path, summary: dict, method: str | None = None) -> None:
    """Put (or replace) the quality section in the exported folder's model card."""
    card = Path(folder) / "README.md"
    if card.is_file():
        atomic_write_text(card, replace_section(card.read_text(encoding="utf-8"), QUALITY_HEADING,
                                                quality_section(summary, method)))


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, plan: Plan | None = None,
                 scores_meta: dict | None = None, source_name: str = "", force: bool = False,
                 params_source: int | None = None, verify: bool = True,
                 dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` (+ tokenizer, model card, plan) as a from_pretrained-loadable folder; returns it.

    With `verify` (the default) the folder is then reloaded in a fresh process and checked against
    `model` (engine.roundtrip.verify_export: logits, greedy tokens, parameters = the estimate); the
    result goes into the folder and the model card, and a failed check raises CheckpointError.

    dtype: the dtype the weights are stored in; None keeps the model's. The dtype rule: an export keeps
    the source checkpoint's dtype (`LoadedModel.source_dtype`) unless the user asked for another, so
    callers pass one of those. The model is converted in place first, so the round-trip check compares
    what was stored."""
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    out = Path(out_dir).expanduser().resolve()
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # as save_pretrained does; keeps fingerprint stable
    fp = fingerprint(model)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    owner = _existing_owner(out) if out.is_dir() else None
    if owner is not None and owner != fp and not force:
        raise FileExistsError(f"{out} already holds a different model; choose another output folder or use "
                              "--force (force=True) to overwrite it")
    if plan is not None and params_source is None:
        params_source = plan.estimate().source_params
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("exporting without a tokenizer: AutoTokenizer will not load from %s", out)
        (tmp / "README.md").write_text(model_card(model, plan, scores_meta, source_name, params_source))
        if plan is not None:
            (tmp / PLAN_FILE).write_text(dumps(plan.to_dict()) + "\n")
        files = sorted(p.name for p in tmp.iterdir()) + [MARKER]
        (tmp / MARKER).write_text(json.dumps({
            "fingerprint": fp, "source": source_name or (plan.model if plan else ""), "files": files,
            "params": count_parameters(model), "engine_version": engine.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, indent=2))
        _install(tmp, out, files, owner is not None or force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s parameters to %s", f"{count_parameters(model):,}", out)

    if verify:
        verify_export(out, model, expected_params=expected_params(model, plan))
    else:
        (out / RESULT_FILE).unlink(missing_ok=True)  # a previous model's check says nothing of this one
    return out


def expected_params(model: torch.nn.Module, plan: Plan | None) -> int:
    """Parameters the estimator predicts: for the plan's shapes, or for the model's own architecture."""

    if plan is not None:
        return plan.estimate().params
    return estimate(get_adapter(model).spec(), Targets()).params


def _install(tmp: Path, out: Path, files: list[str], replace_model: bool) -> None:
    """Move the finished export into `out`: a rename when `out` is new; otherwise stale weight files of
    the model being replaced are removed and each file is moved in (files of other tools are kept)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    clash = [f for f in files if (out / f).exists()]
    if clash and not replace_model:
        raise FileExistsError(f"{out} already holds {', '.join(clash)}; choose another output folder or use --force")
    if replace_model:
        old_files = set()
        if (out / MARKER).is_file():
            try:
                old_files = set(json.loads((out / MARKER).read_text()).get("files", []))
            except (json.JSONDecodeError, OSError):
                pass
        for p in out.iterdir():
            if p.is_file() and p.name not in files and (p.name in old_files or p.name.endswith(WEIGHT_SUFFIXES)):
                p.unlink()
    for f in files:
        os.replace(tmp / f, out / f)

