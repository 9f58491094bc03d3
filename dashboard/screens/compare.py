"""Compare page: teacher and distilled student side by side (size, perplexity, KL, speed, answers).

Numbers from the run's summary.json are shown at once; speed and answers come from a background job
that loads both models (the UI process never runs them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import streamlit as st

from dashboard import badges, exports, state, train_charts
from dashboard.common import user_message
from dashboard.views import show_fig

st.title("Compare")

from dashboard.device_panel import device_wait_notice  # noqa: E402
from dashboard.runs_io import list_runs  # noqa: E402  (a run with damaged files is listed, not a crash)
from engine.compare import start_compare_job  # noqa: E402
from engine.fileio import read_json  # noqa: E402
from engine.runs import Run, job_status  # noqa: E402

done = [r for r in list_runs(state.runs_root()) if r["status"].get("effective") == "done"
        and not r["problems"] and (r.get("summary") or {}).get("model_dir")]
if not done:
    st.info("No finished run yet. Launch one on **Distill**; when it is done, compare it here.")
    st.page_link("screens/distill.py", label="Go to Distill", icon=":material/school:")
    st.stop()

names = [r["name"] for r in done]
wanted = st.query_params.get("run")
run_id = st.selectbox("Run", names, index=names.index(wanted) if wanted in names else 0, key="cmp_run")
if run_id != wanted:
    st.query_params["run"] = run_id
r = next(x for x in done if x["name"] == run_id)
s, cfg = r["summary"], r["config"]
teacher_spec, student_dir = cfg.get("model", "default"), s["model_dir"]


@st.cache_data(show_spinner=False, max_entries=32)
def teacher_size(spec: str) -> int | None:
    from engine.models import resolve_spec
    from engine.speed import size_on_disk

    try:
        path = Path(resolve_spec(spec)[0])
    except Exception:  # noqa: BLE001
        return None
    return size_on_disk(path) if path.is_dir() else None


def disk(path: str | None) -> int | None:
    from engine.speed import size_on_disk

    return size_on_disk(path) if path and Path(path).is_dir() else None


def training_note(cfg: dict, s: dict) -> tuple[str, bool]:
    """How long the student was distilled, and whether that is a short demo (few tokens): what to expect."""
    d = cfg.get("distill") or {}
    steps, batch, seq = int(d.get("steps") or 0), int(d.get("batch_size") or 0), int(d.get("seq_len") or 0)
    tokens = steps * batch * seq
    secs = (s.get("stage_seconds") or {}).get("distill")
    text = (f"The student was distilled for **{steps:,} steps** of {batch} × {seq} tokens = **{tokens:,} tokens**"
            + (f" ({secs / 60:.1f} min)" if secs else "") + ".")
    short = tokens < 10_000_000
    if short:
        text += (" That is a short demo: Minitron-style distillation uses billions of tokens. After this little "
                 "training expect fluent-looking text that may not answer the question, and a perplexity well above "
                 "the teacher's; the numbers below say how far it got.")
    return text, short


t_size, s_size = teacher_size(teacher_spec), disk(student_dir)
st.caption(f"Teacher **{'built-in SmolLM2-135M-Instruct' if teacher_spec == 'default' else teacher_spec}** · "
           f"student exported to `{student_dir}`")
badges.roundtrip_badge(student_dir)
note, short = training_note(cfg, s)
(st.warning if short else st.info)(note, icon=":material/school:")

PPL_MEANING = "exp of the mean next-token loss on held-out text; lower is better"
KL_MEANING = "nats per token between the two next-token distributions; 0 = the student predicts like the teacher"
rows = [
    ("Parameters", s.get("params_teacher"), s.get("params_student"), state.human, ""),
    ("Size on disk", t_size, s_size, state.human_bytes, ""),
    ("Held-out perplexity", s.get("ppl_teacher"), s.get("ppl_distilled"), lambda v: f"{v:.2f}", PPL_MEANING),
    ("KL to the teacher", 0.0, s.get("kl_distilled"), lambda v: f"{v:.4f}", KL_MEANING),
]
head = st.columns([2, 2, 2, 3])
head[0].markdown("&nbsp;")
head[1].markdown("#### Teacher")
head[2].markdown("#### Student")
for label, t, v, fmt, meaning in rows:
    c = st.columns([2, 2, 2, 3])
    c[0].markdown(f"**{label}**")
    c[1].markdown(fmt(t) if t is not None else "–")
    c[2].markdown(fmt(v) if v is not None else "–")
    c[3].caption(meaning)

if s.get("eval_sources"):
    st.markdown("**Per evaluation source** · breadth is teacher text from prompts never used for training; a "
                "ratio far above the in-domain one means the student learned the training domain and lost the rest")
    st.dataframe(train_charts.source_table(s["eval_sources"]), hide_index=True, key="cmp_source_table")

c1, c2 = st.columns(2)
with c1:
    show_fig(train_charts.compare_bars(["teacher", "pruned", "distilled"],
                                       [s.get("ppl_teacher"), s.get("ppl_one_shot"), s.get("ppl_distilled")],
                                       "Held-out perplexity (lower is better)", ".2f"), "cmp_ppl")
with c2:
    show_fig(train_charts.compare_bars(["teacher", "student"], [s.get("params_teacher"), s.get("params_student")],
                                       "Parameters", state.human, ["#2ca02c", "#d62728"]), "cmp_params")

exports.exports_section(student_dir, teacher_spec)  # lm-eval scores and GGUF files of the student

# ---------------------------------------------------------------- speed and answers (a background job)
st.subheader("Speed and answers")
prompt = st.text_area("Prompt", "What is the capital of France?", key="cmp_prompt", height=80)
max_new = st.slider("Answer length (tokens)", 8, 256, 48, 8, key="cmp_max_new")
key = hashlib.sha256(f"{prompt}|{max_new}".encode()).hexdigest()[:12]
out = Path(r["path"]) / "compare" / key
job = job_status(out)
if job is None or job.get("state") in ("failed", "cancelled"):
    if job and job.get("state") == "failed":
        st.error(f"The comparison failed: {job.get('error')}")
    if st.button("Measure speed and answer the prompt", type="primary", key="cmp_go", icon=":material/speed:"):
        try:
            start_compare_job(out, teacher_spec, student_dir, prompt, max_new)
        except Exception as e:  # noqa: BLE001
            st.error(user_message(e))
        else:
            st.rerun()
elif job.get("state") in ("queued", "running"):
    @st.fragment(run_every=1.0)
    def _progress() -> None:
        j = job_status(out) or {}
        if j.get("state") in ("queued", "running"):
            st.progress(float(j.get("progress") or 0), text=j.get("message") or "")
            device_wait_notice(j, "cmp")
        else:
            st.rerun(scope="app")

    _progress()
else:
    res = read_json(out / "result.json") or {}
    cols = st.columns(2)
    for col, who in zip(cols, ("teacher", "student"), strict=True):
        d = res.get(who) or {}
        tp = d.get("throughput") or {}
        with col, st.container(border=True):
            st.markdown(f"**{who.capitalize()}**" + (f" · weights in {d['dtype'].replace('torch.', '')}"
                                                       if d.get("dtype") else ""))
            m = st.columns(2)
            m[0].metric("Decode tokens/s", f"{tp.get('decode_tokens_per_s', 0):.1f}")
            m[1].metric("Prefill tokens/s", f"{tp.get('prefill_tokens_per_s', 0):,.0f}")
            ppl = s.get("ppl_teacher" if who == "teacher" else "ppl_distilled")
            kl = 0.0 if who == "teacher" else s.get("kl_distilled")
            st.caption(f"Held-out perplexity **{ppl:.2f}** ({PPL_MEANING})" if ppl else "Held-out perplexity: –")
            if who == "student" and kl is not None:
                st.caption(f"KL to the teacher **{kl:.4f}** ({KL_MEANING})")
            st.markdown(d.get("answer") or "_(empty answer)_")
    t_tp = ((res.get("teacher") or {}).get("throughput") or {}).get("decode_tokens_per_s")
    s_tp = ((res.get("student") or {}).get("throughput") or {}).get("decode_tokens_per_s")
    if t_tp and s_tp:
        st.caption(f"Student decodes {s_tp / t_tp:.2f}× as fast as the teacher (batch 1, greedy, this machine).")
    if st.button("Measure again", key="cmp_again"):
        Run(out).update(state="cancelled", message="measure again")
        st.rerun()
