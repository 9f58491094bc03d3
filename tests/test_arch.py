"""Conformance suite every adapter passes: sizes, part shapes, tied flags, and a forward pass whose
hooks show the adapter's parts are the ones the model really runs, in the order it runs them."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, random_ids, tiny_model

from engine.arch import UnsupportedArchitecture, get_adapter, hidden_from_args, hidden_from_output


def _weight_io(module, conv1d: bool) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])


@pytest.fixture(params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_sizes_match_config(model):
    a = get_adapter(model)
    cfg = model.config
    assert a.model_type == cfg.model_type
    assert a.n_layers == cfg.num_hidden_layers
    assert a.n_heads == cfg.num_attention_heads
    assert a.hidden_size == cfg.hidden_size
    assert a.n_heads % a.n_kv_heads == 0
    assert a.tied == bool(getattr(cfg, "tie_word_embeddings", True))
    if cfg.model_type != "gpt2":
        assert a.head_dim == cfg.head_dim and a.n_kv_heads == cfg.num_key_value_heads


def test_part_shapes(model):
    a = get_adapter(model)
    D, F, H, KV, hd = a.hidden_size, a.intermediate_size, a.n_heads, a.n_kv_heads, a.head_dim
    assert a.embed_tokens.weight.shape[1] == D
    assert a.lm_head.weight.shape[1] == D
    assert a.final_norm.weight.shape == (D,)
    for parts in a.all_layers():
        if a.fused_qkv:
            assert _weight_io(parts.qkv, a.conv1d) == (D, (H + 2 * KV) * hd)
        else:
            assert _weight_io(parts.q, a.conv1d) == (D, H * hd)
            assert _weight_io(parts.k, a.conv1d) == (D, KV * hd)
            assert _weight_io(parts.v, a.conv1d) == (D, KV * hd)
        assert _weight_io(parts.o, a.conv1d) == (H * hd, D)
        assert _weight_io(parts.up, a.conv1d) == (D, 2 * F if a.fused_gate_up else F)
        assert _weight_io(parts.down, a.conv1d) == (F, D)
        if a.gated_mlp and not a.fused_gate_up:
            assert _weight_io(parts.gate, a.conv1d) == (D, F)
        else:
            assert parts.gate is None
        for norm in a.norms(0):
            assert norm.weight.shape == (D,)
        assert len(a.norms(0)) == (4 if model.config.model_type.startswith("gemma") else 2)
        if model.config.model_type in ("qwen3", "gemma3_text"):
            assert parts.q_norm.weight.shape == (hd,) and parts.k_norm.weight.shape == (hd,)
        if model.config.model_type == "olmo2":
            assert parts.q_norm.weight.shape == (H * hd,) and parts.k_norm.weight.shape == (KV * hd,)
        if model.config.model_type == "qwen2":
            assert parts.q.bias is not None and parts.k.bias is not None and parts.v.bias is not None


def test_forward_through_parts_reproduces_logits(model):
    """Hooks on the adapter's parts: each layer's output = input + o_proj output + down_proj output
    (each through its output norm, if any, times the residual multiplier), the norms feed the
    projections, and adapter.logits(final_norm(last hidden)) gives the model's logits."""
    a = get_adapter(model)
    m = a.residual_multiplier
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, inputs=False):
        def hook(mod, args, kwargs, out):
            seen[name] = hidden_from_args(args, kwargs) if inputs else hidden_from_output(out)
        return hook

    for i, p in enumerate(a.all_layers()):
        handles += [
            p.block.register_forward_hook(keep(f"{i}.in", inputs=True), with_kwargs=True),
            p.block.register_forward_hook(keep(f"{i}.out"), with_kwargs=True),
            p.o.register_forward_hook(keep(f"{i}.o"), with_kwargs=True),
            p.down.register_forward_hook(keep(f"{i}.down"), with_kwargs=True),
            (p.qkv or p.q).register_forward_hook(keep(f"{i}.q_in", inputs=True), with_kwargs=True),
            p.up.register_forward_hook(keep(f"{i}.up_in", inputs=True), with_kwargs=True),
        ]
        for name, norm in (("n1", p.attn_norm), ("n2", p.mlp_norm), ("post1", p.attn_post_norm),
                           ("post2", p.mlp_post_norm)):
            if norm is not None:
                handles.append(norm.register_forward_hook(keep(f"{i}.{name}"), with_kwargs=True))
    ids = random_ids()
    with torch.no_grad():
        logits = model(ids).logits
        for h in handles:
            h.remove()
        emb = a.embed_tokens(ids) * a.embedding_multiplier
        if a.position_embeddings is not None:
            emb = emb + a.position_embeddings(torch.arange(ids.shape[1]))
        torch.testing.assert_close(seen["0.in"], emb)
        for i in range(a.n_layers):
            p = a.layer(i)
            attn_out = seen[f"{i}.post1"] if p.attn_post_norm is not None else seen[f"{i}.o"]
            mlp_out = seen[f"{i}.post2"] if p.mlp_post_norm is not None else seen[f"{i}.down"]
            mid = seen[f"{i}.in"] + m * attn_out
            torch.testing.assert_close(seen[f"{i}.q_in"], seen[f"{i}.n1"] if p.attn_norm is not None else seen[f"{i}.in"])
            torch.testing.assert_close(seen[f"{i}.up_in"], seen[f"{i}.n2"] if p.mlp_norm is not None else mid)
            torch.testing.assert_close(seen[f"{i}.out"], mid + m * mlp_out)
            if i:
                torch.testing.assert_close(seen[f"{i}.in"], seen[f"{i - 1}.out"])
        manual = a.logits(a.final_norm(seen[f"{a.n_layers - 1}.out"]))
    torch.testing.assert_close(manual, logits)


