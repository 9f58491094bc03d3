"""The quality benchmark's report writer: table, HTML and the Chromium-rendered PNG."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
bench_common = sys.modules["bench_common"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_common)

META = {"teacher_params": 134_515_008, "teacher_ppl": 39.8, "eval_tokens": 8192, "distill_tokens": 98304,
        "command": "bench/quality.py --tokens 98304", "wall_s": 10.0, "machine": ["start: quiet"]}


def _row(name: str, one: float, after: float | None) -> dict:
    return {"name": name, "group": "strategy", "label": name, "shape": "L 21, D 576 -> 102.65M (76.3%)",
            "params": 102_654_144, "fraction": 0.763, "ppl_oneshot": one, "kl_oneshot": 1.6,
            "ppl_distilled": after, "kl_distilled": None if after is None else 0.8, "loss": "kl+ce", "wall_s": 815.5}


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.browser
def test_report_writes_table_html_and_png(tmp_path):
    """In a process of its own, as the bench runs it (pytest-playwright's session browser keeps an
    event loop in this one, where Playwright's sync API refuses to start)."""
    rows = [_row("depth_bi", 193.7, 51.07), _row("merge_on", 1.8e7, None), _row("width_mlp", 133.2, 51.78)]
    (tmp_path / "in.json").write_text(json.dumps({"meta": META, "rows": rows}))
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from common import write_report; d = json.loads(Path(sys.argv[2], 'in.json').read_text()); "
            "print(write_report(Path(sys.argv[2]), 'quality', d['meta'], d['rows']))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-2000:]
    table = r.stdout.strip()
    md = (tmp_path / "quality.md").read_text()
    assert table in md and "| depth_bi" in table and "102.7" in table and "39.800" in md
    assert "plotly" in (tmp_path / "quality.html").read_text()
    width, height = _png_size(tmp_path / "quality.png")
    assert width == 1000 and height == 160 + 34 * len(rows)


def test_figure_has_both_bars_a_log_axis_and_the_teacher(tmp_path):
    rows = [_row("a", 200.0, 50.0), _row("b", 3000.0, None)]
    fig = bench_common.quality_figure(META, rows, "quality")
    one, after = (next(d for d in fig.data if d.name == n) for n in ("one-shot", "distilled"))
    assert list(one.x) == [3000.0, 200.0] and list(after.x) == [None, 50.0]  # top-to-bottom in run order
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.range[0] < 1.6 < 3.48 < fig.layout.xaxis.range[1]
    assert any("teacher 39.8" in a.text for a in fig.layout.annotations)
    assert bench_common._short(1.8e7) == "1.8e+07" and bench_common._short(3299.16) == "3,299"


def test_run_lines_keep_every_invocation_of_a_resumed_run():
    runs = [{"command": "bench/quality.py --tokens 98304", "wall_s": 8543.1, "machine": ["start: busy"],
             "rows": None},
            {"command": "bench/quality.py --resume --tokens 98304", "wall_s": 600.0,
             "machine": ["start: quiet", "end: quiet"], "rows": ["a", "b"]},
            {"command": "bench/quality.py --resume --only c", "wall_s": 300.0, "machine": [], "rows": ["c"]}]
    lines = bench_common._run_lines({**META, "runs": runs})
    assert lines == ["`bench/quality.py --tokens 98304`: 8543 s, earlier rows; start: busy",
                     "`bench/quality.py --resume --tokens 98304`: 600 s, 2 rows; start: quiet; end: quiet",
                     "`bench/quality.py --resume --only c`: 300 s, 1 row"]
    assert bench_common._run_lines(META) == ["`bench/quality.py --tokens 98304`: 10 s, earlier rows; start: quiet"]


def _quality_module():
    """bench/quality.py as a module (bench/ first on sys.path, as when it runs: it imports `common`)."""
    import importlib

    bench = str(ROOT / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("quality")


def test_results_file_refuses_another_budget_or_dtype_and_rows_are_replaced_by_name(tmp_path):
    quality = _quality_module()
    meta = dict(META, settings={"dtype": "fp32"})
    (tmp_path / "quality.json").write_text(json.dumps({"meta": meta, "rows": [_row("depth_block", 190.0, 47.5)]}))
    old, pinned = quality.open_results(tmp_path, "quality", None, "fp32")
    assert pinned == 98304 and [r["name"] for r in old["rows"]] == ["depth_block"]
    assert quality.open_results(tmp_path, "quality", 98304, "fp32")[1] == 98304
    with pytest.raises(SystemExit, match="98304 tokens each, not --tokens 2048"):
        quality.open_results(tmp_path, "quality", 2048, "fp32")
    with pytest.raises(SystemExit, match="computed in fp32, not --dtype bf16"):
        quality.open_results(tmp_path, "quality", None, "bf16")
    fresh, none = quality.open_results(tmp_path / "empty", "quality", 2048, "bf16")
    assert fresh == {"meta": {}, "rows": []} and none is None

    for ppl in (60.0, 55.0):  # the same name twice: one row, the last one
        old, _ = quality.open_results(tmp_path, "quality", None, "fp32")
        quality.add_row(tmp_path, "quality", old, _row("search_winner", 150.0, ppl), "bench/search.py", {}, None)
    data = json.loads((tmp_path / "quality.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["depth_block", "search_winner"]
    assert data["rows"][1]["ppl_distilled"] == 55.0
    assert [r["command"] for r in data["meta"]["runs"]] == ["bench/search.py", "bench/search.py"]
    assert "search_winner" in (tmp_path / "quality.md").read_text()


def test_winner_only_run_refuses_a_smoke_run_or_another_dtype(tmp_path):
    """`bench/search.py --winner-of` reads the winner of a saved full search; anything else is refused
    before the model loads, with what was wrong."""
    _quality_module()  # bench/ on sys.path
    import importlib

    search = importlib.import_module("search")
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({"quick": True, "dtype": "fp32"}))
    with pytest.raises(SystemExit, match="not a saved full search"):
        search.main(["--winner-of", str(quick)])
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"quick": False, "dtype": "bf16", "tournament": {"winner": "h576-f1024-q9-l28"}}))
    with pytest.raises(SystemExit, match="measured in bf16; pass --dtype bf16"):
        search.main(["--winner-of", str(full)])
