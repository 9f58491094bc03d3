"""Every dashboard page under streamlit.testing.v1.AppTest, on a tiny llama and a tiny text file.

Jobs are real detached subprocesses (scoring, prune + distill, compare) on the tiny model; tests
wait for them with a timeout by calling `run()` again (`run_every` does not tick in AppTest).
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from tiny_models import _CORPUS, save_tiny

from dashboard.views import TABS

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
JOB_TIMEOUT = 150


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder, a small text file, and fresh runs / cache folders in the environment."""
    root = tmp_path_factory.mktemp("dash")
    model = save_tiny("llama", root / "tiny-llama")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 3}" for i in range(40)))
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNESCOPE_MODEL", str(model))
    mp.setenv("PRUNESCOPE_DATA", str(data))
    mp.setenv("PRUNESCOPE_RUNS", str(root / "runs"))
    mp.setenv("PRUNESCOPE_CACHE", str(root / "cache"))
    mp.setenv("PRUNESCOPE_LOCKS", str(root / "locks"))
    mp.setenv("PRUNESCOPE_DEVICE", "cpu")
    mp.setenv("OMP_NUM_THREADS", "1")  # jobs on tiny models: thread sync costs more than it saves
    yield {"root": root, "model": model, "data": data}
    mp.undo()


def app(page: str | None = None, fresh: bool = True, **session) -> AppTest:
    """The app on `page`; fresh=True forgets the choices a previous session saved."""
    if fresh:
        from dashboard import state

        state.prefs_file().unlink(missing_ok=True)
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["samples"] = 8
    at.session_state["seq_len"] = 32
    for k, v in session.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(f"screens/{page}.py").run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly charts on the page by key suffix, as parsed JSON specs."""
    out = {}
    for el in at.get("plotly_chart"):
        key = el.proto.id.rsplit("-", 1)[-1]
        for prefix in ("imp_", "tgt_"):
            key = key.removeprefix(prefix)
        out[key] = json.loads(el.proto.spec)
    return out


def score_charts(at: AppTest, prefix: str) -> dict[str, dict]:
    """Charts of every score tab (they are lazy: only the open tab's charts are built), opening each."""
    out = {}
    for label in TABS:
        at.session_state[f"{prefix}_tab"] = label
        at.run()
        assert not at.exception, at.exception
        out.update(charts(at))
    at.session_state[f"{prefix}_tab"] = TABS[0]
    return out


def open_tab(at: AppTest, prefix: str, label: str) -> AppTest:
    at.session_state[f"{prefix}_tab"] = label
    return at.run()


def array(v) -> np.ndarray:
    """A plotly array as sent to the browser (typed-array dict or a list)."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        return a.reshape([int(s) for s in str(shape).split(",")]) if shape else a
    return np.asarray(v)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def wait(at: AppTest, done, timeout: float = JOB_TIMEOUT) -> AppTest:
    t0 = time.time()
    while not done(at):
        assert time.time() - t0 < timeout, f"timed out; errors: {[e.value for e in at.error]}"
        time.sleep(1.0)
        at.run()
        assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def scored(env) -> AppTest:
    """The Importance page after computing scores with its button (a real background job)."""
    at = app("importance")
    assert not at.get("plotly_chart")
    at.button(key="score_start").click().run()
    return wait(at, lambda a: "heads" in charts(a))


# ---------------------------------------------------------------- Model and data


def test_model_page_shows_architecture(env):
    at = app()
    m = metrics(at)
    assert (m["Layers"], m["Query heads"], m["KV heads"], m["Hidden size"], m["MLP size"]) == ("4", "6", "2", "48", "37")
    assert any("llama" in c.value for c in at.caption)
    at.button(key="data_check").click().run()
    assert not at.error and "blocks of 32 tokens" in at.success[0].value


def test_model_page_bad_model_is_a_plain_error(env, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_MODEL", str(env["root"] / "no-such-model"))
    at = app()
    assert not at.exception
    assert "Could not load model" in at.error[0].value and "Traceback" not in at.error[0].value


def test_model_page_missing_column_is_explained(env):
    bad = env["root"] / "rows.jsonl"
    bad.write_text('{"body": "hello"}\n')
    at = app(data=str(bad))
    at.text_input(key="data_column").set_value("text").run()
    at.button(key="data_check").click().run()
    assert "no column 'text'" in at.error[0].value and "body" in at.error[0].value


def test_model_page_generated_data_is_labelled(env):
    at = app()
    at.radio(key="data_kind").set_value("Model-generated text").run()
    assert any("not real data" in c.value for c in at.caption)
    assert at.session_state["data"].startswith("generated")


# ---------------------------------------------------------------- Importance


def test_importance_heatmaps(scored):
    c = score_charts(scored, "imp")
    assert {"heads", "neurons", "chan_heat", "chan_bar", "layers"} <= set(c)
    heads = c["heads"]["data"][0]
    assert heads["type"] == "heatmap" and array(heads["z"]).shape == (4, 6)
    assert "importance" in heads["hovertemplate"]
    assert array(c["neurons"]["data"][0]["z"]).shape == (4, 37)  # 37 neurons < 128 bins: one per column
    assert len(c["heads"]["data"]) == 1  # no targets yet: no overlay


def test_importance_reads_cached_scores_without_a_job(scored, env):
    at = app("importance")
    assert set(charts(at)) == {"heads"} and not at.get("progress")  # lazy tabs: only the open one is drawn
    assert {"heads", "neurons", "chan_heat", "chan_bar", "layers"} <= set(score_charts(at, "imp"))


def test_importance_streamed_scoring_job(env):
    """'Stream layers' runs the scoring job with the weights offloaded; the page shows the same command."""
    at = app("importance", samples=6)  # another calibration size: its own scores folder
    at.selectbox(key="score_stream").set_value("cpu").run()
    assert any("--stream cpu" in c.value for c in at.code)
    at.button(key="score_start").click().run()
    wait(at, lambda a: "heads" in charts(a))
    metas = [json.loads(f.read_text()) for f in (env["root"] / "cache" / "dashboard-scores").glob("*/scores.json")]
    streamed = [m for m in metas if m["n_samples"] == 6]
    assert len(streamed) == 1 and streamed[0]["stream"] == "cpu" and streamed[0]["device"] == "cpu"


TORCH_FREE_PAGE = """
import sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=60)
at.session_state["scores_dir"] = sys.argv[2]
at.session_state["targets"] = {"ffn": 20, "heads": 4}
at.switch_page(sys.argv[3])  # opened directly, as a browser opening /importance or /targets does
at.run()
assert not at.exception, at.exception
assert len(at.get("plotly_chart")) >= 1, "no heatmap drawn"
print(sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules))
"""


@pytest.mark.parametrize("page", ["importance", "targets"])
def test_score_pages_do_not_import_torch(env, tmp_path, page):
    """A fresh dashboard process draws cached scores (and the cut of targets) without importing torch or
    transformers: their import is most of a warm start on a CPU box (docs/BENCHMARKS.md)."""
    import subprocess
    import sys

    from tiny_models import random_ids, tiny_model

    from engine.importance import ScoreConfig, compute_scores

    model = tiny_model("llama")
    compute_scores(model, random_ids(4, 16), ScoreConfig(depth_ppl=True)).save(tmp_path / "scores")
    page_file = str(Path(APP).parent / "screens" / f"{page}.py")
    out = subprocess.run([sys.executable, "-c", TORCH_FREE_PAGE, APP, str(tmp_path / "scores"), page_file],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


# ---------------------------------------------------------------- Prune targets


def test_targets_slider_updates_readout_and_overlay(scored, env):
    at = app("targets")
    before = metrics(at)
    assert before["Of the original"] == "100.00%"
    at.slider(key="t_ffn").set_value(20).run()
    after = metrics(at)
    assert after["Parameters"] != before["Parameters"] and after["Of the original"] != "100.00%"
    c = charts(open_tab(at, "tgt", "MLP neurons"))
    overlay = c["neurons"]["data"][1]
    assert overlay["hoverinfo"] == "skip" and array(overlay["z"]).dtype == np.uint8
    assert (array(overlay["z"]) == 255).sum() == 4 * (37 - 20)
    at.select_slider(key="t_heads").set_value(4).run() if at.select_slider else at.slider(key="t_heads").set_value(4).run()
    heads_overlay = array(charts(open_tab(at, "tgt", "Attention heads"))["heads"]["data"][1]["z"])
    assert ((heads_overlay == 255).sum(axis=1) == 2).all()  # 6 -> 4 heads in every layer
    assert at.get("download_button")
    at.button(key="plan_save").click().run()
    saved = Path(at.session_state["plan_path"])
    plan = json.loads(saved.read_text())
    assert plan["targets"]["ffn"] == 20 and len(plan["layers"][0]["neurons"]) == 20


def test_targets_refit_toggle_goes_into_the_targets_and_the_plan(scored, env):
    at = app("targets")
    assert at.toggle(key="t_refit").value is False and "refit" not in at.session_state["targets"]
    at.slider(key="t_ffn").set_value(20).run()
    at.toggle(key="t_refit").set_value(True).run()
    assert not at.exception
    assert at.session_state["targets"]["refit"] is True
    at.button(key="plan_save").click().run()
    plan = json.loads(Path(at.session_state["plan_path"]).read_text())
    assert plan["targets"]["refit"] is True


def test_targets_presets_and_depth(scored, env):
    at = app("targets")
    at.button(key="preset_depth-75").click().run()
    assert at.session_state["targets"]["layers"] == 3
    layers = charts(open_tab(at, "tgt", "Layers"))["layers"]
    assert len(layers["layout"]["shapes"]) == 1  # one dropped layer highlighted
    at.button(key="preset_none").click().run()
    assert metrics(at)["Of the original"] == "100.00%"


def test_targets_width_rounding(scored, env):
    """The tiny model's MLP (37) is no multiple of 8: rounding starts at 1; at 8 the sliders and presets follow it."""
    at = app("targets")
    assert at.session_state["t_round"] == 1
    at.session_state["t_round"] = 8
    at.run()
    assert at.select_slider(key="t_ffn").options == ["8", "16", "24", "32", "37"]  # multiples of 8, and the source
    at.button(key="preset_width-75").click().run()
    t = at.session_state["targets"]
    assert t["ffn"] is not None and t["ffn"] % 8 == 0 and (t["hidden"] is None or t["hidden"] % 8 == 0), t
    assert at.session_state["width_multiple"] == 8
    again = app("targets", fresh=False)  # the choice survives a reload
    assert again.session_state["t_round"] == 8
    again.session_state["t_round"] = 1
    again.run()