def test_only_layers(model):
    a = get_adapter(model)
    ids = random_ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        with a.only_layers(range(a.n_layers)):
            same = model(ids, use_cache=False).logits
        with a.only_layers([0, 2]):
            skipped = model(ids, use_cache=False).logits
        assert a.n_layers == model.config.num_hidden_layers  # restored
        again = model(ids, use_cache=False).logits
    torch.testing.assert_close(same, full)
    torch.testing.assert_close(again, full)
    assert not torch.allclose(skipped, full)


def test_unsupported_model_type_names_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                               vocab_size=50, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedArchitecture, match="'opt' is not supported; supported: gemma2, gemma3_text, gpt2, "
                       "granite, llama, mistral, mixtral, olmo2, olmoe, phi3, qwen2, qwen3, qwen3_moe$"):
        get_adapter(AutoModelForCausalLM.from_config(cfg))


def test_spec_counts_match_model(model):
    from engine.models import count_parameters

    s = get_adapter(model).spec()
    assert s.n_layers == model.config.num_hidden_layers and s.vocab_size == model.config.vocab_size
    assert s.qkv_bias == (model.config.model_type in ("qwen2", "gpt2"))
    assert s.qk_norm == (model.config.model_type in ("qwen3", "gemma3_text", "olmo2"))
    assert s.qk_norm_full == (model.config.model_type == "olmo2")
    assert s.norms_per_layer == (4 if model.config.model_type.startswith("gemma") else 2)
    assert s.norm_bias == (model.config.model_type == "gpt2")
    assert count_parameters(model) > 0


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3_text"])
def test_only_layers_keeps_per_layer_attention_kinds(family):
    """Qwen2 and Gemma pick each layer's mask (and Gemma 3 its rotary base) from config.layer_types by
    list position: with layer 0 removed, layer 1 must still get its own (sliding-window) mask."""
    import copy

    from tiny_models import tiny_model

    types = ["full_attention", "sliding_attention", "full_attention"]
    kw = dict(use_sliding_window=True, max_window_layers=1) if family == "qwen2" else {}
    m = tiny_model(family, sliding_window=4, layer_types=types, num_hidden_layers=3, **kw)
    a = get_adapter(m)
    ids = random_ids(t=24)
    ref = copy.deepcopy(m)  # the same model physically without layer 0
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[1], ref.model.layers[2]])
    ref.config.layer_types, ref.config.num_hidden_layers = types[1:], 2
    with torch.no_grad():
        with a.only_layers([1, 2]):
            got = m(ids, use_cache=False).logits
        want = ref(ids, use_cache=False).logits
        full_mask = copy.deepcopy(ref)
        full_mask.config.layer_types = ["full_attention", "full_attention"]
        wrong = full_mask(ids, use_cache=False).logits
    assert m.config.layer_types == types
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, wrong)  # the sliding window really matters at this length


