"""Distill page: launch prune + distill as a background job, then follow it live from its run folder.

The run id lives in the URL (`?run=<id>`), so a refresh or a shared link shows the same run.
"""

from __future__ import annotations

import time

import streamlit as st

from dashboard import badges, runs_io, state, train_charts
from dashboard.common import current_model_info, targets_obj, user_message
from dashboard.device_panel import device_wait_notice
from dashboard.views import show_fig

STAGE_ICONS = {"done": ":material/check_circle:", "running": ":material/progress_activity:"}

st.title("Distill")


def latest_run() -> dict | None:
    """The running (else queued, else newest) prune + distill run of the session's model, if any."""
    from engine.runs import list_runs

    mine = [r for r in list_runs(state.runs_root()) if r["config"].get("model") == state.get("model")
            and r["config"].get("kind", "pipeline") in ("pipeline", "distill")]
    for wanted in ("running", "queued"):
        live = [r for r in mine if r["status"].get("effective") == wanted]
        if live:
            return live[0]
    return mine[0] if mine else None


def loaded_plan(targets: dict) -> dict | None:
    """The plan opened on Prune targets, while the session's targets are still its own."""
    from dashboard.common import same_targets

    loaded = st.session_state.get("loaded_plan")
    return loaded if loaded and same_targets(loaded["plan"]["targets"], targets) else None


def launch(targets: dict, cfg, plan: dict | None) -> str:
    """Create the run folder and start it; an opened plan is written into it and applied as written."""
    run_id = runs_io.new_run_id(state.get("model"), targets)
    if plan is None:
        runs_io.launch(run_id, cfg)
        return run_id
    from engine.pipeline import create_run
    from engine.plan import Plan
    from engine.runs import start_job

    path = runs_io.run_dir(run_id)
    run = create_run(path, cfg)
    Plan.from_dict(plan["plan"]).save(path / "plan.json")
    run.finish_stage("plan", opened_from=plan["name"])  # the pipeline applies this plan instead of making one
    start_job(path)
    return run_id


METHODS = {"kd": "Distillation (KD)", "cpt": "Continued pretraining (CE)", "lora": "LoRA adapters"}
METHOD_HELP = ("KD distils the pruned model from the original (forward KL on logits; Minitron). Continued "
               "pretraining trains on next-token cross-entropy alone and never runs the teacher. LoRA trains small "
               "adapters on the frozen student (with the KD or the CE loss) and merges them at export. Measured on "
               "the built-in model at 75% of its parameters, 98,304 tokens each (docs/BENCHMARKS.md): KD and "
               "continued pretraining reach about the same perplexity (47.5 vs 48.3 on a depth-pruned student, "
               "62.3 vs 60.6 width-pruned), but only KD stays close to the teacher's distribution; LoRA ends far "
               "behind (71.4 and 92.4), as Shortened LLaMA found, for 0.3-0.5 GB less memory here; KD from a "
               "corrected teacher is best (45.4 and 57.9) for one more pass over the same tokens.")


def method_choice(targets: dict, batch: int, seq_len: int) -> tuple[str, int, str, int]:
    """Retraining method, LoRA settings and teacher correction, with each method's estimated peak memory."""
    method = st.radio("Method", list(METHODS), format_func=METHODS.get, horizontal=True, key="d_method",
                      help=METHOD_HELP)
    c = st.columns(3)
    rank = int(c[0].number_input("LoRA rank", 1, 1024, 16, key="d_lora_rank", disabled=method != "lora"))
    lora_loss = c[1].selectbox("LoRA trains on", ["kd", "ce"], key="d_lora_loss", disabled=method != "lora",
                               format_func={"kd": "the KD loss", "ce": "cross-entropy"}.get)
    correct = int(c[2].number_input("Teacher correction (tokens, 0 = off)", 0, 10**12, 0, step=4096,
                                    key="d_correct", help="First fine-tune the teacher on this many training "
                                    "tokens (cross-entropy, small learning rate) and distil from the corrected "
                                    "teacher (Minitron in practice)."))
    peaks = method_peaks(targets, batch, seq_len, rank, lora_loss)
    if peaks:
        st.caption("Estimated peak memory of one training step (weights, gradients or adapter gradients, AdamW "
                   "state, activations, teacher): " + " · ".join(
                       f"{'**' if m == method else ''}{METHODS[m]} {gb:.2f} GB{'**' if m == method else ''}"
                       for m, gb in peaks.items()) + ". The measured peak is recorded in the run's summary.")
    return method, rank, lora_loss, correct