def test_pick_layers_by_hand_starts_from_the_criterion(scored, env):
    at = app("targets")
    at.button(key="preset_depth-75").click().run()  # BI drops 1 of 4 layers
    bands = charts(open_tab(at, "tgt", "Layers"))["layers"]["layout"]["shapes"]
    by_bi = [int(round((b["x0"] + b["x1"]) / 2)) for b in bands]
    assert len(by_bi) == 1
    at.radio(key="t_depth_by").set_value("list").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.multiselect(key="t_drop").value == by_bi
    assert at.session_state["targets"]["drop_layers"] == by_bi and metrics(at)["Of the original"] != "100.00%"
    assert any(f"drop layers {by_bi[0]}" in c.value for c in at.sidebar.caption)
    at.multiselect(key="t_drop").set_value([]).run()  # nothing to drop is a state, not an error
    assert not at.error and metrics(at)["Of the original"] == "100.00%"
    at.button(key="preset_none").click().run()


def _plan_file(env, folder: Path, name: str, edit=None) -> Path:
    from engine.importance import Scores
    from engine.plan import make_plan
    from engine.targets import Targets

    d = make_plan(Scores.load(folder), Targets(ffn=20, heads=4)).to_dict()
    if edit:
        edit(d)
    path = env["root"] / "plans" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(d))
    return path


