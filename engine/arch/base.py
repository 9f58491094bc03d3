"""The adapter contract: where each prunable part of a Hugging Face causal LM lives.

An adapter never re-implements the model; it hands out the model's own modules under
HF's Llama names, and carries layout facts (fused qkv, Conv1D weights, biases) as data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # torch is imported lazily: the dashboard's plan arithmetic needs no torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer. Unused slots are None (e.g. `gate` for GPT-2)."""

    block: nn.Module  # the whole decoder layer
    attn: nn.Module
    mlp: nn.Module
    attn_norm: nn.Module | None  # input_layernorm / ln_1 (None: OLMo2 has no norm before attention)
    mlp_norm: nn.Module | None  # post_attention_layernorm / ln_2 / Gemma's pre_feedforward_layernorm
    o: nn.Module  # o_proj / attn.c_proj: its *input* is the per-head context
    up: nn.Module  # up_proj / c_fc / Phi-3's fused gate_up_proj (gate rows first, then up rows)
    down: nn.Module  # down_proj / mlp.c_proj: its *input* is the neuron activation
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    qkv: nn.Module | None = None  # fused q|k|v projection (GPT-2's c_attn)
    gate: nn.Module | None = None
    q_norm: nn.Module | None = None  # RMSNorm over head_dim (Qwen3, Gemma3) or the whole projection (OLMo2)
    k_norm: nn.Module | None = None
    attn_post_norm: nn.Module | None = None  # norm of the attention output before the residual add (Gemma, OLMo2)
    mlp_post_norm: nn.Module | None = None  # norm of the MLP output before the residual add


