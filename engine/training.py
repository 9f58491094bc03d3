"""Building blocks of distillation: its configuration, loss, schedule, data order and trainable module.

Loss per micro-batch (`distill_loss`):
    kl_weight * tau^2 * KL(teacher || student)(logits / tau)     mean per token (forward KL)
  + ce_weight * next-token cross-entropy of the student          (optional)
  + hidden_weight * mean_j NMSE(P(h_s[j]), h_t[layer_map[j]])    (optional)

Hidden-state loss: h_s[j] is the output of student layer j, h_t[i] of teacher layer i, where
`layer_map[j]` says which teacher layer student layer j came from (plan.kept_layers). NMSE is the
squared error divided by the teacher state's mean square, per sequence (scale-free across layers,
and independent of how a batch is split across processes). When width pruning made the student's
hidden size D' smaller than the teacher's D, P is a learned linear map D' -> D shared by all layers
(as in Minitron), trained with the student and saved in checkpoints; given the plan's kept channel
indices it starts as the exact "kept channels" embedding (student channel i -> teacher channel
kept[i]), so the loss starts as a comparison on the kept channels.

The recipe that uses them is engine/distill.py.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.arch import get_adapter
from engine.arch.base import hidden_from_output
from engine.evaluate import token_kl

log = logging.getLogger(__name__)



METHODS = ("kd", "cpt", "lora")


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
    method: str = "kd"  # kd: distillation | cpt: continued pretraining (CE only) | lora: LoRA adapters
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # module names; None: every linear layer of the blocks
    lora_loss: str = "kd"  # what LoRA trains on: the kd terms, or ce (next-token cross-entropy)

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
        if self.lora_targets is not None and not isinstance(self.lora_targets, tuple):
            object.__setattr__(self, "lora_targets", tuple(str(n) for n in self.lora_targets))
        if self.method not in METHODS:
            raise ValueError(f"DistillConfig: method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.lora_loss not in ("kd", "ce"):
            raise ValueError(f"DistillConfig: lora_loss must be kd or ce; got {self.lora_loss!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("DistillConfig: lora_rank must be >= 1, lora_alpha > 0, 0 <= lora_dropout < 1")
        if not any(self.loss_weights().values()):
            raise ValueError("DistillConfig: every loss weight is 0; give kl_weight, ce_weight or hidden_weight")

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss term under this method: cpt (and LoRA on ce) train on next-token
        cross-entropy alone; kd and LoRA on kd on the distillation terms (hidden states: kd only)."""
        if self.method == "cpt" or (self.method == "lora" and self.lora_loss == "ce"):
            return {"kl_loss": 0.0, "ce_loss": 1.0, "hidden_loss": 0.0}
        hidden = self.hidden_weight if self.method == "kd" else 0.0
        return {"kl_loss": self.kl_weight, "ce_loss": self.ce_weight, "hidden_loss": hidden}

    @property
    def needs_teacher(self) -> bool:
        """Whether training runs the teacher at all (evaluation may still use it for KL)."""
        w = self.loss_weights()
        return bool(w["kl_loss"] or w["hidden_loss"])

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
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("layer_map", "lora_targets"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
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


def distill_loss(t_logits: torch.Tensor | None, s_logits: torch.Tensor, ids: torch.Tensor, cfg: DistillConfig,
                 t_hidden: list[torch.Tensor], s_hidden: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one micro-batch (fp32 scalars) and their sum under "loss"."""
    tau = cfg.temperature
    weights = cfg.loss_weights()
    terms: dict[str, torch.Tensor] = {}
    if weights["kl_loss"]:
        terms["kl_loss"] = token_kl(t_logits, s_logits, tau) * (tau * tau) / ids.numel()
    if weights["ce_loss"]:
        terms["ce_loss"] = F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if weights["hidden_loss"] and s_hidden:
        # per-sequence NMSE, then the mean: the same value however a batch is split across ranks
        nmse = [(s.float() - t.float()).pow(2).mean((1, 2)) / t.float().pow(2).mean((1, 2)).clamp_min(1e-8)
                for s, t in zip(s_hidden, t_hidden, strict=True)]  # each (B,)
        terms["hidden_loss"] = torch.stack(nmse).mean()
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def lora_targets(model: nn.Module) -> list[str]:
    """The default LoRA targets: the names of every linear layer inside the decoder blocks
    (q/k/v/o and gate/up/down for Llama-like models; c_attn/c_proj/c_fc for GPT-2)."""

    return sorted({name.rsplit(".", 1)[-1] for layer in get_adapter(model).layers
                   for name, m in layer.named_modules() if isinstance(m, nn.Linear | Conv1D)})


def add_lora(model: nn.Module, cfg: DistillConfig) -> nn.Module:
    """`model` with LoRA adapters (peft) on cfg.lora_targets; its own weights frozen."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_targets or lora_targets(model))
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", fan_in_fan_out=model.config.model_type == "gpt2")
    return get_peft_model(model, lcfg)


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




def rng_state() -> dict:
    """Every RNG the loop draws from (saved in checkpoints)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