def test_targets_open_a_plan_and_launch_it(scored, env):
    """An edited plan.json opened on Prune targets fills the sliders, its own kept units are drawn, and the run
    launched from Distill applies it as written."""
    folder = next((env["root"] / "cache" / "dashboard-scores").glob("*/scores.json")).parent

    def swap_neuron(d):  # keep a neuron the scores would prune instead of one they keep
        kept = d["layers"][0]["neurons"]
        d["layers"][0]["neurons"] = sorted(kept[1:] + [next(i for i in range(37) if i not in kept)])

    path = _plan_file(env, folder, "edited.json", swap_neuron)
    edited = json.loads(path.read_text())
    at = app("targets")
    at.text_input(key="plan_open_path").set_value(str(path))
    at.button(key="plan_open").click().run()
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["t_ffn"] == 20 and at.session_state["t_heads"] == 4
    assert any("Plan opened from" in s.value for s in at.success)
    ov = array(charts(open_tab(at, "tgt", "MLP neurons"))["neurons"]["data"][1]["z"])
    assert ov.shape == (4, 37)  # unsorted view below: the overlay follows the plan's lists
    at.session_state["tgt_sort"] = False
    ov = array(charts(at.run())["neurons"]["data"][1]["z"])
    assert list(np.flatnonzero(ov[0] == 0)) == edited["layers"][0]["neurons"]
    at.switch_page("screens/distill.py").run()
    at.session_state["d_show_form"] = True
    at.run()
    assert any("opened from" in c.value for c in at.caption)
    for key, value in (("d_steps", 2), ("d_batch", 2), ("d_seq", 32), ("d_eval_every", 2), ("d_eval_samples", 2)):
        at.number_input(key=key).set_value(value)
    at.button(key="d_launch").click().run()
    run_id = at.query_params["run"]
    wait(at, lambda a: metrics(a).get("State") in ("done", "failed", "cancelled", "stale"), timeout=240)
    assert metrics(at)["State"] == "done", [e.value for e in at.error]
    used = json.loads((env["root"] / "runs" / run_id / "plan.json").read_text())
    assert used["layers"][0]["neurons"] == edited["layers"][0]["neurons"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(layers=[0, 1, 2]), "plan field 'layers[0]' must be an object like"),
    (lambda d: d["arch"].update(vocab_size=12345), "is for another model"),
    (lambda d: d.update(fingerprint="0" * 16), "was made from scores of another model"),
    (lambda d: d["layers"][0].update(heads=[5, 1]), "indices must be sorted ascending"),
])
def test_targets_open_a_bad_plan_says_what_is_wrong(scored, env, edit, message):
    folder = next((env["root"] / "cache" / "dashboard-scores").glob("*/scores.json")).parent
    path = _plan_file(env, folder, "bad.json", edit)
    at = app("targets")
    at.text_input(key="plan_open_path").set_value(str(path))
    at.button(key="plan_open").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0] and "Error:" not in errors[0], errors
    assert "loaded_plan" not in at.session_state


