"""Compare page section: the exported model in other tools (lm-evaluation-harness scores, GGUF files).

Torch-free: it reads the JSON records an export folder holds (prunescope_lm_eval.json written by
`prunescope eval --tasks`, prunescope_gguf.json written by `prunescope export --gguf`). Writing a
GGUF file runs that command in a separate process, so the dashboard process never holds weights.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import streamlit as st

from engine.fileio import read_json
from engine.lm_eval_tasks import LOCAL_TASKS, RESULT_FILE, comparison_rows

GGUF_FILE = "prunescope_gguf.json"  # engine.gguf_export.RESULT_FILE (that module imports torch)
GGUF_TYPES = ("f16", "q8_0", "f32")


def lm_eval_frame(folder: str | Path) -> list[dict] | None:
    """The recorded lm-eval comparison as table rows (None when the folder has none)."""
    data = read_json(Path(folder) / RESULT_FILE)
    if not data or "results" not in data:
        return None
    fmt = (lambda v: None if v is None else round(float(v), 4))  # noqa: E731
    return [{"task": r["task"], "metric": r["metric"], "teacher": fmt(r["teacher"]), "student": fmt(r["model"]),
             "student / teacher": fmt(r["ratio"])} for r in comparison_rows(data)]


def gguf_rows(folder: str | Path) -> list[dict]:
    """The GGUF files recorded for the folder, as table rows."""
    files = ((read_json(Path(folder) / GGUF_FILE) or {}).get("files") or {}).values()
    rows = []
    for f in files:
        c = f.get("check") or {}
        rows.append({"file": f.get("path", ""), "type": f.get("type"), "MB": round(f.get("bytes", 0) / 1e6, 1),
                     "max |logit diff|": c.get("max_abs_diff"), "relative": c.get("rel_diff"),
                     "reload check": "passed" if c.get("passed") else (c.get("reason") or "not run")})
    return rows


def gguf_command(folder: str | Path, gguf_type: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "export", str(folder), "--gguf", "--gguf-type", gguf_type]


def exports_section(student_dir: str | Path, teacher_spec: str, data_hint: str = "DATA") -> None:
    """lm-eval scores side by side and the GGUF files of the student, with a button to write one."""
    st.subheader("In other tools")
    rows = lm_eval_frame(student_dir)
    if rows:
        st.markdown("**lm-evaluation-harness** (Hugging Face backend; lower perplexity and higher accuracy are better)")
        st.dataframe(rows, hide_index=True, use_container_width=True)
    else:
        cmd = (f"prunescope eval {shlex.quote(str(student_dir))} --teacher {shlex.quote(teacher_spec)} "
               f"--data {data_hint} --tasks {','.join(LOCAL_TASKS)} --limit 20")
        st.caption("No lm-evaluation-harness scores yet. They are written into the model folder by:")
        st.code(cmd, language="bash")
    st.markdown("**GGUF** (llama.cpp, Ollama, LM Studio), reloaded with transformers and compared with the "
                "safetensors weights")
    g = gguf_rows(student_dir)
    if g:
        st.dataframe(g, hide_index=True, use_container_width=True)
    c1, c2 = st.columns([1, 3])
    gguf_type = c1.selectbox("GGUF type", GGUF_TYPES, key="cmp_gguf_type",
                             help="f16: 2-D weights in half precision; q8_0: 8-bit blocks of 32 (rows that are not "
                                  "a multiple of 32 stay f16); f32: exact")
    if c2.button("Write GGUF", icon=":material/save:", key="cmp_gguf_write"):
        with st.spinner(f"Writing and checking the {gguf_type} GGUF file…"):
            p = subprocess.run(gguf_command(student_dir, gguf_type), capture_output=True, text=True,
                               cwd=str(Path(__file__).resolve().parents[1]))
        if p.returncode == 0:
            st.success(p.stdout.strip().splitlines()[0] if p.stdout.strip() else "written")
            st.rerun()
        else:
            err = (p.stderr.strip().splitlines() or ["failed"])[-1]
            st.error(err.replace("prunescope export: error: ", ""))