def method_peaks(targets: dict, batch: int, seq_len: int, rank: int, lora_loss: str) -> dict[str, float]:
    """GB per method for the session's model pruned to `targets` (empty when that cannot be worked out)."""
    from engine.arch.base import ArchSpec
    from engine.resources import spec_config, training_peak
    from engine.targets import resolve

    info = current_model_info()
    try:
        spec = ArchSpec.from_dict(info["arch"])
        student = spec_config(spec, resolve(spec, targets_obj(targets)))
    except Exception:  # noqa: BLE001 - invalid targets are reported on Prune targets
        return {}
    amp = state.defaults().device == "cuda"
    return {m: training_peak(student, method=m, batch=batch, seq_len=seq_len, teacher_config=spec_config(spec),
                             lora_rank=rank, lora_loss=lora_loss, amp=amp).total / 1e9 for m in METHODS}


def launch_form() -> None:
    """Knobs of the prune + distill job and the launch button."""
    targets = state.get("targets") or {}
    active = latest_run()
    if active and active["status"].get("effective") in ("queued", "running"):
        st.warning(f"Run **{active['name']}** is {active['status']['effective']}: a new run waits for it to finish "
                   "(one job uses the device at a time).")
        if st.button(f"Back to run {active['name']}", key="d_back", icon=":material/arrow_back:"):
            st.session_state.pop("d_show_form", None)
            st.query_params["run"] = active["name"]
            st.rerun()
    picked = {k: targets.get(k) for k in ("hidden", "ffn", "heads", "layers") if targets.get(k) is not None}
    if targets.get("depth_by") == "list" and targets.get("drop_layers"):
        picked["drop layers"] = ", ".join(map(str, targets["drop_layers"]))
    if not picked:
        st.warning("No pruning targets yet: choose them on **Prune targets** first (or click a preset there).")
        st.page_link("screens/targets.py", label="Go to Prune targets", icon=":material/tune:")
        return
    st.markdown("**Prune to** " + " · ".join(f"{k} **{v}**" for k, v in picked.items())
                + f" (layers chosen by {targets.get('depth_by', 'bi')})")
    plan = loaded_plan(targets)
    if plan:
        st.caption(f"Plan: opened from `{plan['name']}`; its kept heads, neurons, channels and layers are applied "
                   "as written.")
    d = state.defaults()
    st.caption(f"Defaults for this machine ({'GPU' if d.device == 'cuda' else 'CPU'}): "
               f"{d.steps} steps of {d.batch} × {d.train_seq_len} tokens"
               + (" — a demo that finishes in about 5 minutes on a CPU." if d.device == "cpu" else "."))
    c = st.columns(4)
    steps = c[0].number_input("Steps", 1, 10_000_000, d.steps, key="d_steps")
    batch = c[1].number_input("Batch (sequences)", 1, 4096, d.batch, key="d_batch")
    seq_len = c[2].number_input("Sequence length", 8, 32768, d.train_seq_len, key="d_seq")
    lr = c[3].number_input("Learning rate", 1e-7, 1.0, d.lr, format="%.1e", key="d_lr")
    c = st.columns(4)
    eval_every = c[0].number_input("Evaluate every (steps)", 1, 1_000_000, d.eval_every, key="d_eval_every")
    eval_samples = c[1].number_input("Held-out samples", 1, 100_000, d.eval_samples, key="d_eval_samples")
    with st.expander("Loss"):
        c = st.columns(4)
        kl = c[0].number_input("KL weight (logits)", 0.0, 100.0, 1.0, key="d_kl")
        ce = c[1].number_input("Cross-entropy weight", 0.0, 100.0, 0.0, key="d_ce")
        hid = c[2].number_input("Hidden-state weight", 0.0, 100.0, 0.0, key="d_hidden")
        temp = c[3].number_input("Temperature", 0.05, 20.0, 1.0, key="d_temp")
    with st.expander("Data mix"):
        c = st.columns(2)
        share = c[0].slider("Teacher-generated text (share of training tokens)", 0.0, 0.9, runs_io.TEACHER_SHARE,
                            0.1, key="d_teacher_share",
                            help="Continuations the teacher writes from built-in everyday prompts, mixed with your "
                                 "data (calibration stays on your data): distilling on one narrow data set keeps "
                                 "that domain and loses the rest. Measured on the built-in model at 75% of its "
                                 "parameters (docs/BENCHMARKS.md): with 30% teacher text the students kept "
                                 "perplexity on unseen teacher text at 1.68x / 2.17x the teacher's (depth / width "
                                 "pruned) instead of 2.43x / 3.32x on WikiText alone, for 5.2% / 0.8% more WikiText "
                                 "perplexity. The teacher writes its text before training starts (minutes on a CPU).")
        gen_temp = c[1].number_input("Sampling temperature of the teacher's text", 0.1, 2.0, 0.8, 0.1,
                                     key="d_teacher_temp")
        st.caption("Every evaluation also reports a **breadth** set: teacher text from prompts never trained on.")
    with st.expander("Retraining method"):
        method, rank, lora_loss, correct = method_choice(targets, int(batch), int(seq_len))
    st.caption(f"{int(steps) * int(batch) * int(seq_len):,} training tokens")
    if st.button("Prune and distill", type="primary", key="d_launch", icon=":material/rocket_launch:"):
        try:
            cfg = runs_io.make_config(targets, int(steps), int(batch), int(seq_len), float(lr), int(eval_every),
                                      int(eval_samples), kl, ce, hid, temp, teacher_share=float(share),
                                      teacher_temperature=float(gen_temp), method=method, lora_rank=rank,
                                      lora_loss=lora_loss, correct_teacher_tokens=correct)
            run_id = launch(targets, cfg, plan)
        except Exception as e:  # noqa: BLE001 - plain message, nothing written is lost
            st.error(f"Could not start the run: {user_message(e)}")
            return
        st.session_state.pop("d_show_form", None)
        st.query_params["run"] = run_id
        st.rerun()


