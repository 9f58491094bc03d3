"""The dashboard's view of data mixes: the per-source perplexity chart, the mix and per-source tables,
the CLI command of a mixed run, and the Distill and Compare pages on a finished tiny prune + distill run of a mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny

from dashboard import train_charts
from dashboard.runs_io import cli_command
from engine.mix import DataMix

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def _rows() -> list[dict]:
    """eval_sources.jsonl rows of two evaluations of two sources."""
    rows = []
    for step, (a, b) in ((0, (40.0, 30.0)), (5, (20.0, 25.0))):
        rows.append({"step": step, "tokens": step * 64, "source": "wiki", "ppl": a, "kl": a / 100, "teacher_ppl": 15.0})
        rows.append({"step": step, "tokens": step * 64, "source": "breadth", "ppl": b, "kl": b / 100,
                     "teacher_ppl": 12.0})
    return rows


def test_source_chart_draws_a_line_per_source_against_its_teacher():
    fig = train_charts.source_ppl_chart(_rows(), x="tokens").to_plotly_json()
    by_name = {t["name"]: t for t in fig["data"]}
    assert set(by_name) == {"wiki: student", "wiki: teacher (15.00)", "breadth: student", "breadth: teacher (12.00)"}
    assert list(by_name["wiki: student"]["y"]) == [40.0, 20.0] and list(by_name["breadth: student"]["x"]) == [0, 320]
    assert list(by_name["breadth: teacher (12.00)"]["y"]) == [12.0, 12.0]
    assert by_name["wiki: student"]["line"]["color"] == by_name["wiki: teacher (15.00)"]["line"]["color"]
    assert by_name["breadth: teacher (12.00)"]["line"]["dash"] == "dash"
    empty = train_charts.source_ppl_chart([]).to_plotly_json()
    assert not empty["data"] and "no evaluation" in empty["layout"]["annotations"][0]["text"]


def test_mix_and_source_tables():
    mix = train_charts.mix_table([{"name": "wiki", "data": "w.raw", "weight": 0.7, "blocks": 7, "tokens": 224},
                                  {"name": "teacher", "data": "teacher", "weight": 0.3, "blocks": 3, "tokens": 96}])
    assert [(r["weight"], r["share of tokens"]) for r in mix] == [("70%", "70.0%"), ("30%", "30.0%")]
    rows = train_charts.source_table({"wiki": {"ppl_teacher": 10.0, "ppl_one_shot": 30.0, "ppl_distilled": 13.0,
                                               "kl_one_shot": 1.0, "kl_distilled": 0.2},
                                      "breadth": {"ppl_teacher": 8.0, "ppl_one_shot": 40.0}})
    assert rows[0]["distilled / teacher"] == pytest.approx(1.3) and rows[1]["distilled / teacher"] is None


def test_cli_command_of_a_mixed_run_parses_back_to_the_same_mix(tmp_path):
    from engine.cli import build_parser
    from engine.pipeline import PipelineConfig

    cfg = PipelineConfig(student="s", data=DataMix.of(["wiki.raw", "teacher:0:0.8"], "0.7,0.3").to_config())
    cmd = cli_command(cfg.to_dict(), tmp_path / "r")
    argv = [a for a in cmd.replace("\\\n", " ").split() if a][1:]
    args = build_parser().parse_args(argv)
    assert PipelineConfig(student="s", data=args.data).data == cfg.data
    # a pipeline run calibrated on its first source alone (the Distill page with a teacher share)
    run = PipelineConfig(data=cfg.data, calib_data="wiki.raw", targets={"ffn": 8})
    argv = [a for a in cli_command(run.to_dict(), tmp_path / "r").replace("\\\n", " ").split() if a][1:]
    args = build_parser().parse_args(argv)
    assert args.calib_data == "wiki.raw" and PipelineConfig(data=args.data).data == cfg.data


@pytest.mark.slow
def test_distill_page_shows_the_mix_and_each_source(tmp_path, monkeypatch, corpus):
    """A real tiny prune + distill run on 60% file + 40% teacher text, then the Distill page on it."""
    from streamlit.testing.v1 import AppTest

    from engine.distill import DistillConfig
    from engine.jobs import execute
    from engine.pipeline import PipelineConfig, create_run

    model = save_tiny("llama", tmp_path / "tiny-llama")
    for k, v in (("MODEL", model), ("DATA", corpus), ("RUNS", tmp_path / "runs"), ("CACHE", tmp_path / "cache"),
                 ("LOCKS", tmp_path / "locks"), ("DEVICE", "cpu")):
        monkeypatch.setenv(f"PRUNESCOPE_{k}", str(v))
    cfg = PipelineConfig(model=str(model), data=DataMix.of([str(corpus), "teacher"], "0.6,0.4").to_config(),
                         calib_samples=5, calib_seq_len=32, targets={"ffn": 24}, eval_samples=2,
                         distill=DistillConfig(steps=4, batch_size=5, seq_len=32, warmup_steps=1, eval_every=2,
                                               checkpoint_every=2, eval_samples=2))
    run = create_run(tmp_path / "runs" / "mixed", cfg)
    assert execute(run.path) == "done"
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params["run"] = "mixed"
    at.run()
    at.switch_page("screens/distill.py").run()
    assert not at.exception, at.exception
    spec = {el.proto.id.rsplit("-", 1)[-1]: json.loads(el.proto.spec) for el in at.get("plotly_chart")}
    names = {t["name"] for t in spec["source_ppl_chart"]["data"]}
    assert {"corpus.txt: student", "breadth: student"} <= names and any("teacher (" in n for n in names)
    mix = next(t.value for t in at.dataframe if "share of tokens" in t.value.columns)
    assert list(mix["weight"]) == ["60%", "40%"] and list(mix["tokens"]) == [12 * 32, 8 * 32]
    per = next(t.value for t in at.dataframe if "distilled / teacher" in t.value.columns)
    assert list(per["source"]) == ["corpus.txt", "breadth"] and per["distilled ppl"].notna().all()
    at.switch_page("screens/compare.py").run()  # Compare carries the same per-source table
    assert not at.exception, at.exception
    per_cmp = next(t.value for t in at.dataframe if "distilled / teacher" in t.value.columns)
    assert list(per_cmp["source"]) == ["corpus.txt", "breadth"]
    assert list(per_cmp["distilled ppl"]) == list(per["distilled ppl"])


def test_a_mixed_runs_config_is_not_reported_as_damaged():
    """config.json stores a mix as a list of {data, weight}: valid, so Runs and Compare list the run; a
    list of something else is still reported."""
    from dashboard.runs_io import clean_config

    mix = DataMix.of(["wiki.raw", "teacher"], "0.7,0.3").to_config()
    cfg, problems = clean_config({"kind": "pipeline", "data": mix})
    assert problems == [] and cfg["data"] == mix
    _, problems = clean_config({"kind": "pipeline", "data": [{"data": 3}]})
    assert len(problems) == 1 and "list of {data, weight} sources" in problems[0]
