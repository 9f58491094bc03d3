"""The check every export ends with: reload the folder with plain transformers in a fresh process.

`verify_export(folder, student)` computes the in-memory student's logits and greedy continuation on
fixed token ids, then starts `python -m engine.roundtrip FOLDER ...`: a new interpreter that knows
nothing of prunescope's objects loads the folder with `AutoModelForCausalLM.from_pretrained`
(trust_remote_code off, hub offline), recomputes the logits, generates a few greedy tokens, counts
the parameters and loads the tokenizer. The result is written as `prunescope_roundtrip.json` in the
folder and as a section of its model card; a failed check raises CheckpointError with the reason.

Tolerance: the fresh process loads the weights in the dtype they were saved in and runs the same
kernels on the same device type, so fp32 logits agree to rounding (max |diff| <= 1e-4 x max |logit|);
bf16/fp16 weights allow 2e-2 x max |logit| (one bf16 ulp at the logit scale is 2^-8 = 4e-3, and the
reduction order may differ between two loads).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import CheckpointError
from engine.fileio import atomic_write_text, read_json, write_json
from engine.models import count_parameters

log = logging.getLogger(__name__)

RESULT_FILE = "prunescope_roundtrip.json"
CARD_HEADING = "## Round-trip check"
PROMPT = "The capital of France is"
REL_TOL = {"float32": 1e-4, "float64": 1e-6, "bfloat16": 2e-2, "float16": 2e-2}


def _tolerance(dtype: torch.dtype) -> float:
    return REL_TOL.get(str(dtype).replace("torch.", ""), 2e-2)


def _check_ids(vocab: int, n: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    """Fixed token ids spread over the vocabulary (no tokenizer needed on the caller's side)."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _greedy(model: torch.nn.Module, ids: torch.Tensor, n_new: int) -> list[int]:
    """`n_new` greedy tokens after `ids` (1, T), by argmax over the full context (no cache, no config)."""
    out = ids
    for _ in range(n_new):
        nxt = model(out).logits[:, -1].float().argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1]:].tolist()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def verify_export(folder: str | Path, student: torch.nn.Module, expected_params: int | None = None,
                  n_tokens: int = 4, timeout: float = 1800.0, raise_on_failure: bool = True) -> dict:
    """Check the exported `folder` against the in-memory `student` from a fresh process.

    Writes `prunescope_roundtrip.json` and the model card section; returns the result dict.
    Raises CheckpointError (after writing the record) when the check fails and `raise_on_failure`."""

    folder = Path(folder).resolve()
    was_training = student.training
    student.eval()
    dev = _device_of(student)
    dtype = next(student.parameters()).dtype
    ids = _check_ids(student.get_input_embeddings().weight.shape[0]).to(dev)
    with torch.inference_mode():
        ref_logits = student(ids).logits.float().cpu()
    ref_tokens = _greedy(student, ids[:1], n_tokens)
    student.train(was_training)
    if expected_params is None:
        expected_params = count_parameters(student)
    with tempfile.TemporaryDirectory(prefix="prunescope-roundtrip-") as tmp:
        ref = Path(tmp) / "reference.safetensors"
        save_file({"ids": ids.cpu().contiguous(), "logits": ref_logits.contiguous(),
                   "tokens": torch.tensor(ref_tokens, dtype=torch.long)}, str(ref))
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "engine.roundtrip", str(folder), "--reference", str(ref), "--out", str(out),
               "--device", str(dev), "--dtype", str(dtype).replace("torch.", ""), "--tolerance", repr(_tolerance(dtype)),
               "--expected-params", str(expected_params)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            result = read_json(out)
            if result is None:
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
                result = {"passed": False, "reason": f"the fresh process failed (exit {proc.returncode}): "
                                                     f"{tail[0][:300]}"}
        except subprocess.TimeoutExpired:
            result = {"passed": False, "reason": f"the fresh process did not finish within {timeout:.0f} s"}
    result.update(dtype=str(dtype).replace("torch.", ""), reference_tokens=ref_tokens,
                  checked=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    record(folder, result)
    log.info("round-trip check of %s: %s", folder, "passed" if result["passed"] else result.get("reason"))
    if not result["passed"] and raise_on_failure:
        raise CheckpointError(f"the exported model in {folder} failed its round-trip check: {result['reason']}")
    return result


def record(folder: Path, result: dict) -> None:
    """Write the result file and replace the model card's round-trip section."""
    write_json(folder / RESULT_FILE, result)
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        atomic_write_text(card, replace_section(text, CARD_HEADING, card_section(result)))


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the `heading` section (up to the next '## ') replaced by `section`, or appended."""
    lines = text.rstrip("\n").split("\n")
    if heading in lines:
        i = lines.index(heading)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + lines[j:]
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines) + "\n\n" + section.rstrip("\n") + "\n"


def card_section(r: dict) -> str:
    """The model card's round-trip section."""
    lines = [CARD_HEADING, "", f"- result: **{'passed' if r.get('passed') else 'FAILED'}**"
             + ("" if r.get("passed") else f" ({r.get('reason', '')})"),
             "- how: reloaded with plain `AutoModelForCausalLM.from_pretrained` (trust_remote_code off, hub "
             "offline) in a fresh Python process"]
    if "max_abs_diff" in r:
        lines.append(f"- logits on {r['positions']} fixed tokens ({r.get('dtype')}, {r.get('device')}): max |diff| "
                     f"{r['max_abs_diff']:.3g} vs the exported model in memory (tolerance {r['tolerance_abs']:.3g} "
                     f"= {r['tolerance']:g} x max |logit|)")
    if "tokens" in r:
        same = "identical to" if r.get("tokens_match") else "differ from"
        lines.append(f"- greedy tokens: {len(r['tokens'])} generated, {same} the in-memory model's")
    if r.get("prompt_completion") is not None:
        lines.append(f"- `{PROMPT}` -> `{r['prompt_completion']!s}`")
    if "params" in r:
        lines.append(f"- parameters: {r['params']:,} (expected {r['expected_params']:,})")
    return "\n".join(lines) + "\n"


def read_result(folder: str | Path) -> dict | None:
    """The recorded round-trip result of an export folder (None when it has none)."""
    return read_json(Path(folder) / RESULT_FILE)


# ---------------------------------------------------------------- the fresh process


def check_folder(folder: Path, ref: dict, device: str, tol: float, expected_params: int,
                 dtype: str = "float32") -> dict:
    """Runs in the fresh process: reload (in the in-memory model's dtype), compare logits, generate,
    count parameters."""

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False,
                                                 dtype=getattr(torch, dtype)).to(device).eval()
    ids = ref["ids"].to(device)
    with torch.inference_mode():
        logits = model(ids).logits.float().cpu()
    if logits.shape != ref["logits"].shape:
        return {"passed": False, "reason": f"logits shape {tuple(logits.shape)} != {tuple(ref['logits'].shape)}"}
    diff = (logits - ref["logits"]).abs().max().item()
    scale = ref["logits"].abs().max().item()
    tokens = _greedy(model, ids[:1], len(ref["tokens"]))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    r = {"passed": True, "reason": "", "folder": str(folder), "device": device, "positions": ids.numel(),
         "max_abs_diff": diff, "logit_scale": scale, "tolerance": tol, "tolerance_abs": tol * max(scale, 1.0),
         "tokens": tokens, "tokens_match": tokens == ref["tokens"].tolist(), "params": params,
         "expected_params": expected_params, "prompt_completion": None}
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        p = tok(PROMPT, return_tensors="pt")["input_ids"].to(device)
        r["prompt_completion"] = tok.decode(_greedy(model, p, len(tokens)), skip_special_tokens=True)
    except (OSError, ValueError) as e:
        r["tokenizer_error"] = str(e).splitlines()[0][:200]
    if not diff <= r["tolerance_abs"]:
        r.update(passed=False, reason=f"logits differ by {diff:.3g} (tolerance {r['tolerance_abs']:.3g})")
    elif params != expected_params:
        r.update(passed=False, reason=f"{params:,} parameters reloaded, {expected_params:,} expected")
    elif len(tokens) != len(ref["tokens"]):
        r.update(passed=False, reason="greedy generation produced too few tokens")
    return r


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.roundtrip FOLDER --reference REF --out OUT ...` (used by verify_export)."""
    p = argparse.ArgumentParser(prog="python -m engine.roundtrip")
    p.add_argument("folder")
    p.add_argument("--reference", required=True, help="safetensors with ids, logits, tokens")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(REL_TOL))
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--expected-params", type=int, required=True)
    a = p.parse_args(argv)
    try:
        r = check_folder(Path(a.folder), load_file(a.reference), a.device, a.tolerance, a.expected_params,
                         a.dtype)
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the check's answer
        r = {"passed": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    write_json(Path(a.out), r)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