def stage_line(status: dict, stages: tuple[str, ...]) -> str:
    info = status.get("stages") or {}
    parts = []
    for s in stages:
        e = info.get(s) or {}
        mark = STAGE_ICONS.get(e.get("state"), ":material/radio_button_unchecked:")
        if e.get("state") == "running":
            mark += f" {100 * float(e.get('progress') or 0):.0f}%"
        parts.append(f"{mark} {s}")
    return " :material/arrow_right_alt: ".join(parts)


def live_view(run_id: str, smoothing: float, log_y: bool, x: str) -> None:
    """Everything read from the run folder; polled every 1.5 s while the job is active."""
    try:
        r = runs_io.read_run(runs_io.run_dir(run_id))
    except Exception as e:  # noqa: BLE001
        st.error(f"Cannot show run {run_id!r}: {user_message(e)}")
        return
    status, cfg, summary, rows = r["status"], r["config"], r["summary"], r["metrics"]
    eff = status.get("effective", "unknown")
    total = int((cfg.get("distill") or {}).get("steps") or 0)
    train = [row for row in rows if not row.get("eval")]
    last = train[-1] if train else {}
    run_buttons(runs_io.run_dir(run_id), eff)
    c = st.columns(5)
    c[0].metric("State", eff)
    c[1].metric("Stage", status.get("stage") or "–")
    c[2].metric("Step", f"{last.get('step', 0)} / {total}")
    c[3].metric("Tokens/s", f"{last['tokens_per_s']:,.0f}" if last.get("tokens_per_s") else "–")
    eta = runs_io.eta_seconds(status, rows, total) if eff == "running" else None  # none for queued/ended runs
    c[4].metric("ETA (distillation)", runs_io.fmt_duration(eta))
    st.progress(float(status.get("progress") or 0.0), text=f"{status.get('stage') or ''}: {status.get('message') or ''}")
    from engine.pipeline import DISTILL_STAGES, STAGES

    first = ("correct_teacher",) if cfg.get("teacher_correction_tokens") else ()
    st.caption(stage_line(status, first + (STAGES if cfg.get("kind", "pipeline") == "pipeline" else DISTILL_STAGES)))
    device_wait_notice(status if eff == "queued" else None, "d")
    if eff == "failed":
        st.error(f"The run failed: {status.get('error') or 'see job.log'}")
    elif eff == "stale":
        st.warning("The job's process is gone (machine restarted or killed). Resume it to continue from its last "
                   "checkpoint.")
    teacher = next((row.get("teacher_ppl") for row in rows if row.get("teacher_ppl")), summary.get("ppl_teacher"))
    left, right = st.columns(2)
    with left:
        show_fig(train_charts.loss_chart(rows, smoothing, log_y, x), "loss_chart")
        st.caption(train_charts.loss_explanation(cfg.get("distill")))
    with right:
        show_fig(train_charts.ppl_chart(rows, teacher, x, summary.get("ppl_one_shot")), "ppl_chart")
        st.caption("Perplexity of the student on held-out documents (never trained on): exp of the mean next-token "
                   "loss; lower is better, the teacher's is the floor to aim for.")
    sources_view(runs_io.run_dir(run_id), summary, x)
    if eff == "done":
        s = summary
        c = st.columns(4)
        c[0].metric("Parameters", state.human(s.get("params_student") or 0),
                    f"{((s.get('params_ratio') or 1) - 1) * 100:+.1f}%", delta_color="off")
        c[1].metric("Perplexity (teacher)", f"{s['ppl_teacher']:.2f}" if s.get("ppl_teacher") else "–")
        c[2].metric("Perplexity (pruned, before)", f"{s['ppl_one_shot']:.2f}" if s.get("ppl_one_shot") else "–")
        c[3].metric("Perplexity (distilled)", f"{s['ppl_distilled']:.2f}" if s.get("ppl_distilled") else "–")
        st.success(f"Exported to `{s.get('model_dir', '')}`")
        badges.roundtrip_badge(s.get("model_dir"))
        st.page_link("screens/compare.py", label="Compare teacher and student", icon=":material/compare_arrows:",
                     query_params={"run": run_id})
    was_active = st.session_state.get("_run_active")
    st.session_state["_run_active"] = eff in ("queued", "running")
    if was_active and eff not in ("queued", "running"):
        st.rerun(scope="app")  # stop polling: the page is redrawn without run_every