# ---------------------------------------------------------------- Distill, Runs, Compare


@pytest.fixture(scope="module")
def finished_run(scored, env) -> tuple[AppTest, str]:
    at = app("targets")
    at.button(key="preset_width-75").click().run()
    at.session_state["d_show_form"] = True  # the launch form, even when an earlier run of this model exists
    at.switch_page("screens/distill.py").run()
    for key, value in (("d_steps", 6), ("d_batch", 2), ("d_seq", 32), ("d_eval_every", 3), ("d_eval_samples", 4)):
        at.number_input(key=key).set_value(value)
    at.button(key="d_launch").click().run()
    assert not at.error, [e.value for e in at.error]
    run_id = at.query_params["run"]
    seen_points = []

    def done(a: AppTest) -> bool:
        loss = charts(a).get("loss_chart")
        if loss and loss["data"]:
            seen_points.append(len(array(loss["data"][-1]["x"])))
        return metrics(a).get("State") in ("done", "failed", "cancelled", "stale")

    wait(at, done, timeout=240)
    assert metrics(at)["State"] == "done", [e.value for e in at.error]
    return at, run_id


def test_distill_live_view(finished_run):
    at, run_id = finished_run
    c = charts(at)
    loss = [t for t in c["loss_chart"]["data"] if t.get("name") == "loss"][0]
    assert len(array(loss["x"])) == 6
    ppl = c["ppl_chart"]
    assert list(array(ppl["data"][0]["x"])) == [0, 3, 6]  # before distillation, then every 3 steps
    assert any((t.get("name") or "").startswith("teacher") for t in ppl["data"])
    assert metrics(at)["Step"] == "6 / 6"


def test_distill_run_survives_a_refresh(finished_run, env):
    _, run_id = finished_run
    at = AppTest.from_file(APP, default_timeout=60)  # a new session, as after a browser reload
    at.query_params["run"] = run_id
    at.run()
    at.switch_page("screens/distill.py").run()
    assert metrics(at)["State"] == "done" and "loss_chart" in charts(at)


