"""Sizes checked before a job starts: sequence length against the model's positions, and the peak
memory of scoring, evaluation and distillation against the free memory of the device.

The estimates are closed-form sums over the tensors the engine's own loops create (no model is
built): weights, the activations of one decoder layer (every layer's, kept for backward, when
training), the (B, T, V) logits and the fp32 copies the losses make of them, gradients and AdamW
moments, and the teacher. They are compared with `torch.cuda.mem_get_info` on CUDA and with
MemAvailable from /proc/meminfo on a CPU. tests/test_resources.py checks them against measured peaks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from engine.errors import ResourceError

log = logging.getLogger(__name__)

GB = 1e9
KINDS = ("score", "eval", "distill")
# fp32 logits the depth sweep's lm_nll makes at once (engine.importance.depth.LOGITS_CHUNK_ELEMENTS)
LOGITS_CHUNK_ELEMENTS = 1 << 25
WARN_FRACTION = 0.8  # warn when the estimate is above this share of the free memory


# ---------------------------------------------------------------- shapes from a config


def max_positions(config) -> int | None:
    """The longest sequence the model's position embedding / RoPE range covers (None if unknown)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_seq_len(config, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse a sequence length beyond the model's maximum positions, naming the maximum."""
    m = max_positions(config)
    if m is not None and seq_len > m:
        raise ResourceError(f"{flag} {seq_len} is longer than this model's maximum of {m} positions; "
                            f"use {flag} {m} or less")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only model that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    gated: bool
    positions: int  # rows of a learned position embedding (GPT-2), else 0
    eager_attention: bool  # attention probabilities (B, heads, T, T) are materialised

    @classmethod
    def of(cls, config) -> Shape:
        """Read the shape from a Hugging Face config (GPT-2 names too, through its attribute map)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        gpt2 = getattr(config, "model_type", "") == "gpt2"
        return cls(vocab=int(config.vocab_size), hidden=hidden, layers=int(config.num_hidden_layers), heads=heads,
                   kv_heads=int(kv), head_dim=int(head_dim), ffn=int(ffn),
                   tied=bool(getattr(config, "tie_word_embeddings", True)), gated=not gpt2,
                   positions=int(getattr(config, "n_positions", 0) or 0) if gpt2 else 0,
                   eager_attention=getattr(config, "_attn_implementation", None) == "eager")

    def params(self) -> int:
        """Parameters (norms and biases included approximately: they are < 0.1% of any real model)."""
        D, H, KV, hd, F = self.hidden, self.heads, self.kv_heads, self.head_dim, self.ffn
        layer = D * H * hd + 2 * D * KV * hd + H * hd * D + (3 if self.gated else 2) * D * F + 4 * D
        return self.vocab * D * (1 if self.tied else 2) + self.positions * D + self.layers * layer + 2 * D

    def layer_activations(self) -> int:
        """Elements per token of one decoder layer's activations: norm inputs/outputs and residuals
        (5 x hidden), q, k, v and the attention output, and the MLP's gate, up, act(gate) * up and
        down inputs (4 x ffn; 3 without a gate)."""
        attn = (2 * self.heads + 2 * self.kv_heads) * self.head_dim
        return 5 * self.hidden + attn + (4 if self.gated else 3) * self.ffn

    def layer_inference(self, hooks: bool = False) -> int:
        """Elements per token alive at the peak of one layer's forward without gradients: residual
        stream, norm output and their copies (6 x hidden), q, k, v and the attention output, and the
        MLP's intermediates (2 x ffn; 3 x with the importance hooks' |activation| copies)."""
        attn = (2 * self.heads + 2 * self.kv_heads) * self.head_dim
        return 6 * self.hidden + attn + (3 if hooks else 2) * self.ffn

    def attention_probs(self, seq_len: int) -> int:
        """Elements per sequence of one layer's attention probabilities (0 unless eager attention)."""
        return self.heads * seq_len * seq_len if self.eager_attention else 0


# ---------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one job, by part; `fixed` does not grow with the batch, `per_sample` does."""

    kind: str
    batch: int
    seq_len: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes at the given batch
    per_sample: float = 0.0  # bytes each extra sequence of the batch adds

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fixed(self) -> float:
        return self.total - self.batch * self.per_sample

    def at_batch(self, batch: int) -> float:
        return self.fixed + batch * self.per_sample

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v) + " GB"


def _logit_bytes(kind: str, b: int, teacher: bool) -> float:
    """Bytes per (B, T, V) logit element at the peak of each loop:
    eval:    model logits (b), their shifted fp32 copy and log-softmax in the NLL (4 + 4); with a
             teacher, its logits (b) and token_kl's four fp32 tensors plus kl_div's temporaries (6 x 4)
    distill: both logits (2b) and token_kl's fp32 tensors (5 x 4) plus their gradients (4 + b)."""
    if kind == "distill":
        return 3 * b + 24
    return 2 * b + 24 if teacher else b + 8


