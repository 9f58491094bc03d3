"""Knowledge distillation of a pruned student from its teacher (Minitron recipe).

Loss per micro-batch:
    kl_weight * tau^2 * KL(teacher || student)(logits / tau)     mean per token (forward KL)
  + ce_weight * next-token cross-entropy of the student          (optional)
  + hidden_weight * mean_j NMSE(P(h_s[j]), h_t[layer_map[j]])    (optional)

Hidden-state loss: h_s[j] is the output of student layer j, h_t[i] of teacher layer i, where
`layer_map[j]` says which teacher layer student layer j came from (plan.kept_layers). NMSE is the
squared error divided by the teacher state's mean square, per sequence (scale-free across layers,
and independent of how a batch is split across processes). When width
pruning made the student's hidden size D' smaller than the teacher's D, P is a learned linear map
D' -> D shared by all layers (as in Minitron), trained with the student and saved in checkpoints;
given the plan's kept channel indices it starts as the exact "kept channels" embedding (student
channel i -> teacher channel kept[i]), so the loss starts as a comparison on the kept channels.

Training: AdamW (no decay on 1-D params), linear warmup + cosine decay to min_lr_ratio * lr,
gradient accumulation, clipping, bf16 autocast where supported with fp32 master weights; the
teacher runs once per micro-batch without gradients.

Several processes (`torchrun` / `accelerate launch`, WORLD_SIZE > 1): each rank takes its slice
of every micro-batch of the same global batch, and the mean loss terms, grad norm and any rank's
stop request are all-reduced once per step. Two ways to spread the student:
  - DDP (default): accelerate's wrapper; every rank holds the whole student and its AdamW state.
  - FSDP, selected by ACCELERATE_USE_FSDP=true in the environment - what `accelerate launch
    --use_fsdp` (or an FSDP `accelerate config`) sets; with torchrun set it yourself. The loop
    shards the student itself with torch FSDP2 (`fully_shard`: one unit per decoder layer, one
    for the rest incl. the hidden-state projector), full shard, gradients reduce-scattered every
    micro-batch, on CUDA (NCCL) or CPU (gloo) alike: accelerate only turns FSDP on for GPUs, and
    its other FSDP_* settings are not used. Weights, gradients and AdamW moments are split across
    the ranks; the frozen teacher is replicated. A copy of the student is sharded; the caller's
    `student` waits on the CPU and gets the trained full weights back at the end (on every rank).
    Evaluation runs on all ranks together (same blocks on each, rank 0 logs).
The single-process path uses plain torch (no accelerate wrappers).

Checkpoints (written by rank 0) have one format whatever the launch: the full (unsharded) weights
and AdamW moments, schedule, step, every rank's RNG state. Any run - one process, DDP or FSDP -
resumes from the newest one (all ranks load the file rank 0 picked: the run folder must be on a
filesystem they all see) and repeats the uninterrupted run when the global batch is unchanged.

metrics.jsonl rows: training {step, tokens, loss, kl_loss[, ce_loss][, hidden_loss], grad_norm, lr,
tokens_per_s, elapsed_s}; evaluation {eval: true, step, tokens, ppl, kl, elapsed_s[, teacher_ppl]}
(step 0 = before training; teacher_ppl on the first evaluation only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.evaluate import token_kl

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a distillation run (saved in checkpoints and config.json).

    batch_size is per process and micro-batch; the global batch per optimizer step is
    batch_size * grad_accum * world_size sequences of seq_len tokens."""

    steps: int = 100
    tokens: int | None = None  # token budget; when set it decides the number of steps
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: tuple[int, ...] | None = None  # student layer j -> teacher layer (plan.kept_layers)
    eval_every: int = 50
    eval_samples: int = 16
    eval_batch_size: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    dtype: str = "auto"  # autocast dtype: auto (bf16 where native), bf16, fp32

    def __post_init__(self) -> None:
        bad = [n for n in ("batch_size", "grad_accum", "seq_len", "eval_every", "checkpoint_every")
               if getattr(self, n) < 1]
        if self.steps < 1 and not self.tokens:
            bad.append("steps")
        if bad:
            raise ValueError(f"DistillConfig: {', '.join(bad)} must be >= 1")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("DistillConfig: temperature and lr must be > 0")
        if self.layer_map is not None and not isinstance(self.layer_map, tuple):
            object.__setattr__(self, "layer_map", tuple(int(i) for i in self.layer_map))

    def global_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size

    def total_steps(self, world_size: int = 1) -> int:
        """`steps`, or the steps needed to see `tokens` tokens when a token budget is set."""
        if self.tokens:
            return max(1, math.ceil(self.tokens / (self.global_batch(world_size) * self.seq_len)))
        return self.steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_map"] = list(self.layer_map) if self.layer_map is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("layer_map") is not None:
            kw["layer_map"] = tuple(kw["layer_map"])
        return cls(**kw)


