"""Knowledge distillation of a pruned student from its teacher (Minitron recipe), read top to bottom.

    recipe = DistillRecipe(teacher, student, train_blocks, eval_blocks, config, run_dir)
    recipe.setup()             launch strategy, newest valid checkpoint, models, optimizer, schedule
    recipe.evaluate(0)         held-out perplexity and KL before training
    recipe.train_step(step)    one optimizer step over the global batch of that step
    recipe.save_checkpoint()   full weights + AdamW moments + schedule + RNG (safetensors + JSON)
    recipe.finish()            the trained weights in the caller's student, the summary

`distill(...)` runs exactly that loop. The loss, schedule, data order and trainable module are in
engine/training.py; what differs between one process, DDP and FSDP is engine/parallel.py.

Training: AdamW (no decay on 1-D params), linear warmup + cosine decay to min_lr_ratio * lr,
gradient accumulation, clipping, bf16 autocast where supported with fp32 master weights; the
teacher runs once per micro-batch without gradients.

Several processes (`torchrun` / `accelerate launch`): each rank takes its slice of every micro-batch
of the same global batch; the mean loss terms, grad norm and any rank's stop request are reduced
once per step. Under FSDP a copy of the student is sharded; the caller's `student` waits on the CPU
and gets the trained full weights back at the end (on every rank). Evaluation runs on all ranks
together when sharded (same blocks on each, rank 0 logs).

Checkpoints (rank 0 writes them) have one format whatever the launch: the full (unsharded) weights
and AdamW moments, schedule, step, every rank's RNG state. Any run resumes from the newest
checkpoint that verifies (all ranks load the file rank 0 picked: the run folder must be on a
filesystem they all see) and repeats the uninterrupted run when the global batch is unchanged.

metrics.jsonl rows: training {step, tokens, loss, kl_loss[, ce_loss][, hidden_loss], grad_norm, lr,
tokens_per_s, elapsed_s}; evaluation {eval: true, step, tokens, ppl, kl, elapsed_s[, teacher_ppl]}
(step 0 = before training; teacher_ppl on the first evaluation only).
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from engine.arch import get_adapter
from engine.checkpoint import (
    checkpoint_files,
    load_checkpoint,
    load_latest_valid,
    remove_checkpoint,
    save_checkpoint,
)
from engine.devices import resolve_dtype
from engine.errors import UserError
from engine.evaluate import autocast_ctx, evaluate_student
from engine.fileio import append_jsonl
from engine.parallel import strategy_for_launch
from engine.peak_memory import PeakMemory
from engine.progress import Progress
from engine.runs import Run, truncate_metrics
from engine.training import (  # noqa: F401  (DataOrder, lr_lambda, param_groups re-exported)
    DataOrder,
    Distillable,
    DistillConfig,
    LayerTap,
    add_lora,
    distill_loss,
    lr_lambda,
    param_groups,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)


class DistillRecipe:
    """One distillation run in a run folder; see the module docstring for the order of the calls."""

    def __init__(self, teacher: nn.Module, student: nn.Module, train_blocks: torch.Tensor,
                 eval_blocks: torch.Tensor | None, config: DistillConfig, run_dir: str | Path,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                 resume: bool = True, kept_channels: Sequence[int] | None = None,
                 eval_sets: dict[str, torch.Tensor] | None = None):
        cfg = self.cfg = config
        # per-source held-out sets (engine.mix): rows in eval_sources.jsonl, one per source and evaluation
        self.eval_sets = {k: v[: cfg.eval_samples, : cfg.seq_len] for k, v in (eval_sets or {}).items()}
        if train_blocks.shape[1] < cfg.seq_len:
            raise ValueError(f"training blocks have {train_blocks.shape[1]} tokens, seq_len is {cfg.seq_len}")
        self.teacher, self.student, self.kept_channels = teacher, student, kept_channels
        self.train_blocks = train_blocks[:, : cfg.seq_len]
        self.eval_blocks = None if eval_blocks is None else eval_blocks[: cfg.eval_samples, : cfg.seq_len]
        self.run_dir = Path(run_dir)
        self.progress, self.should_stop, self.resume = progress, should_stop, resume
        self.start, self.elapsed, self.first_eval, self.last_eval = 0, 0.0, None, None
        self.stop_flag = threading.Event()

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Strategy, checkpoint to resume, models on the device, optimizer, schedule, resumed state."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.par = par = strategy_for_launch(next(self.student.parameters()).device)
        self.total, self.G = cfg.total_steps(par.world), cfg.global_batch(par.world)
        amp = resolve_dtype(cfg.dtype, par.device)
        self.amp = amp if amp == torch.bfloat16 else torch.float32  # fp16 would need a grad scaler
        state = self._pick_checkpoint()
        self.module = self._build_module(state)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.95), fused=par.device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, self.total, cfg.min_lr_ratio))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]  # sharded under FSDP
        self._restore(state)
        self.module, self.optimizer = par.wrap(self.module, self.optimizer)
        self.raw = par.unwrap(self.module)
        if self.teacher is not None:
            self.teacher.to(par.device)
        par.barrier()  # rank 0 has cleaned the run folder
        self.run = Run(self.run_dir)
        self.order = DataOrder(self.train_blocks.shape[0], self.G, cfg.seed)
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, lambda *_: self.stop_flag.set())

    def _pick_checkpoint(self) -> dict | None:
        """The newest valid checkpoint's state (rank 0 picks the file for all ranks), or None."""
        found = load_latest_valid(self.run_dir / "checkpoints") if self.resume and self.par.main else None
        name = self.par.pick(str(found[0]) if found else None)
        if name is None:
            return None
        self.ckpt_name = Path(name).name
        return found[1] if found else load_checkpoint(Path(name))

    def _build_module(self, state: dict | None) -> Distillable:
        """fp32 master weights for the student (a sharded copy under FSDP; LoRA adapters for the
        lora method), frozen teacher, layer taps for the hidden-state loss."""
        cfg, par = self.cfg, self.par
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.student.float().train().requires_grad_(True)  # every weight trains (LoRA freezes the base itself)
        n_s = len(get_adapter(self.student).layers)
        taps: list[int] = []
        self.t_tap = None
        if cfg.loss_weights()["hidden_loss"]:
            layer_map = list(cfg.layer_map) if cfg.layer_map is not None else list(range(n_s))
            if len(layer_map) != n_s:
                raise ValueError(f"layer_map has {len(layer_map)} entries; the student has {n_s} layers")
            taps, self.t_tap = list(range(n_s)), LayerTap(self.teacher, layer_map)
        if cfg.method == "lora" and par.sharded:
            raise UserError("LoRA trains in one process or under DDP; FSDP shards full models only")
        trainee = copy.deepcopy(self.student.to("cpu")) if par.sharded else self.student.to(par.device)
        if cfg.method == "lora":
            trainee = add_lora(trainee, cfg)
        t_hidden = int(self.teacher.config.hidden_size) if self.teacher is not None else 0
        module = Distillable(trainee, taps, t_hidden, self.kept_channels)
        if state is not None:
            module.load_state_dict(state["model"])
        if par.sharded:
            par.shard(module, list(get_adapter(module.student).layers))
        else:
            module.to(par.device)
        return module

    def _restore(self, state: dict | None) -> None:
        """Optimizer, schedule, RNG and counters from a checkpoint; a fresh start clears old rows."""
        if state is None:
            if self.par.main:  # no rows or checkpoints of an earlier attempt survive
                truncate_metrics(self.run_dir / "metrics.jsonl", -1)
                truncate_metrics(self.run_dir / "eval_sources.jsonl", -1)
                for old in checkpoint_files(self.run_dir / "checkpoints"):
                    remove_checkpoint(old)
            return
        if state.get("optimizer") is not None:
            self.par.load_optim_state(self.optimizer, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[self.par.rank] if len(ranks) == self.par.world else state["rng"])
        self.start, self.elapsed, self.first_eval = state["step"], state["elapsed_s"], state.get("first_eval")
        if state.get("global_batch") != self.G:
            log.warning("resuming with global batch %d (checkpoint: %s): data order differs",
                        self.G, state.get("global_batch"))
        log.info("resumed from %s (step %d/%d, %s)", self.ckpt_name, self.start, self.total, self.par.name)
        if self.par.main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.start)
            truncate_metrics(self.run_dir / "eval_sources.jsonl", self.start)

    # ------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based `step`) over its global batch; the metrics row it logged."""
        cfg, par = self.cfg, self.par
        t0 = time.perf_counter()
        idx = self.order.batch(step)  # (G,) block indices of this optimizer step
        B, A = cfg.batch_size, cfg.grad_accum
        sums = None
        for a in range(A):
            lo = a * par.world * B + par.rank * B
            ids = self.train_blocks[idx[lo: lo + B]].to(par.device, non_blocking=True)  # (B, T)
            with par.no_sync(self.module, last=a == A - 1):
                terms = self._micro_batch_loss(ids)
                par.backward(terms["loss"] / A)
            vec = torch.stack([v.detach() for v in terms.values()]) / A
            sums = vec if sums is None else sums + vec
        lr = self.optimizer.param_groups[0]["lr"]
        gnorm = par.clip(self.params, cfg.clip)
        self.optimizer.step()
        self.sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        stop_local = bool(self.stop_flag.is_set() or (self.should_stop and self.should_stop()))
        vec = torch.cat([sums, gnorm.detach().float().reshape(1).to(sums.device),
                         torch.tensor([float(stop_local)], device=sums.device)])
        vals = par.reduce_mean(vec).tolist()  # one collective and the single host sync of the step
        dt = time.perf_counter() - t0
        self.elapsed += dt
        done = step + 1
        row = {"step": done, "tokens": done * self.G * cfg.seq_len}
        row.update({k: vals[i] for i, k in enumerate(terms)})
        row.update(grad_norm=vals[-2], lr=lr, tokens_per_s=round(self.G * cfg.seq_len / dt, 1),
                   elapsed_s=round(self.elapsed, 3))
        self._log(row)
        self.stopped = vals[-1] > 0  # any rank asked to stop
        if self.progress and par.main:
            self.progress(done / self.total, f"step {done}/{self.total} loss {row['loss']:.4f}")
        return row

    def _micro_batch_loss(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher forward (no grad), student forward, the weighted loss terms of one micro-batch."""
        t_logits = None
        if self.cfg.needs_teacher:
            with torch.no_grad(), autocast_ctx(self.par.device, self.amp):
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        t_hidden = self.t_tap.take() if self.t_tap else []
        with autocast_ctx(self.par.device, self.amp):
            s_logits, s_hidden = self.module(ids)
        return distill_loss(t_logits, s_logits, ids, self.cfg, t_hidden, s_hidden)

    # ------------------------------------------------------------ evaluate, checkpoint
    def evaluate(self, step: int) -> dict:
        """Held-out perplexity and KL at `step` (all ranks together when sharded; rank 0 logs)."""
        par = self.par
        self.raw.student.eval()
        row = {"eval": True, "step": step, "tokens": step * self.G * self.cfg.seq_len}
        if par.main or par.sharded:
            model = _ViaRoot(self.module) if par.sharded else self.raw.student
            r = evaluate_student(self.teacher, model, self.eval_blocks, self.cfg.eval_batch_size,
                                 self.cfg.temperature)  # teacher None (cpt without one): no KL
            row.update(ppl=r["ppl"], kl=r["kl"], elapsed_s=round(self.elapsed, 3))
            if self.first_eval is None:
                row["teacher_ppl"] = r["teacher_ppl"]
                self.first_eval = dict(row)
            self._log(row)
            self._evaluate_sources(model, row, r)
            if par.sharded:
                self.module.reshard()
        self.raw.student.train()
        self.last_eval = row
        return row

    def _evaluate_sources(self, model: nn.Module, row: dict, r: dict) -> None:
        """Perplexity and KL on each evaluation source alone (the set equal to the main held-out
        blocks reuses its result), appended to eval_sources.jsonl by rank 0."""
        for name, blocks in self.eval_sets.items():
            same = self.eval_blocks is not None and torch.equal(blocks, self.eval_blocks)
            rs = r if same else evaluate_student(self.teacher, model, blocks, self.cfg.eval_batch_size,
                                                 self.cfg.temperature)
            if self.par.main:
                append_jsonl(self.run_dir / "eval_sources.jsonl",
                             {"step": row["step"], "tokens": row["tokens"], "source": name, "ppl": rs["ppl"],
                              "kl": rs["kl"], "teacher_ppl": rs["teacher_ppl"]})

    def save_checkpoint(self, step: int) -> None:
        """Full weights, AdamW moments, schedule and every rank's RNG state (rank 0 writes)."""
        par = self.par
        model_state = par.full_model_state(self.module)
        optim_state = par.full_optim_state(self.optimizer)
        rng = rng_state()
        rng_ranks = par.gather_rng(rng)
        if par.main:
            state = {"step": step, "elapsed_s": self.elapsed, "model": model_state, "optimizer": optim_state,
                     "scheduler": self.sched.state_dict(), "rng": rng, "rng_ranks": rng_ranks,
                     "global_batch": self.G, "world_size": par.world, "parallel": par.name,
                     "config": self.cfg.to_dict(), "first_eval": self.first_eval}
            save_checkpoint(self.run_dir / "checkpoints", step, state, keep=self.cfg.keep_checkpoints)
        par.barrier()

    # ------------------------------------------------------------ the loop and the end
    def run_loop(self) -> dict:
        """setup -> evaluate(0) -> (train_step -> evaluate -> checkpoint)* -> finish (peak memory measured)."""
        with PeakMemory(next(self.student.parameters()).device) as self.memory:
            return self._loop()

    def _loop(self) -> dict:
        self.setup()
        cfg, has_eval = self.cfg, self.eval_blocks is not None
        self.stopped, done = False, self.start
        try:
            if has_eval and self.start == 0:
                self.evaluate(0)
            for step in range(self.start, self.total):
                done = self.train_step(step)["step"]
                if has_eval and not self.stopped and (done % cfg.eval_every == 0 or done == self.total):
                    self.evaluate(done)
                if self.stopped or done % cfg.checkpoint_every == 0 or done == self.total:
                    self.save_checkpoint(done)
                if self.stopped:
                    log.info("stopped at step %d/%d (checkpoint kept)", done, self.total)
                    break
            if self.start >= self.total and has_eval:  # already finished: the last evaluation on file
                prior = [r for r in self.run.metrics() if r.get("eval")]
                self.last_eval = prior[-1] if prior else self.evaluate(self.total)
            return self.finish(done)
        finally:
            self._cleanup()

    def finish(self, done: int) -> dict:
        """The trained weights back into the caller's student (every rank; LoRA adapters saved to
        run_dir/adapter and merged in); the run's summary."""
        if self.par.sharded:
            full = self.par.full_model_state(self.module, everywhere=True)
            self.student.load_state_dict({k[len("student."):]: v for k, v in full.items()
                                          if k.startswith("student.")})
            self.student.to(self.par.device)
        elif self.cfg.method == "lora":
            peft_model = self.raw.student
            if self.par.main and not self.stopped:
                peft_model.save_pretrained(self.run_dir / "adapter")  # adapter_model.safetensors + config
            peft_model.merge_and_unload()  # the caller's student, with the adapters merged in
        return {"steps": done, "total_steps": self.total, "stopped": self.stopped,
                "tokens": done * self.G * self.cfg.seq_len, "elapsed_s": self.elapsed,
                "first_eval": self.first_eval, "last_eval": self.last_eval, "parallel": self.par.name,
                "method": self.cfg.method, "peak_memory_bytes": self.memory.peak}

    def _log(self, row: dict) -> None:
        if self.par.main:
            self.run.log_metrics(row)

    def _cleanup(self) -> None:
        if getattr(self, "_old_handler", None) is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        if getattr(self, "t_tap", None):
            self.t_tap.remove()
        if getattr(self, "raw", None) is not None and self.raw.tap:
            self.raw.tap.remove()
        self.student.eval()


class _ViaRoot(nn.Module):
    """The student as evaluate_student sees it when sharded: run through the FSDP root module (on
    every rank together), outside inference mode - FSDP2 cannot reuse buffers made inside it."""

    def __init__(self, module: Distillable):
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        with torch.inference_mode(False), torch.no_grad():
            logits, _ = self.module(input_ids.clone())
        return SimpleNamespace(logits=logits)


def distill(teacher: nn.Module, student: nn.Module, train_blocks: torch.Tensor,
            eval_blocks: torch.Tensor | None, config: DistillConfig, run_dir: str | Path,
            progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
            resume: bool = True, kept_channels: Sequence[int] | None = None,
            eval_sets: dict[str, torch.Tensor] | None = None) -> dict:
    """Train `student` (in place; fp32 master weights) to match `teacher`; see DistillRecipe.

    train_blocks / eval_blocks: (N, T) token blocks, T >= config.seq_len (longer blocks are cut).
    Appends rows to run_dir/metrics.jsonl, checkpoints into run_dir/checkpoints, resumes from the
    newest valid checkpoint when `resume`, and stops cleanly (final checkpoint) when should_stop()
    is true or SIGTERM arrives. kept_channels: teacher hidden channels the student kept (width
    pruning), to initialise the hidden-state projector. eval_sets: {source: (N, T) blocks} evaluated
    alone at every evaluation (rows in run_dir/eval_sources.jsonl). Under several processes every rank calls
    this with the same arguments.

    Returns {"steps", "total_steps", "stopped", "tokens", "elapsed_s", "first_eval", "last_eval",
    "parallel" ("single", "ddp" or "fsdp")}."""
    return DistillRecipe(teacher, student, train_blocks, eval_blocks, config, run_dir, progress,
                         should_stop, resume, kept_channels, eval_sets).run_loop()