def test_reload_keeps_choices(scored, env):
    at = app("targets")
    at.button(key="preset_mlp-75").click().run()
    ffn = at.session_state["targets"]["ffn"]
    again = app("targets", fresh=False)  # a new session reads the saved choices
    assert again.session_state["targets"]["ffn"] == ffn and metrics(again) == metrics(at)


def test_distill_unknown_run_is_explained(env):
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "no-such-run"
    at.run()
    at.switch_page("screens/distill.py").run()
    assert not at.exception and "no run 'no-such-run'" in at.error[0].value


def test_distill_without_targets_asks_for_them(env):
    at = app("distill", d_show_form=True)  # the launch form (not the model's last run)
    assert any("No pruning targets" in w.value for w in at.warning)


def test_distill_from_the_sidebar_shows_this_models_last_run(finished_run, env):
    """Opened without a run in the URL, Distill shows the running (or last) run of the model, not a form that
    would queue a second run; 'New run' shows the form."""
    _, run_id = finished_run
    at = app("distill", targets={"ffn": 20, "depth_by": "bi"})
    assert at.query_params["run"] == run_id and metrics(at)["State"] == "done"
    assert metrics(at)["ETA (distillation)"] == "–"  # no ETA for a run that is not running
    assert "d_launch" not in [b.key for b in at.button]
    at.button(key="d_new").click().run()
    assert "run" not in at.query_params and [b for b in at.button if b.key == "d_launch"]


@pytest.mark.parametrize("state", ["cancelled", "queued"])
def test_distill_shows_no_eta_unless_running(finished_run, env, state):
    """A copy of the finished run, stopped (or waiting) in the distill stage: its step rate is known, but an ETA
    would be a lie."""
    import os
    import shutil

    from dashboard import runs_io
    from engine.fileio import read_json, write_json

    _, run_id = finished_run
    src = env["root"] / "runs" / run_id
    copy = env["root"] / "runs" / f"eta-{state}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(src, copy)
    status = read_json(copy / "status.json")
    status.update(state=state, stage="distill", pid=os.getpid(), heartbeat=time.time(), updated=time.time())
    write_json(copy / "status.json", status)
    rows = runs_io.read_run(copy)["metrics"]
    assert runs_io.eta_seconds(dict(status, stage="distill"), rows, 12) is not None  # a rate is known
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = copy.name
    at.run()
    at.switch_page("screens/distill.py").run()
    assert metrics(at)["State"] == state and metrics(at)["ETA (distillation)"] == "–"
    shutil.rmtree(copy)


def test_sidebar_data_comes_from_the_scores_and_run_ids_are_checked(finished_run, scored, env):
    _, run_id = finished_run
    folder = next((env["root"] / "cache" / "dashboard-scores").glob("*/scores.json")).parent
    meta = json.loads((folder / "scores.json").read_text())
    at = app("targets", scores_dir=str(folder), samples=meta["n_samples"] + 8)
    side = [c.value for c in at.sidebar.caption]
    data = next(c for c in side if c.startswith("Data:"))
    assert f"{meta['n_samples']} × {meta['seq_len']} tokens (scores)" in data
    assert f"next scoring: {meta['n_samples'] + 8} × " in data
    for rid, shown in (("no-such-run", False), ("../etc", False), (run_id, True)):
        at = AppTest.from_file(APP, default_timeout=60)
        at.query_params["run"] = rid
        at.run()
        assert any(rid in c.value for c in at.sidebar.caption) is shown, rid


def test_runs_page(finished_run, env):
    _, run_id = finished_run
    at = app("runs")
    table = at.dataframe[0].value
    assert run_id in list(table["run"]) and table.loc[table["run"] == run_id, "state"].item() == "done"
    code = "\n".join(c.value for c in at.code)
    assert "prunescope run" in code and "--hidden" in code and "--run-dir" in code
    assert str(Path(env["root"] / "runs" / run_id / "model")) in code
    labels = [b.proto.label for b in at.get("download_button")]
    assert "plan.json" in labels and "scores.csv" in labels


def test_runs_scores_csv_and_delete(finished_run, env):
    from dashboard import runs_io

    _, run_id = finished_run
    path = Path(env["root"] / "runs" / run_id)
    csv = runs_io.scores_csv(path / "scores")
    assert csv.startswith("tensor,layer,index,score") and "\nheads,3,5," in csv
    copy = path.parent / "copy-to-delete"
    import shutil

    shutil.copytree(path, copy)
    runs_io.delete_run(copy)
    assert not copy.exists() and path.exists()