# ---------------------------------------------------------------- pieces of the loop


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


class DataOrder:
    """Which blocks each step uses: a fresh seeded permutation per epoch over the N blocks.

    A pure function of (seed, step), so a resumed run sees exactly the same data order."""

    def __init__(self, n_blocks: int, global_batch: int, seed: int):
        self.n, self.g, self.seed = n_blocks, global_batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        """(global_batch,) block indices of optimizer step `step` (0-based)."""
        ks = range(step * self.g, (step + 1) * self.g)
        return torch.stack([self._perm(k // self.n)[k % self.n] for k in ks])


class LayerTap:
    """Forward hooks that record the outputs of chosen decoder layers (in the given order)."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        from engine.arch import get_adapter
        from engine.arch.base import hidden_from_output

        layers = get_adapter(model).layers
        self.outputs: dict[int, torch.Tensor] = {}
        self.order = list(indices)
        self.handles = []
        for i in sorted(set(indices)):
            def hook(_m, _a, out, i=i):
                self.outputs[i] = hidden_from_output(out)
            self.handles.append(layers[i].register_forward_hook(hook))

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs in `indices` order, each (B, T, D); clears the record."""
        out = [self.outputs[i] for i in self.order]
        self.outputs = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Distillable(nn.Module):
    """The trainable part: the student, plus the hidden-state projector when widths differ.

    forward(ids (B, T)) -> (logits (B, T, V), [student layer outputs (B, T, D')] or [])."""

    def __init__(self, student: nn.Module, tap_layers: Sequence[int] = (), teacher_hidden: int = 0,
                 kept_channels: Sequence[int] | None = None):
        super().__init__()
        self.student = student
        self.tap = LayerTap(student, tap_layers) if tap_layers else None
        d_s = int(student.config.hidden_size)
        self.proj: nn.Linear | None = None
        if tap_layers and teacher_hidden and teacher_hidden != d_s:
            self.proj = nn.Linear(d_s, teacher_hidden, bias=False)
            if kept_channels is not None and len(kept_channels) == d_s:
                with torch.no_grad():
                    self.proj.weight.zero_()
                    self.proj.weight[torch.as_tensor(list(kept_channels)), torch.arange(d_s)] = 1.0

    def forward(self, ids: torch.Tensor):
        logits = self.student(input_ids=ids, use_cache=False).logits
        hidden = self.tap.take() if self.tap else []
        if self.proj is not None:
            hidden = [self.proj(h) for h in hidden]
        return logits, hidden


def loss_terms(t_logits: torch.Tensor, s_logits: torch.Tensor, ids: torch.Tensor, cfg: DistillConfig,
               t_hidden: list[torch.Tensor], s_hidden: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one micro-batch (fp32 scalars) and their sum under "loss"."""
    tau = cfg.temperature
    terms: dict[str, torch.Tensor] = {}
    if cfg.kl_weight:
        terms["kl_loss"] = token_kl(t_logits, s_logits, tau) * (tau * tau) / ids.numel()
    if cfg.ce_weight:
        terms["ce_loss"] = F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if cfg.hidden_weight and s_hidden:
        # per-sequence NMSE, then the mean: the same value however a batch is split across ranks
        nmse = [(s.float() - t.float()).pow(2).mean((1, 2)) / t.float().pow(2).mean((1, 2)).clamp_min(1e-8)
                for s, t in zip(s_hidden, t_hidden, strict=True)]  # each (B,)
        terms["hidden_loss"] = torch.stack(nmse).mean()
    weights = {"kl_loss": cfg.kl_weight, "ce_loss": cfg.ce_weight, "hidden_loss": cfg.hidden_weight}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not norms, biases); tied weights once."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    import random

    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import random

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _accelerator():
    """An accelerate.Accelerator when launched with several processes (torchrun / accelerate
    launch), else None: the single-process path pays nothing for accelerate."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def fsdp_requested() -> bool:
    """ACCELERATE_USE_FSDP=true: what `accelerate launch --use_fsdp` / an FSDP accelerate config sets."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def _fsdp_shard(module: Distillable, device: torch.device, world: int) -> None:
    """FSDP2 in place over all ranks: one unit per student decoder layer, the root for the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from engine.arch import get_adapter

    mesh = init_device_mesh(device.type, (world,))
    for layer in get_adapter(module.student).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    ps = list(module.parameters())
    log.info("FSDP2 over %d ranks: this rank holds %d of the %d student values", world,
             sum(p.to_local().numel() for p in ps), sum(p.numel() for p in ps))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it, same order); else t."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _full_model_state(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """state_dict of an FSDP module with full CPU tensors (collective; {} where not `keep`)."""
    module.reshard()  # an evaluation forward leaves the root's parameters unsharded
    out = {}
    for k, v in module.state_dict().items():
        v = _full(v).detach()
        if keep:
            out[k] = v.cpu()
    return out


def _full_optim_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict | None:
    """optimizer.state_dict() with the FSDP-sharded moments gathered (collective): the same format
    as a single process's, so checkpoints resume under any launch."""
    sd = optimizer.state_dict()
    state = {}
    for i in sorted(sd["state"]):
        s = {k: _full(v).detach() if torch.is_tensor(v) else v for k, v in sorted(sd["state"][i].items())}
        state[i] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def _load_sharded_optim_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full optimizer state_dict into an optimizer over FSDP (DTensor) parameters: each rank
    keeps its own shard of every moment (cut locally from the full tensor, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
                    for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


class _ViaRoot(nn.Module):
    """The student as evaluate_student sees it when sharded: run through the FSDP root module (on
    every rank together), outside inference mode - FSDP2 cannot reuse buffers made inside it."""

    def __init__(self, module: Distillable):
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        from types import SimpleNamespace

        with torch.inference_mode(False), torch.no_grad():
            logits, _ = self.module(input_ids.clone())
        return SimpleNamespace(logits=logits)


def distill(teacher: nn.Module, student: nn.Module, train_blocks: torch.Tensor,
            eval_blocks: torch.Tensor | None, config: DistillConfig, run_dir: str | Path,
            progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
            resume: bool = True, kept_channels: Sequence[int] | None = None) -> dict:
    """Train `student` (in place; converted to fp32 master weights) to match `teacher`.

    train_blocks / eval_blocks: (N, T) token blocks, T >= config.seq_len (longer blocks are cut).
    Appends rows to run_dir/metrics.jsonl, checkpoints atomically into run_dir/checkpoints, resumes
    from the newest checkpoint when `resume`, and stops cleanly (final checkpoint) when
    should_stop() is true or SIGTERM arrives. kept_channels: teacher hidden channels the student
    kept (width pruning), to initialise the hidden-state projector. Under several processes every
    rank calls this with the same arguments (see the module docstring for DDP / FSDP).

    Returns {"steps", "total_steps", "stopped", "tokens", "elapsed_s", "first_eval", "last_eval",
    "parallel" ("single", "ddp" or "fsdp")}."""
    import copy
    import signal
    import threading
    import time

    from engine.arch import get_adapter
    from engine.evaluate import autocast_ctx, evaluate_student
    from engine.models import resolve_dtype
    from engine.runs import Run, checkpoint_files, latest_checkpoint, save_checkpoint, truncate_metrics

    cfg = config
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = _accelerator()
    world, rank = (acc.num_processes, acc.process_index) if acc else (1, 0)
    main = rank == 0
    fsdp = acc is not None and fsdp_requested()
    parallel = "fsdp" if fsdp else "ddp" if acc else "single"
    device = acc.device if acc else next(student.parameters()).device
    amp = resolve_dtype(cfg.dtype, device)
    amp = amp if amp == torch.bfloat16 else torch.float32  # fp16 would need a grad scaler: not used
    if train_blocks.shape[1] < cfg.seq_len:
        raise ValueError(f"training blocks have {train_blocks.shape[1]} tokens, seq_len is {cfg.seq_len}")
    train_blocks = train_blocks[:, : cfg.seq_len]
    if eval_blocks is not None:
        eval_blocks = eval_blocks[: cfg.eval_samples, : cfg.seq_len]
    total, G, T = cfg.total_steps(world), cfg.global_batch(world), cfg.seq_len
    B, A = cfg.batch_size, cfg.grad_accum

    # -- which checkpoint: rank 0 decides for all -----------------------------------------------
    ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if acc:
        pick = [str(ckpt) if ckpt is not None else None]
        torch.distributed.broadcast_object_list(pick, src=0)
        ckpt = Path(pick[0]) if pick[0] is not None else None
    state = torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt is not None else None

    # -- models: fp32 master weights for the student, frozen teacher ----------------------------
    teacher.eval().requires_grad_(False)
    student.float().train()
    n_s = len(get_adapter(student).layers)
    taps: list[int] = []
    t_tap = None
    if cfg.hidden_weight:
        layer_map = list(cfg.layer_map) if cfg.layer_map is not None else list(range(n_s))
        if len(layer_map) != n_s:
            raise ValueError(f"layer_map has {len(layer_map)} entries; the student has {n_s} layers")
        taps = list(range(n_s))
        t_tap = LayerTap(teacher, layer_map)
    if fsdp:  # shard a copy; the caller's student waits on the CPU for the trained weights
        trainee = copy.deepcopy(student.to("cpu"))
    else:
        trainee = student.to(device)
    module = Distillable(trainee, taps, int(teacher.config.hidden_size), kept_channels)
    if state is not None:
        module.load_state_dict(state["model"])
    if fsdp:
        _fsdp_shard(module, device, world)  # moves the shards to `device`
    else:
        module.to(device)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total, cfg.min_lr_ratio))
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the sharded ones under FSDP

    # -- resume ---------------------------------------------------------------------------------
    start, elapsed, first_eval = 0, 0.0, None
    if state is not None:
        if state.get("optimizer") is not None:
            if fsdp:
                _load_sharded_optim_state(optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ranks = state.get("rng_ranks") or []
        _set_rng_state(ranks[rank] if len(ranks) == world else state["rng"])
        start, elapsed, first_eval = state["step"], state["elapsed_s"], state.get("first_eval")
        if state.get("global_batch") != G:
            log.warning("resuming with global batch %d (checkpoint: %s): data order differs",
                        G, state.get("global_batch"))
        log.info("resumed from %s (step %d/%d, %s)", ckpt.name, start, total, parallel)
        if main:
            truncate_metrics(run_dir / "metrics.jsonl", start)
        del state
    elif main:  # a fresh start: no rows or checkpoints of an earlier attempt survive
        truncate_metrics(run_dir / "metrics.jsonl", -1)
        for old in checkpoint_files(run_dir / "checkpoints"):
            old.unlink()
    if acc:
        if not fsdp:
            module, optimizer = acc.prepare(module, optimizer)
        teacher.to(device)
        acc.wait_for_everyone()  # rank 0 has cleaned the run folder
    raw = acc.unwrap_model(module) if acc and not fsdp else module
    run = Run(run_dir)

    def log_row(row: dict) -> None:
        if main:
            run.log_metrics(row)

    def evaluate(step: int) -> dict:
        nonlocal first_eval
        raw.student.eval()
        row = {"eval": True, "step": step, "tokens": step * G * T}
        if main or fsdp:  # a sharded student needs every rank
            r = evaluate_student(teacher, _ViaRoot(module) if fsdp else raw.student, eval_blocks,
                                 cfg.eval_batch_size, cfg.temperature)
            row.update(ppl=r["ppl"], kl=r["kl"], elapsed_s=round(elapsed, 3))
            if first_eval is None:
                row["teacher_ppl"] = r["teacher_ppl"]
                first_eval = dict(row)
            log_row(row)
            if fsdp:
                module.reshard()
        raw.student.train()
        return row

    def checkpoint(step: int) -> None:
        if fsdp:
            model_state, optim_state = _full_model_state(module, main), _full_optim_state(optimizer, main)
        else:
            model_state = acc.get_state_dict(module) if acc else raw.state_dict()
            optim_state = optimizer.state_dict() if main else None
        rng = _rng_state()
        rng_ranks = None
        if acc:
            rng_ranks = [None] * world
            torch.distributed.all_gather_object(rng_ranks, rng)
        if main:
            state = {"format": 1, "step": step, "elapsed_s": elapsed, "model": model_state,
                     "optimizer": optim_state, "scheduler": sched.state_dict(), "rng": rng,
                     "rng_ranks": rng_ranks, "global_batch": G, "world_size": world, "parallel": parallel,
                     "config": cfg.to_dict(), "first_eval": first_eval}
            save_checkpoint(run_dir / "checkpoints", step, state, keep=cfg.keep_checkpoints)
        if acc:
            acc.wait_for_everyone()

    # -- stop requests: should_stop() or SIGTERM ----------------------------------------------------
    stop_flag = threading.Event()
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop_flag.set())

    order = DataOrder(train_blocks.shape[0], G, cfg.seed)
    last_eval = None
    stopped = False
    try:
        if eval_blocks is not None and start == 0:
            last_eval = evaluate(0)
        for step in range(start, total):
            t0 = time.perf_counter()
            idx = order.batch(step)  # (G,) block indices of this optimizer step
            sums = None
            for a in range(A):
                rows = idx[a * world * B + rank * B: a * world * B + (rank + 1) * B]
                ids = train_blocks[rows].to(device, non_blocking=True)  # (B, T)
                sync = acc.no_sync(module) if acc and not fsdp and a < A - 1 else _null()
                with sync:
                    with torch.no_grad(), autocast_ctx(device, amp):
                        t_logits = teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
                    t_hidden = t_tap.take() if t_tap else []
                    with autocast_ctx(device, amp):
                        s_logits, s_hidden = module(ids)
                    terms = loss_terms(t_logits, s_logits, ids, cfg, t_hidden, s_hidden)
                    del t_logits, s_logits, t_hidden, s_hidden
                    loss = terms["loss"] / A
                    acc.backward(loss) if acc and not fsdp else loss.backward()
                vec = torch.stack([v.detach() for v in terms.values()]) / A
                sums = vec if sums is None else sums + vec
            lr = optimizer.param_groups[0]["lr"]
            gnorm = acc.clip_grad_norm_(params, cfg.clip) if acc and not fsdp else \
                _full(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            stop_local = bool(stop_flag.is_set() or (should_stop and should_stop()))
            vec = torch.cat([sums, gnorm.detach().float().reshape(1).to(sums.device),
                             torch.tensor([float(stop_local)], device=sums.device)])
            if acc:  # one collective per step: mean of the terms, any rank's stop request
                vec = acc.reduce(vec, reduction="sum")
                vec[:-1] /= world
            vals = vec.tolist()  # the single host sync of the step
            dt = time.perf_counter() - t0
            elapsed += dt
            done = step + 1
            row = {"step": done, "tokens": done * G * T}
            row.update({k: vals[i] for i, k in enumerate(terms)})
            row.update(grad_norm=vals[-2], lr=lr, tokens_per_s=round(G * T / dt, 1),
                       elapsed_s=round(elapsed, 3))
            log_row(row)
            if progress and main:
                progress(done / total, f"step {done}/{total} loss {row['loss']:.4f}")
            stopped = vals[-1] > 0
            if eval_blocks is not None and (done % cfg.eval_every == 0 or done == total) and not stopped:
                last_eval = evaluate(done)
            if stopped or done % cfg.checkpoint_every == 0 or done == total:
                checkpoint(done)
            if stopped:
                log.info("stopped at step %d/%d (checkpoint kept)", done, total)
                break
        else:
            if start >= total and eval_blocks is not None:  # all ranks read the same file
                prior = [r for r in run.metrics() if r.get("eval")]
                last_eval = prior[-1] if prior else evaluate(total)
        if fsdp:  # the trained weights back into the caller's (unsharded) student, on every rank
            full = _full_model_state(module)
            student.load_state_dict({k[len("student."):]: v for k, v in full.items() if k.startswith("student.")})
            student.to(device)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if t_tap:
            t_tap.remove()
        if raw.tap:
            raw.tap.remove()
        student.eval()
    done_steps = min(total, step + 1) if start < total else total
    return {"steps": done_steps, "total_steps": total, "stopped": stopped, "tokens": done_steps * G * T,
            "elapsed_s": elapsed, "first_eval": first_eval, "last_eval": last_eval, "parallel": parallel}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