_KEPT_FIELDS = {
    "gemma2": ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window"),
    "gemma3_text": ("query_pre_attn_scalar", "sliding_window", "rope_parameters"),
    "phi3": ("rope_parameters",),
    "granite": ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"),
}


@pytest.mark.parametrize("family", sorted(_KEPT_FIELDS))
def test_pruned_config_keeps_family_settings(family, tmp_path):
    """Settings that do not depend on pruned sizes (soft-caps, multipliers, rotary factors) survive
    pruning on every axis and a save / reload; head_dim stays explicit; layer_types follow the layers."""
    from dataclasses import replace

    from tiny_models import fake_scores
    from transformers import AutoModelForCausalLM

    from engine.plan import make_plan
    from engine.prune import apply_plan
    from engine.targets import Targets, valid_values

    model = tiny_model(family)
    spec = get_adapter(model).spec()
    heads = valid_values(spec)["heads"][0]
    hidden = valid_values(spec, Targets(heads=heads))["hidden"][-2]
    plan = make_plan(fake_scores(model), Targets(hidden=hidden, heads=heads, ffn=spec.intermediate_size - 3,
                                                 layers=spec.n_layers - 1))
    pruned = apply_plan(model, replace(plan, fingerprint=""))
    pruned.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).config
    for cfg in (pruned.config, back):
        for key in _KEPT_FIELDS[family]:
            assert getattr(cfg, key) == getattr(model.config, key), key
        assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (hidden, heads, spec.head_dim)
        if family.startswith("gemma"):
            assert cfg.layer_types == [model.config.layer_types[i] for i in plan.kept_layers]
    if family == "phi3":
        assert back.rope_parameters["partial_rotary_factor"] == 0.5


def test_readme_lists_the_registry():
    """The README's families table is the one the registry generates, and every registered family
    has a tiny model in the conformance suites."""
    from pathlib import Path

    from tiny_models import FAMILIES

    from engine.arch import supported_model_types
    from engine.arch.registry import families_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert families_table() in readme, "README's 'Supported families' table is stale: paste families_table()"
    assert sorted(FAMILIES) == supported_model_types()
    for line in families_table().splitlines()[2:]:
        assert "?" not in line.split("|")[2] and line.split("|")[4].strip(), line  # HF class and layout known


def test_unsupported_family_fails_at_load(tmp_path):
    """A checkpoint of an unsupported type is refused by engine.models.load, naming the supported ones."""
    from tiny_models import tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.models import load

    cfg = AutoConfig.for_model("opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                               vocab_size=300, word_embed_proj_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="'opt' is not supported; supported: gemma2, .*olmo2, .*phi3"):
        load(str(tmp_path), device="cpu")


def test_phi3_longrope_limits_are_reported_as_plan_errors():
    """LongRoPE Phi-3 configs check their rotary factors against hidden // heads: shapes that change it
    are refused with the config's reason; the other axes prune."""
    from tiny_models import fake_scores

    from engine.errors import PlanError
    from engine.plan import make_plan
    from engine.prune import apply_plan
    from engine.targets import Targets

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "short_factor": [1.0] * 2,
            "long_factor": [1.0] * 2, "original_max_position_embeddings": 64}
    m = tiny_model("phi3", hidden_size=48, rope_parameters=rope)
    pruned = apply_plan(m, make_plan(fake_scores(m), Targets(ffn=20, layers=2)))
    assert pruned.config.rope_parameters["short_factor"] == [1.0] * 2
    with pytest.raises(PlanError, match="phi3 config class rejects the pruned shapes: .*short_factor"):
        apply_plan(m, make_plan(fake_scores(m), Targets(hidden=40)))