def estimate_peak(config, *, kind: str, batch: int, seq_len: int, dtype_bytes: int = 4,
                  teacher_config=None, teacher_dtype_bytes: int | None = None, depth_ppl: bool = False,
                  taylor: bool = False, amp: bool = False, weights: bool = True) -> Estimate:
    """Peak memory of one job on its device.

    kind: "score" (width + BI pass; depth_ppl caches every layer's input; taylor adds a backward),
    "eval" (perplexity, with a teacher also the KL; the speed test: `speed_test_peak`), or
    "distill" (one optimizer step of the student with the frozen teacher; fp32 master weights,
    AdamW, `amp` for a bf16 autocast forward). dtype_bytes: bytes per element of the weights (and
    the compute dtype without amp). weights=False leaves out weights already loaded on the device."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    s = Shape.of(config)
    t = Shape.of(teacher_config) if teacher_config is not None else None
    tb = teacher_dtype_bytes or dtype_bytes
    b = 2 if amp else dtype_bytes  # activations' dtype
    T = seq_len
    tok = T * b  # bytes per element-per-token of one sequence
    parts: dict[str, float] = {}
    per: dict[str, float] = {}  # bytes per sequence of the batch
    if weights:
        parts["weights"] = s.params() * (4 if kind == "distill" else dtype_bytes)
        if t is not None:
            parts["teacher weights"] = t.params() * tb
    if kind == "distill":
        parts["gradients + AdamW"] = 3 * 4 * s.params()
        if amp:  # autocast keeps a bf16 copy of each weight for the step
            parts["bf16 weight copies"] = 2 * s.params()
        per["activations"] = s.layers * (s.layer_activations() * tok + s.attention_probs(T) * b)
        per["logits"] = T * s.vocab * _logit_bytes("distill", b, True)
        if t is not None:  # the teacher's forward under no_grad: one layer at a time
            per["teacher activations"] = t.layer_activations() * tok + t.attention_probs(T) * b
    elif kind == "eval":  # student forward, then the teacher's with the student's logits kept, then the losses
        phases = {"activations": s.layer_inference() * tok + s.attention_probs(T) * b,
                  "logits": T * s.vocab * _logit_bytes("eval", b, t is not None)}
        if t is not None:
            phases["teacher activations"] = T * s.vocab * b + t.layer_inference() * T * tb + t.attention_probs(T) * tb
        top = max(phases, key=phases.__getitem__)
        per[top] = phases[top]
    else:
        per["activations"] = s.layer_inference(hooks=True) * tok + s.attention_probs(T) * b
        if depth_ppl:
            per["cached layer inputs"] = (s.layers + 1) * s.hidden * tok
            parts["logit chunks"] = 3 * 4 * min(LOGITS_CHUNK_ELEMENTS, batch * T * s.vocab)
        if taylor:
            parts["Taylor gradients"] = (4 + b) * s.params()
            per["activations"] = s.layers * (s.layer_activations() * tok + s.attention_probs(T) * b)
    for k, v in per.items():
        parts[k] = v * batch
    return Estimate(kind=kind, batch=batch, seq_len=seq_len, parts=parts, per_sample=sum(per.values()))


def speed_test_peak(config, *, batch: int, prompt_len: int, new_tokens: int, dtype_bytes: int = 4,
                    weights: bool = True) -> Estimate:
    """Peak memory of the throughput test (engine.speed) at one batch size: the prefill's
    (B, prompt, V) logits, the KV cache of prompt + new tokens and one layer's activations."""
    s = Shape.of(config)
    b, P = dtype_bytes, prompt_len + new_tokens
    per = {"logits": prompt_len * s.vocab * b, "KV cache": 2 * s.layers * s.kv_heads * s.head_dim * P * b,
           "activations": prompt_len * s.layer_inference() * b
           + s.attention_probs(prompt_len) * b}
    parts = {"weights": s.params() * dtype_bytes} if weights else {}
    parts.update({k: v * batch for k, v in per.items()})
    return Estimate(kind="speed", batch=batch, seq_len=prompt_len, parts=parts, per_sample=sum(per.values()))


# ---------------------------------------------------------------- the device's free memory


