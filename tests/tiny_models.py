"""Tiny random models of every supported family, built in code (no downloads), plus a tiny tokenizer.

Sizes are deliberately awkward (intermediate 37, head_dim != hidden / heads, GQA 6:2) so that
off-by-one and layout bugs show up.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from engine.arch import get_adapter
from engine.importance import Scores
from engine.models import fingerprint

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"]

# mixtures of experts (engine.arch.moe; not in the adapter registry yet)
MOE_FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pruning removes heads, neurons and layers. "
    "Distillation teaches the small model from the large one. 0123456789 !?.,;:'\"()[]{}-+=*/\\ "
    "Paris is the capital of France. Water boils at one hundred degrees. "
)

VOCAB = 300


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with BOS/EOS, vocab <= 300."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    return tok


_CONFIGS: dict[str, dict] = {
    # LlamaConfig needs hidden % heads == 0; head_dim 12 != 48 / 6 = 8 on purpose; GQA 6:2
    "llama": dict(hidden_size=48, intermediate_size=37, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=12, num_hidden_layers=4, tie_word_embeddings=True),
    # hidden not a multiple of heads (Mistral accepts it with explicit head_dim); GQA 6:3
    "mistral": dict(hidden_size=40, intermediate_size=29, num_attention_heads=6, num_key_value_heads=3,
                    head_dim=8, num_hidden_layers=3, tie_word_embeddings=False),
    # biases on q/k/v; GQA 4:2
    "qwen2": dict(hidden_size=36, intermediate_size=31, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=10, num_hidden_layers=3, tie_word_embeddings=True),
    # q_norm / k_norm; GQA 6:2
    "qwen3": dict(hidden_size=44, intermediate_size=33, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=8, num_hidden_layers=3, tie_word_embeddings=False),
    # fused c_attn Conv1D, LayerNorm with bias, learned positions; head_dim = 48 / 4 = 12
    "gpt2": dict(n_embd=48, n_inner=37, n_head=4, n_layer=3, n_positions=256,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # four norms per layer, scaled embedding; soft-caps small enough to bite; sliding / full layers
    # alternating with a window shorter than the test sequences; GQA 4:2, head_dim 10 != 48 / 4
    "gemma2": dict(hidden_size=48, intermediate_size=35, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=10, num_hidden_layers=4, query_pre_attn_scalar=10, sliding_window=4,
                   attn_logit_softcapping=3.0, final_logit_softcapping=2.0, tie_word_embeddings=True),
    # q/k norms over head_dim, per-kind rotary bases, one global layer among sliding ones; GQA 6:2
    "gemma3_text": dict(hidden_size=42, intermediate_size=41, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=8, num_hidden_layers=4, query_pre_attn_scalar=8, sliding_window=4,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention"], tie_word_embeddings=True),
    # fused qkv_proj and gate_up_proj, half the head rotated; GQA 6:2, hidden 40 != 6 x 8
    "phi3": dict(hidden_size=40, intermediate_size=27, num_attention_heads=6, num_key_value_heads=2,
                 head_dim=8, num_hidden_layers=3, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # norms after each sublayer only, q/k norms over the whole projection; MHA (K/V pruned with heads)
    "olmo2": dict(hidden_size=36, intermediate_size=31, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=10, num_hidden_layers=3, tie_word_embeddings=False),
    # Llama modules with the four multipliers away from 1; GQA 4:2
    "granite": dict(hidden_size=44, intermediate_size=39, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=12, num_hidden_layers=3, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.1, logits_scaling=4.0, tie_word_embeddings=True),
    # 6 experts of 13 neurons, top-2; layer 1 dense (intermediate 37): a mixed model
    "qwen3_moe": dict(hidden_size=40, intermediate_size=37, moe_intermediate_size=13, num_experts=6,
                      num_experts_per_tok=2, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                      head_dim=10, num_hidden_layers=3, norm_topk_prob=True, tie_word_embeddings=False),
    # 5 experts of 11 neurons (Mixtral's intermediate_size is the expert width), top-2
    "mixtral": dict(hidden_size=36, intermediate_size=11, num_local_experts=5, num_experts_per_tok=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                    tie_word_embeddings=False),
    # 6 experts of 9 neurons, top-3 without renormalising the top-k weights; MHA
    "olmoe": dict(hidden_size=32, intermediate_size=9, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                  num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, tie_word_embeddings=False),
}


def tiny_config(family: str, **overrides):
    kw = dict(_CONFIGS[family])
    kw.update(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1)
    if family != "gpt2":
        kw.update(max_position_embeddings=256)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 model of this family, in eval mode. Norm weights are randomised too, so that
    a bug that permutes or drops norm channels changes the output."""
    torch.manual_seed(seed)
    # MoE: the per-expert loop ("eager"): torch's grouped matmul wants 16-byte strides, which awkward widths lack
    kw = dict(experts_implementation="eager") if family in MOE_FAMILIES else {}
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32,
                                             attn_implementation="eager" if family == "gemma2" else "sdpa", **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights / biases: away from the trivial 1 / 0
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def save_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer as a Hugging Face folder (what a user would point at)."""
    path = Path(path)
    tiny_model(family, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_ids(n: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def fake_scores(model, seed: int = 0, **extra: torch.Tensor) -> Scores:
    """Random importance of the right shapes, with the model's arch and fingerprint; the weight-aware
    criteria's tensors rank as the activation ones (a test sets one ranking, whatever the criterion)."""
    s = get_adapter(model).spec()
    g = torch.Generator().manual_seed(seed)
    t = {"heads": torch.rand(s.n_layers, s.n_heads, generator=g),
         "neurons": torch.rand(s.n_layers, s.intermediate_size, generator=g),
         "channels": torch.rand(s.hidden_size, generator=g), "bi": torch.rand(s.n_layers, generator=g)}
    t.update(extra)
    for axis in ("heads", "neurons", "channels", "expert_neurons"):
        if axis in t:
            t.setdefault(f"{axis}:weighted", t[axis].clone())
            if axis in ("neurons", "expert_neurons"):
                t.setdefault(f"{axis}:product", t[axis].clone())
    return Scores(t, {"arch": s.to_dict(), "fingerprint": fingerprint(model), "model": "tiny", "data": "test"})
