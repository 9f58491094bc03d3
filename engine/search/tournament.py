"""Tournament: K pruned students distilled side by side on the same batches, one teacher forward each.

Every optimizer step takes the same global batch (engine.distill.DataOrder) for every student still
in play; the teacher's logits for a micro-batch are computed once and used by all of them. Each
student has its own AdamW (engine.distill.param_groups) and the same learning-rate schedule
(engine.distill.lr_lambda, set from the step, so a resumed run has no scheduler state to restore).
Students are held in eval mode while they train (no dropout: a resumed run repeats the
uninterrupted one exactly).

Successive halving (optional): the budget of K x S student-steps (S = the token budget's steps) is
split into R = ceil(log2 K) rounds; in round r the n_r students left share K x S / R steps evenly,
and at its end the worse half (by held-out KL) stops. Without halving every student trains S steps.

Checkpoints are safetensors (weights + AdamW moments, one file per student) in a folder per step,
then `state.json` names that folder (written last): a run killed at any moment resumes from the
last complete checkpoint and repeats the uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from engine.devices import resolve_dtype
from engine.distill import DataOrder, DistillConfig, distill_loss, lr_lambda, param_groups
from engine.errors import CheckpointError
from engine.evaluate import autocast_ctx, model_device
from engine.fileio import atomic_write, read_json, write_json
from engine.search.preview import TeacherSide, student_quality

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def kendall_tau(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Kendall's τ between two rankings (best first) over the names they share; None under 2."""
    common = [x for x in a if x in set(b)]
    if len(common) < 2:
        return None
    pos = {x: i for i, x in enumerate(b)}
    conc = disc = 0
    for i in range(len(common)):
        for j in range(i + 1, len(common)):
            if pos[common[i]] < pos[common[j]]:
                conc += 1
            else:
                disc += 1
    return (conc - disc) / (conc + disc)


def schedule(k: int, steps: int, halving: bool) -> list[tuple[int, int]]:
    """[(end step of round r, students left in round r)], the last round ending at the final step."""
    if not halving or k < 2:
        return [(steps, k)]
    rounds = math.ceil(math.log2(k))
    out, end, n = [], 0, k
    for _ in range(rounds):
        end += max(1, (k * steps) // (rounds * n))
        out.append((end, n))
        n = math.ceil(n / 2)
    return out


# ---------------------------------------------------------------- checkpoints


def _save_student(path: Path, student: nn.Module, opt: torch.optim.Optimizer) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()
               if not _is_tied_copy(student, k)}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    atomic_write(path, lambda f: f.write(save(tensors)), binary=True, fsync=True)


def _is_tied_copy(student: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(student.config, "tie_word_embeddings", False))


def _load_student(path: Path, student: nn.Module, opt: torch.optim.Optimizer) -> None:

    try:
        t = load_file(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tournament checkpoint {path} is unreadable ({e}); delete its folder to "
                              "restart from the previous one") from e
    dev = next(student.parameters()).device
    student.load_state_dict({k[6:]: v.to(dev) for k, v in t.items() if k.startswith("model.")}, strict=False)
    state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name == "step" else v.to(dev)
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


# ---------------------------------------------------------------- the loop