def test_compare_page(finished_run, env):
    _, run_id = finished_run
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = run_id
    at.run()
    at.switch_page("screens/compare.py").run()
    assert not at.exception
    text = "\n".join(m.value for m in at.markdown)
    assert "Teacher" in text and "Student" in text and "Held-out perplexity" in text
    note = " ".join(w.value for w in at.warning)  # 6 steps of 2 x 32 tokens: a demo, and it says so
    assert "distilled for **6 steps** of 2 × 32 tokens = **384 tokens**" in note and "short demo" in note
    assert any("lower is better" in c.value for c in at.caption)
    at.button(key="cmp_go").click().run()
    wait(at, lambda a: "Decode tokens/s" in metrics(a))
    assert len([m for m in at.metric if m.label == "Decode tokens/s"]) == 2
    assert sum(" · weights in " in m.value for m in at.markdown) == 2  # the dtype each model ran in
    captions = [c.value for c in at.caption]  # the quality numbers and their meaning beside the answers
    assert any(c.startswith("Held-out perplexity **") and "lower is better" in c for c in captions)
    assert any(c.startswith("KL to the teacher **") and "nats per token" in c for c in captions)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_model_info_matches_a_real_load(family, tmp_path):
    """The Model page reads the architecture on the meta device (no weights in the UI process);
    it must agree with engine.models.describe on a real load."""
    from dashboard.common import model_info
    from engine.arch import get_adapter
    from engine.models import describe, load

    path = save_tiny(family, tmp_path / family)
    info = model_info(str(path), "test")
    loaded = load(str(path), device="cpu")
    real = describe(loaded)
    assert info["arch"] == get_adapter(loaded.model).spec().to_dict()
    for k in ("layers", "query_heads", "kv_heads", "head_dim", "hidden_size", "intermediate_size", "vocab_size",
              "tied_embeddings", "parameters"):
        assert info[k] == real[k], k


def test_distill_method_choice_reaches_the_run(scored, env):
    """The method choice shows each method's estimated peak memory (LoRA and cpt below kd) and a LoRA
    run launched from the page has method lora in its config and in its reproducing CLI command."""
    from dashboard import runs_io
    from engine.runs import cancel

    at = app("distill", d_show_form=True, targets={"ffn": 20, "depth_by": "bi"})
    at.radio(key="d_method").set_value("lora").run()
    at.number_input(key="d_lora_rank").set_value(4).run()
    cap = next(c.value for c in at.caption if c.value.startswith("Estimated peak memory"))
    gb = dict(re.findall(r"(Distillation \(KD\)|Continued pretraining \(CE\)|LoRA adapters)\**? ([\d.]+) GB", cap))
    assert set(gb) == {"Distillation (KD)", "Continued pretraining (CE)", "LoRA adapters"}
    assert float(gb["LoRA adapters"]) <= float(gb["Distillation (KD)"])
    assert "**LoRA adapters" in cap  # the chosen method is highlighted
    for key, value in (("d_steps", 2), ("d_batch", 2), ("d_seq", 32), ("d_eval_every", 2), ("d_eval_samples", 2)):
        at.number_input(key=key).set_value(value)
    at.button(key="d_launch").click().run()
    path = env["root"] / "runs" / at.query_params["run"]
    cancel(path, wait=30)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["distill"]["method"] == "lora" and cfg["distill"]["lora_rank"] == 4
    assert "--method lora" in runs_io.cli_command(cfg, path) and "--lora-rank 4" in runs_io.cli_command(cfg, path)


def test_importance_falloff_curves_come_from_a_job(scored, env):
    """'Compute the curves' starts a detached "falloff" job; the chart appears when it is done (the page
    process never loads the model)."""
    at = app("importance")
    at.number_input(key="imp_fo_n").set_value(2).run()
    at.button(key="imp_fo_go").click().run()
    assert list((env["root"] / "cache" / "dashboard-scores").glob("*/falloff/*/config.json"))  # a job's folder
    wait(at, lambda a: "falloff" in charts(a), timeout=180)
    fig = charts(at)["falloff"]
    assert len(fig["data"]) >= 2  # one line per criterion + the random baseline