@dataclass(frozen=True)
class ArchSpec:
    """Plain-data shape of a model: enough to count parameters and FLOPs without building it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    tied: bool
    gated_mlp: bool
    qkv_bias: bool  # biases on q/k/v (Qwen2, GPT-2)
    o_bias: bool
    mlp_bias: bool
    norm_bias: bool  # LayerNorm with bias (GPT-2)
    qk_norm: bool  # q/k RMSNorm (Qwen3, Gemma3: over head_dim; OLMo2: see qk_norm_full)
    n_positions: int  # rows of a learned position embedding, 0 if none
    # Fields below have defaults and are written only when they differ from them, so plans and
    # scores saved before they existed still match the models they were made from.
    norms_per_layer: int = 2  # hidden-size norms per decoder layer (Gemma: 4)
    qk_norm_full: bool = False  # q/k norms span the whole projection, H x head_dim (OLMo2)
    # Mixtures of experts (engine.arch.moe): intermediate_size is then each expert's width (the MLP axis)
    n_experts: int = 0  # experts per sparse layer (0: a dense model)
    experts_per_tok: int = 0  # the router's top-k
    dense_ffn: int = 0  # MLP width of the dense layers of a mixed model (never pruned)
    dense_layers: tuple[int, ...] = ()  # source indices of those dense layers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        for name in _OPTIONAL_SPEC_FIELDS:
            if d[name] == self.__dataclass_fields__[name].default or d[name] == []:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ArchSpec:
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d or k not in _OPTIONAL_SPEC_FIELDS}
        if "dense_layers" in kw:
            kw["dense_layers"] = tuple(kw["dense_layers"])
        return cls(**kw)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


_OPTIONAL_SPEC_FIELDS = ("norms_per_layer", "qk_norm_full", "n_experts", "experts_per_tok", "dense_ffn",
                         "dense_layers")


class ArchAdapter:
    """Base class: subclasses set the class attributes and implement the accessors."""

    model_type: ClassVar[str]
    conv1d: ClassVar[bool] = False  # weights stored (in, out) as in transformers' Conv1D
    fused_qkv: ClassVar[bool] = False
    gated_mlp: ClassVar[bool] = True
    explicit_head_dim: ClassVar[bool] = True  # config can carry head_dim != hidden / heads
    # config classes that reject hidden_size % num_attention_heads != 0 even with head_dim set
    hidden_multiple_of_heads: ClassVar[bool] = False
    fused_gate_up: ClassVar[bool] = False  # `up` holds gate rows then up rows (Phi-3's gate_up_proj)
    # The embedding output is multiplied by sqrt(config.hidden_size) (Gemma), so pruning the hidden
    # size rescales the residual stream; norms multiply by (norm_weight_offset + weight).
    scaled_embedding: ClassVar[bool] = False
    qk_norm_full: ClassVar[bool] = False  # q_norm / k_norm span the whole q / k projection (OLMo2)
    layout: ClassVar[str] = ""  # what the engine handles for this family (the README's families table)
    norm_weight_offset: ClassVar[float] = 0.0

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- sizes -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.hidden_size // self.n_heads

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def tied(self) -> bool:
        out = self.lm_head.weight
        return out is self.embed_tokens.weight or out.data_ptr() == self.embed_tokens.weight.data_ptr()

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    # -- modules -----------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        raise NotImplementedError

    layers_attr: ClassVar[str] = "layers"

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base_model, self.layers_attr)

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def position_embeddings(self) -> nn.Embedding | None:
        return None

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def layer(self, i: int) -> LayerParts:
        raise NotImplementedError

    def all_layers(self) -> Iterator[LayerParts]:
        for i in range(self.n_layers):
            yield self.layer(i)

    def norms(self, i: int) -> list[nn.Module]:
        """Every norm of layer i whose weight spans the hidden dimension, in the order they run."""
        p = self.layer(i)
        return [n for n in (p.attn_norm, p.attn_post_norm, p.mlp_norm, p.mlp_post_norm) if n is not None]

    @property
    def embedding_multiplier(self) -> float:
        """Factor the base model applies to the embedding module's output (Granite); 1 otherwise."""
        return 1.0

    @property
    def residual_multiplier(self) -> float:
        """Factor on each sublayer's output before the residual add (Granite); 1 otherwise."""
        return 1.0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed hidden states, as the model's forward makes them (lm_head, then
        the family's logit scaling or soft-capping)."""
        return self.lm_head(hidden)

    def spec(self) -> ArchSpec:
        """This model's shape as plain data (saved with scores and plans)."""
        p = self.layer(0)
        has_bias = lambda m: m is not None and getattr(m, "bias", None) is not None  # noqa: E731
        pos = self.position_embeddings
        return ArchSpec(
            model_type=self.model_type, vocab_size=int(self.embed_tokens.weight.shape[0]),
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, n_layers=self.n_layers, tied=self.tied,
            gated_mlp=self.gated_mlp, qkv_bias=has_bias(p.qkv or p.q), o_bias=has_bias(p.o),
            mlp_bias=has_bias(p.up), norm_bias=has_bias(self.norms(0)[0]), qk_norm=p.q_norm is not None,
            n_positions=int(pos.weight.shape[0]) if pos is not None else 0, norms_per_layer=len(self.norms(0)),
            qk_norm_full=p.q_norm is not None and self.qk_norm_full,
        )

    # -- config ------------------------------------------------------------
    def config_updates(self, hidden: int, ffn: int, heads: int, kv_heads: int, layers: int,
                       head_dim: int) -> dict:
        """Config fields that describe a model with these shapes (used by export)."""
        raise NotImplementedError

    # -- running a subset of layers -----------------------------------------
    @contextmanager
    def only_layers(self, indices: Sequence[int]) -> Iterator[None]:
        """Temporarily run the model with just these layers, in this order.

        Swaps the model's own layer list, so the HF forward (masks, rotary, final norm)
        runs unchanged; use with `use_cache=False`.
        """
        from torch import nn

        indices = list(indices)
        original = self.layers
        # Families with per-layer attention kinds (Qwen2's sliding window) index config.layer_types by
        # position in the list, so the types must follow the layers.
        types = getattr(self.config, "layer_types", None)
        setattr(self.base_model, self.layers_attr, nn.ModuleList([original[i] for i in indices]))
        if isinstance(types, list):
            self.config.layer_types = [types[i] for i in indices]
        try:
            yield
        finally:
            setattr(self.base_model, self.layers_attr, original)
            if isinstance(types, list):
                self.config.layer_types = types


def hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden_states argument of a decoder layer call, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_from_output(output) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is it."""
    return output[0] if isinstance(output, tuple) else output