def sources_view(path, summary: dict, x: str) -> None:
    """The data mix (share and tokens of each source) and the held-out perplexity of each evaluation
    source against the teacher's, live from eval_sources.jsonl, then the final table."""
    from engine.fileio import read_jsonl

    mix = summary.get("data_mix") or summary.get("calib_mix")
    if mix:
        st.markdown("**Data mix** " + ("(distillation)" if summary.get("data_mix") else "(calibration)"))
        st.dataframe(train_charts.mix_table(mix), hide_index=True, key="d_mix_table")
    rows = read_jsonl(path / "eval_sources.jsonl") if (path / "eval_sources.jsonl").is_file() else []
    if rows:
        show_fig(train_charts.source_ppl_chart(rows, x), "source_ppl_chart")
        st.caption("Each source's held-out perplexity (solid) against the teacher's on the same text (dashed); "
                   "breadth is teacher-written text from prompts never used for training.")
    if summary.get("eval_sources"):
        st.dataframe(train_charts.source_table(summary["eval_sources"]), hide_index=True, key="d_source_table")


def run_buttons(path, eff: str) -> None:
    """Cancel / Resume, drawn inside the live fragment so they follow the run's state."""
    if eff in ("queued", "running"):
        if st.button("Cancel run", key="d_cancel", icon=":material/stop:", type="primary"):
            from engine.runs import cancel

            cancel(path)
            st.toast("Cancel requested: the job stops after its current step and keeps a checkpoint.")
    elif eff in ("cancelled", "failed", "stale"):
        if st.button("Resume", key="d_resume", icon=":material/replay:", type="primary"):
            from engine.runs import resume

            try:
                resume(path)
            except Exception as e:  # noqa: BLE001
                st.error(user_message(e))
            else:
                time.sleep(0.3)
                st.rerun(scope="app")


def run_view(run_id: str) -> None:
    try:
        path = runs_io.run_dir(run_id)
        status = runs_io.read_run(path)["status"]
    except Exception as e:  # noqa: BLE001
        st.error(f"There is no run {run_id!r} in {state.runs_root()}: {user_message(e)}")
        if st.button("Start a new run", key="d_new_missing"):
            st.session_state["d_show_form"] = True
            del st.query_params["run"]
            st.rerun()
        return
    active = status.get("effective") in ("queued", "running")
    top = st.columns([4, 1, 1])
    top[0].markdown(f"Run **{run_id}** · `{path}`")
    if top[1].button("New run", key="d_new", icon=":material/add:"):
        st.session_state["d_show_form"] = True
        del st.query_params["run"]
        st.rerun()
    top[2].page_link("screens/runs.py", label="All runs", icon=":material/folder_open:")
    c = st.columns([2, 1, 1])
    smoothing = c[0].slider("Smoothing", 0.0, 0.99, 0.6, 0.01, key="d_smooth")
    log_y = c[1].toggle("Log scale", value=False, key="d_log")
    x = c[2].radio("x axis", ["step", "tokens"], horizontal=True, key="d_x")
    st.session_state["_run_active"] = active
    st.fragment(live_view, run_every=1.5 if active else None)(run_id, smoothing, log_y, x)


run = st.query_params.get("run")
if not run and not st.session_state.get("d_show_form"):  # opened from the sidebar: this model's current run
    found = latest_run()
    if found:
        run = st.query_params["run"] = found["name"]
if run:
    run_view(run)
else:
    launch_form()
