"""The "compare" kind of job: teacher and student side by side (speed, size, answers to a prompt).

Run folder: `<run>/compare/<key>` with config.json {"kind": "compare", "teacher", "student",
"prompt", "max_new_tokens"}; the result is result.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.errors import Cancelled
from engine.fileio import write_json
from engine.runs import Run, start_job


def start_compare_job(out: str | Path, teacher: str, student: str, prompt: str, max_new_tokens: int = 64) -> Path:
    """Create the comparison's run folder (replacing an earlier one) and start it detached."""
    cfg = {"kind": "compare", "teacher": teacher, "student": student, "prompt": prompt,
           "max_new_tokens": int(max_new_tokens), "device": "auto"}
    run = Run.create(out, cfg, force=True)
    start_job(run.path)
    return run.path


def answer(loaded, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to a prompt (through the chat template when the tokenizer has one)."""
    import torch

    tok = loaded.tokenizer
    templated = bool(getattr(tok, "chat_template", None))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True) if templated else prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not templated)
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        out = loaded.model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_compare_job(run: Run, should_stop: Callable[[], bool]) -> dict:
    """Work of a "compare" job: for teacher then student, load, measure tokens/s, answer the prompt."""
    from engine.models import count_parameters, load
    from engine.speed import measure_throughput

    cfg = run.config()
    result: dict = {"prompt": cfg["prompt"]}
    for i, (name, spec) in enumerate((("teacher", cfg["teacher"]), ("student", cfg["student"]))):
        if should_stop():
            raise Cancelled()
        run.set_stage("compare", i / 2, f"loading the {name}")
        loaded = load(spec)
        run.set_stage("compare", i / 2 + 0.1, f"measuring the {name}'s speed")
        tp = measure_throughput(loaded.model, batch_size=1, prompt_len=64, new_tokens=16, repeats=2)
        run.set_stage("compare", i / 2 + 0.3, f"the {name} answers the prompt")
        result[name] = {"answer": answer(loaded, cfg["prompt"], cfg["max_new_tokens"]),
                        "params": count_parameters(loaded.model), "throughput": tp.to_dict(),
                        "dtype": str(next(loaded.model.parameters()).dtype)}
        del loaded
    write_json(run.path / "result.json", result)
    run.finish_stage("compare")
    return result