class Tournament:
    """K students trained on one stream of batches, sharing each teacher forward."""

    def __init__(self, teacher: nn.Module, students: dict[str, nn.Module], train_blocks: torch.Tensor,
                 side: TeacherSide, cfg: DistillConfig, folder: Path | None, halving: bool = False,
                 log_row: Callable[[dict], None] = lambda r: None, eval_batch_size: int = 4):

        self.teacher, self.students, self.cfg, self.side = teacher.eval(), students, cfg, side
        self.names = list(students)
        self.folder = Path(folder) if folder is not None else None  # None: no checkpoints
        self.log_row, self.eval_bs = log_row, eval_batch_size
        self.device = model_device(teacher)
        amp = resolve_dtype(cfg.dtype, self.device)
        self.amp = amp if amp == torch.bfloat16 else torch.float32
        if train_blocks.shape[1] < cfg.seq_len:
            raise ValueError(f"training blocks have {train_blocks.shape[1]} tokens, seq_len is {cfg.seq_len}")
        self.blocks = train_blocks[:, : cfg.seq_len]
        self.rounds = schedule(len(students), cfg.total_steps(), halving)
        self.total = self.rounds[-1][0]
        self.order = DataOrder(self.blocks.shape[0], cfg.global_batch(), cfg.seed)
        self.opts = {}
        for name, s in students.items():
            s.float().to(self.device).eval().requires_grad_(True)
            self.opts[name] = torch.optim.AdamW(param_groups(s, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        self.step, self.elapsed = 0, 0.0
        self.active = list(self.names)
        self.last_ranking: list[str] | None = None
        self.final: dict[str, dict] = {}  # name -> last eval row of a student that stopped (or finished)

    # -- state --------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "elapsed_s": self.elapsed, "active": self.active,
                "last_ranking": self.last_ranking, "final": self.final, "total": self.total,
                "rounds": self.rounds, "names": self.names}

    def save(self) -> None:
        if self.folder is None:
            return
        d = self.folder / f"step-{self.step:06d}"
        if d.exists():
            shutil.rmtree(d)
        for name in self.active:
            _save_student(d / f"{name}.safetensors", self.students[name], self.opts[name])
        write_json(self.folder / STATE_FILE, {**self.state(), "dir": d.name}, fsync=True)
        for old in self.folder.glob("step-*"):
            if old != d and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> bool:
        """Load the last complete checkpoint; False when there is none."""
        if self.folder is None:
            return False
        st = read_json(self.folder / STATE_FILE)
        if not st or st.get("names") != self.names or st.get("total") != self.total:
            return False
        d = self.folder / st["dir"]
        for name in st["active"]:
            _load_student(d / f"{name}.safetensors", self.students[name], self.opts[name])
        self.step, self.elapsed = int(st["step"]), float(st["elapsed_s"])
        self.active, self.last_ranking, self.final = list(st["active"]), st["last_ranking"], dict(st["final"])
        log.info("tournament resumed at step %d/%d with %s", self.step, self.total, ", ".join(self.active))
        return True

    # -- pieces ---------------------------------------------------------------
    def train_step(self) -> None:
        cfg, B, A = self.cfg, self.cfg.batch_size, self.cfg.grad_accum

        t0 = time.perf_counter()
        idx = self.order.batch(self.step)  # (G,) the same blocks for every student
        sums: dict[str, dict[str, float]] = {n: {} for n in self.active}
        for a in range(A):
            ids = self.blocks[idx[a * B:(a + 1) * B]].to(self.device)  # (B, T)
            with torch.no_grad(), autocast_ctx(self.device, self.amp):
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, V), once for all
            for name in self.active:
                with autocast_ctx(self.device, self.amp):
                    s_logits = self.students[name](input_ids=ids, use_cache=False).logits
                terms = distill_loss(t_logits, s_logits, ids, cfg, [], [])
                (terms["loss"] / A).backward()
                for k, v in terms.items():
                    sums[name][k] = sums[name].get(k, 0.0) + v.item() / A
                del s_logits, terms
            del t_logits
        lr = cfg.lr * lr_lambda(self.step, cfg.warmup_steps, self.total, cfg.min_lr_ratio)
        rows = []
        for name in self.active:
            opt = self.opts[name]
            for g in opt.param_groups:
                g["lr"] = lr
            params = [p for g in opt.param_groups for p in g["params"]]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            rows.append({"step": self.step + 1, "candidate": name, **sums[name], "grad_norm": gnorm, "lr": lr})
        self.step += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        tokens = self.step * cfg.global_batch() * cfg.seq_len
        for r in rows:
            self.log_row({**r, "tokens": tokens, "blocks": idx.tolist(), "elapsed_s": round(self.elapsed, 3),
                          "student_tokens_per_s": round(len(rows) * cfg.global_batch() * cfg.seq_len / dt, 1)})

    def evaluate(self) -> list[str]:
        """Held-out KL / ppl of every active student; logs the ranking and its Kendall τ to the last."""
        results = {}
        for name in self.active:
            q = student_quality(self.students[name], self.side, self.eval_bs)
            results[name] = q
            self.log_row({"eval": True, "step": self.step, "candidate": name, **q,
                          "tokens": self.step * self.cfg.global_batch() * self.cfg.seq_len})
            self.final[name] = {"step": self.step, **q}
        ranking = sorted(results, key=lambda n: (results[n]["kl"], n))
        tau = kendall_tau(self.last_ranking, ranking) if self.last_ranking else None
        self.log_row({"eval": True, "step": self.step, "ranking": ranking, "kendall_tau": tau})
        self.last_ranking = ranking
        return ranking

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            progress: Callable[[float, str], None] | None = None) -> dict:
        """Train to the end (or until should_stop(): checkpoint, then return with "stopped")."""
        resumed = self.restore()
        if not resumed:
            self.evaluate()  # step 0: the one-shot students (rebuilt from the plans on resume: no checkpoint)
        eval_every = max(1, self.cfg.eval_every)
        while self.step < self.total:
            self.train_step()
            end, n = next((e, n) for e, n in self.rounds if self.step <= e)
            boundary = self.step == end
            if boundary or self.step % eval_every == 0:
                ranking = self.evaluate()
                if boundary and self.step < self.total:
                    keep = math.ceil(n / 2)
                    self.active = [x for x in ranking[:keep]]
                    self.log_row({"eval": True, "step": self.step, "stopped": ranking[keep:]})
            if progress:
                progress(self.step / self.total, f"step {self.step}/{self.total}: {len(self.active)} students")
            stop = should_stop()
            if stop or boundary or self.step % self.cfg.checkpoint_every == 0 or self.step == self.total:
                self.save()
            if stop and self.step < self.total:
                return {**self.state(), "stopped": True}
        ranking = sorted(self.final, key=lambda n: (-self.final[n]["step"], self.final[n]["kl"], n))
        return {**self.state(), "stopped": False, "winner": ranking[0], "final_ranking": ranking}