def free_memory(device) -> int | None:
    """Free bytes on `device`: torch.cuda.mem_get_info on CUDA, MemAvailable on a CPU (None if unknown)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------- checks


def largest_batch(est: Estimate, free: float) -> int:
    """The largest batch whose estimate fits in `free` bytes (0 if not even one sequence)."""
    if est.per_sample <= 0:
        return est.batch if est.fixed <= free else 0
    return max(0, int(math.floor((free - est.fixed) / est.per_sample)))


def _largest_seq_len(fits, seq_len: int) -> int:
    """The largest sequence length in [1, seq_len) for which fits(T) holds (0 if none); fits is monotone."""
    lo, hi = 0, seq_len - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


WHAT = {"score": "scoring", "eval": "evaluation", "distill": "distillation"}


def check_job_sizes(model_config, *, kind: str, batch: int, seq_len: int, device="cpu", dtype_bytes: int = 4,
                    teacher_config=None, adjust_batch: bool = False, free: int | None = None,
                    batch_flag: str = "--batch", seq_flag: str = "--seq-len", **options) -> int:
    """Check a job's sizes before it starts; the batch to use.

    Refuses (ResourceError) a seq_len beyond the model's positions, or an estimated peak above the
    device's free memory, naming a batch (or a sequence length) that would fit. With
    adjust_batch=True (scoring and evaluation, whose results do not depend on the batch beyond float
    rounding) a smaller batch that fits is returned instead of refusing. `options` go to
    `estimate_peak` (depth_ppl, taylor, amp, weights, teacher_dtype_bytes). free: bytes available
    (default: measured on `device`)."""
    check_seq_len(model_config, seq_len, seq_flag)
    if teacher_config is not None:
        check_seq_len(teacher_config, seq_len, seq_flag)
    if batch < 1 or seq_len < 1:
        raise ResourceError(f"{batch_flag} and {seq_flag} must be at least 1, got {batch} and {seq_len}")
    free = free_memory(device) if free is None else free
    est = estimate_peak(model_config, kind=kind, batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes,
                        teacher_config=teacher_config, **options)
    if free is None:
        return batch
    log.debug("%s of %d x %d tokens: about %s (%.2f GB free on %s)", WHAT[kind], batch, seq_len, est.describe(),
              free / GB, device)
    if est.total <= free:
        if est.total > WARN_FRACTION * free:
            log.warning("%s of %d x %d tokens needs about %.1f GB of the %.1f GB free on %s", WHAT[kind], batch,
                        seq_len, est.total / GB, free / GB, device)
        return batch
    fit = largest_batch(est, free)
    if fit >= 1 and adjust_batch:
        log.warning("%s: %s %d needs about %.1f GB, %.1f GB are free on %s; using %s %d (same results up to "
                    "float rounding)", WHAT[kind], batch_flag, batch, est.total / GB, free / GB, device, batch_flag,
                    fit)
        return fit
    need = f"{WHAT[kind]} of {batch} x {seq_len} tokens needs about {est.total / GB:.1f} GB ({est.describe()})"
    have = f"{free / GB:.1f} GB are free on {device}"
    if fit >= 1:
        raise ResourceError(f"{need} but {have}; {batch_flag} {fit} would fit"
                            + (" (raise --grad-accum to keep the global batch)" if kind == "distill" else ""))

    def fits(T: int) -> bool:
        return estimate_peak(model_config, kind=kind, batch=1, seq_len=T, dtype_bytes=dtype_bytes,
                             teacher_config=teacher_config, **options).total <= free

    T = _largest_seq_len(fits, seq_len)
    hint = f"{batch_flag} 1 {seq_flag} {T} would fit" if T >= 1 else \
        "not even one short sequence fits: free memory, use a smaller dtype, or another device"
    raise ResourceError(f"{need} but {have}; {hint}")


# ---------------------------------------------------------------- for the commands


def model_config(spec: str):
    """The Hugging Face config of a model spec without loading its weights (None when it cannot be
    read cheaply: the loader then reports the problem)."""
    from transformers import AutoConfig

    from engine.errors import UserError
    from engine.models import resolve_spec

    try:
        path, kw = resolve_spec(spec)
        return AutoConfig.from_pretrained(path, trust_remote_code=False, **kw)
    except (OSError, ValueError, UserError):
        return None


def preflight(spec: str, *, kind: str, batch: int, seq_len: int, dtype: str = "auto", device: str = "auto",
              teacher: str | None = None, **kw) -> int:
    """`check_job_sizes` for model specs, before anything is loaded; the batch to use. The sizes
    are not checked when a config cannot be read without loading (the loader reports that)."""
    from engine.devices import resolve_device, resolve_dtype
    from engine.errors import UserError

    config = model_config(spec)
    tconfig = model_config(teacher) if teacher else None
    if config is None or (teacher and tconfig is None):
        return batch
    dev = resolve_device(device)
    try:
        nbytes = resolve_dtype(dtype, dev).itemsize
    except UserError:  # "source" and other loader-only choices: fp32, the widest a checkpoint holds
        nbytes = 4
    return check_job_sizes(config, kind=kind, batch=batch, seq_len=seq_len, device=dev, dtype_bytes=nbytes,
                           teacher_config=tconfig, **kw)


def check_speed_test(config, sizes: list[int], *, prompt_len: int, new_tokens: int, device="cpu",
                     dtype_bytes: int = 4, free: int | None = None, weights: bool = True) -> None:
    """Refuse throughput batch sizes whose prefill would not fit, naming the largest that would."""
    if not sizes:
        return
    check_seq_len(config, prompt_len + new_tokens, "--prompt-len + --new-tokens")
    free = free_memory(device) if free is None else free
    est = speed_test_peak(config, batch=max(sizes), prompt_len=prompt_len, new_tokens=new_tokens,
                          dtype_bytes=dtype_bytes, weights=weights)
    if free is None or est.total <= free:
        return
    fit = largest_batch(est, free)
    hint = f"--batch-sizes up to {fit} would fit" if fit >= 1 else "use --batch-sizes none"
    raise ResourceError(f"the speed test at batch {max(sizes)} needs about {est.total / GB:.1f} GB "
                        f"({est.describe()}) but {free / GB:.1f} GB are free on {device}; {hint}")


# ---------------------------------------------------------------- retraining methods


def lora_params(config, rank: int) -> int:
    """Trainable values of LoRA adapters of `rank` on every linear layer of the decoder blocks
    (rank x (in + out) each: q, k, v, o, gate, up, down; fused layouts count once: Phi-3's qkv_proj
    and gate_up_proj, GPT-2's c_attn, c_proj, c_fc, c_proj)."""
    s = Shape.of(config)
    D, H, KV, hd, F = s.hidden, s.heads, s.kv_heads, s.head_dim, s.ffn
    if not s.gated:  # GPT-2: c_attn (D -> 3D), attn c_proj (D -> D), c_fc (D -> F), mlp c_proj (F -> D)
        per_layer = (D + 3 * D) + (D + D) + (D + F) + (F + D)
    elif getattr(config, "model_type", "") == "phi3":  # fused qkv_proj and gate_up_proj
        per_layer = (D + (H + 2 * KV) * hd) + (H * hd + D) + (D + 2 * F) + (F + D)
    else:
        per_layer = (D + H * hd) + 2 * (D + KV * hd) + (H * hd + D) + 3 * (D + F)
    return rank * per_layer * s.layers


def training_peak(config, *, method: str, batch: int, seq_len: int, teacher_config=None, lora_rank: int = 16,
                  lora_loss: str = "kd", amp: bool = False, teacher_dtype_bytes: int | None = None) -> Estimate:
    """Peak memory of one training step under a retraining method (engine.training.METHODS):
    kd - estimate_peak's distillation step (student + frozen teacher); cpt and LoRA on ce - no teacher
    and only the student's logits with the cross-entropy's fp32 copies; lora - gradients and AdamW
    moments of the adapters only (plus the adapters), the frozen student's activations as for kd."""
    uses_teacher = method == "kd" or (method == "lora" and lora_loss == "kd")
    est = estimate_peak(config, kind="distill", batch=batch, seq_len=seq_len,
                        teacher_config=teacher_config if uses_teacher else None,
                        teacher_dtype_bytes=teacher_dtype_bytes, amp=amp)
    parts = dict(est.parts)
    per_sample = est.per_sample
    if not uses_teacher:  # student logits (b) + CE's fp32 log-softmax and its gradient (4 + 4)
        s, b = Shape.of(config), 2 if amp else 4
        old = parts.get("logits", 0.0)
        new = batch * seq_len * s.vocab * (b + 8)
        parts["logits"], per_sample = new, per_sample - old / batch + new / batch
    if method == "lora":
        n = lora_params(config, lora_rank)
        parts["gradients + AdamW"] = 3 * 4 * n
        parts["LoRA adapters"] = 4 * n
    return Estimate(kind=f"distill ({method})", batch=batch, seq_len=seq_len, parts=parts, per_sample=per_sample)


def spec_config(spec, sizes=None) -> SimpleNamespace:
    """A config-like object of an ArchSpec (optionally at pruned `sizes`) that Shape.of reads: the
    memory of a student can be estimated before it exists."""
    return SimpleNamespace(
        model_type=spec.model_type, vocab_size=spec.vocab_size,
        hidden_size=sizes.hidden if sizes else spec.hidden_size,
        num_attention_heads=sizes.heads if sizes else spec.n_heads,
        num_key_value_heads=sizes.kv_heads if sizes else spec.n_kv_heads,
        head_dim=sizes.head_dim if sizes else spec.head_dim,
        intermediate_size=sizes.ffn if sizes else spec.intermediate_size,
        num_hidden_layers=sizes.layers if sizes else spec.n_layers, tie_word_embeddings=spec.tied,
        n_positions=spec.n_positions)
