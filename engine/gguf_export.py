"""Write an exported model as a GGUF file (llama.cpp, Ollama, LM Studio) and check it loads back.

The writer is the PyPI `gguf` package's GGUFWriter (maintained with llama.cpp), with llama.cpp's
tensor names (`gguf.get_tensor_name_map`) and its conventions: the q/k rows of llama-style models
permuted for llama.cpp's RoPE layout, 1-D tensors (norms, biases) kept in f32, no `output.weight`
when the embeddings are tied. Widths come from the weights, so pruned shapes (hidden 516, head_dim
decoupled from hidden / heads) are written as they are.

Families: llama and mistral (llama.cpp architecture `llama`; mistral reloads as llama, so it needs
hidden a multiple of the heads and no sliding window shorter than the context); qwen2 when head_dim
equals hidden / heads and qwen3 when head_dim is 128 (transformers' GGUF reader ignores the file's
head_dim for them and uses those values, so another head_dim would reload with the wrong shapes;
it is refused, not written). Others (gpt2)
are refused with the list of what is handled. Tokenizers: byte-level BPE (GPT-2 style, `gpt2`) and
byte-fallback BPE (sentencepiece style, `llama`).

Types: f32; f16 (2-D weights); q8_0 (2-D weights whose rows are a multiple of 32, the block size;
other weights f16, as llama.cpp falls back). `verify_gguf` reloads the file with transformers'
`gguf_file=` loader (the path prunescope uses for the built-in model) and compares logits with the
safetensors model.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine.errors import ResourceError, UnsupportedArchitecture, UserError
from engine.fileio import TMP_PREFIX, atomic_write_text, is_disk_full, read_json, write_json
from engine.roundtrip import _check_ids, replace_section

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
RESULT_FILE = "prunescope_gguf.json"
CARD_HEADING = "## GGUF"
# max |logit diff| / max |logit| the reload must stay within: f32 is exact up to summation order;
# f16 rounds each weight to 11 significant bits (relative 2^-11 = 4.9e-4), which grows through the layers.
TOLERANCE = {"f32": 1e-4, "f16": 2e-2}
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTE_QK = {"llama", "mistral"}  # HF rotate-half layout -> llama.cpp's interleaved RoPE pairs


class GGUFError(UserError, ValueError):
    """A model, tokenizer or option the GGUF writer cannot handle; the message says what can."""


def check_supported(model: torch.nn.Module) -> str:
    """The llama.cpp architecture name for `model`, or UnsupportedArchitecture saying why not."""
    cfg = model.config
    mt = cfg.model_type
    if mt not in _ARCH:
        raise UnsupportedArchitecture(f"GGUF export handles {', '.join(sorted(_ARCH))}; this model is {mt!r} "
                                      "(export the safetensors folder and convert it with llama.cpp's own script)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if mt in ("qwen2", "qwen3") and head_dim != _reloaded_head_dim(cfg):
        raise UnsupportedArchitecture(
            f"GGUF export of {mt} needs head_dim {_reloaded_head_dim(cfg)} (this model has {head_dim}): "
            f"transformers' GGUF reader does not read the {mt} head_dim from the file and "
            f"{'derives it as hidden / heads' if mt == 'qwen2' else 'uses the config default'}; llama and "
            "mistral keep a decoupled head_dim")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        if mt in ("llama", "mistral"):
            raise UnsupportedArchitecture(f"GGUF export of {mt} with attention/MLP biases is not handled "
                                          "(transformers' GGUF reader has no field for them)")
    if mt == "mistral" and cfg.hidden_size % cfg.num_attention_heads:
        raise UnsupportedArchitecture(f"GGUF export of mistral reloads it as llama, whose config needs hidden a "
                                      f"multiple of the heads ({cfg.hidden_size} % {cfg.num_attention_heads} != 0)")
    window = getattr(cfg, "sliding_window", None)
    if mt == "mistral" and window is not None and window < cfg.max_position_embeddings:
        raise UnsupportedArchitecture(f"GGUF export of mistral runs it as llama, which has no sliding window; "
                                      f"this model's window is {window} < its context {cfg.max_position_embeddings}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UnsupportedArchitecture(f"GGUF export handles plain RoPE; this model uses {rope['rope_type']!r} "
                                      "scaling, which transformers' GGUF reader does not restore")
    return _ARCH[mt]


def _reloaded_head_dim(cfg) -> int:
    """The head_dim transformers' GGUF reader gives a qwen2 / qwen3 model (it ignores the file's)."""

    if cfg.model_type == "qwen3":
        return AutoConfig.for_model("qwen3").head_dim
    return cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.LlamaModel.permute), inverse of transformers' reader."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(arr: np.ndarray, gguf_type: str):
    """(numpy array to write, GGML type) for one tensor."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or gguf_type == "f32":
        return arr.astype(np.float32), Q.F32
    if gguf_type == "q8_0" and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(arr.astype(np.float32), Q.Q8_0), Q.Q8_0
    return arr.astype(np.float16), Q.F16


def _tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """Token list, types, merges and special ids in llama.cpp's form, from a fast tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(f"GGUF export handles BPE tokenizers (byte-level or byte-fallback); this one is "
                        f"{model.get('type')!r}")
    byte_fallback = bool(model.get("byte_fallback"))
    n_tok = len(tokenizer)
    if n_tok > vocab_size:
        raise GGUFError(f"the tokenizer has {n_tok} tokens but the model's embedding only {vocab_size} rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    special = set(tokenizer.all_special_ids)
    T = gguf.TokenType
    types = []
    for i, t in enumerate(tokens):
        if i in special:
            types.append(T.CONTROL)
        elif byte_fallback and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    tokens += [f"[PAD{i}]" for i in range(n_tok, vocab_size)]  # embedding rows beyond the tokenizer
    types += [T.UNUSED] * (vocab_size - n_tok)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "llama" if byte_fallback else "gpt2", "tokens": tokens, "types": types, "merges": merges,
            "scores": [-float(i) for i in range(vocab_size)] if byte_fallback else None}


def write_gguf(model: torch.nn.Module, tokenizer, path: str | Path, gguf_type: str = "f16",
               name: str = "") -> dict:
    """Write `model` (+ tokenizer) as one GGUF file at `path` (atomically); returns what was written."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"unknown GGUF type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
    arch = check_supported(model)
    cfg = model.config
    path = Path(path)
    n_layers, n_head, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    vocab = model.get_input_embeddings().weight.shape[0]
    tok = _tokenizer_fields(tokenizer, vocab)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    # a name of exactly "mistral" makes transformers' reader look for a gguf-py arch "mistral" that the
    # current gguf package no longer has; llama.cpp runs mistral as llama, and so does the reload
    gname = name or cfg.model_type
    if gname.lower() == "mistral":
        gname = "mistral model"

    counts: dict[str, int] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        w = gguf.GGUFWriter(path=tmp, arch=arch)
        w.add_name(gname)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(vocab)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        _add_tokenizer(w, tok, tokenizer, arch)
        for gg_name, t in _tensors(model, tmap, n_head, n_kv, cfg.model_type):
            data, qtype = _tensor_type(t, gguf_type)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            w.add_tensor(gg_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise ResourceError(f"no space left to write {path}; free some space and retry") from e
        raise
    return {"path": str(path), "type": gguf_type, "arch": arch, "bytes": path.stat().st_size,
            "tensor_types": counts, "tokenizer": tok["model"]}


def _tensors(model: torch.nn.Module, tmap, n_head: int, n_kv: int, model_type: str):
    """(gguf name, fp32 numpy array) for every weight, tied lm_head left out."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for hf_name, p in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue
        base, _, suffix = hf_name.rpartition(".")
        new = tmap.get_name(base)
        if new is None:
            raise GGUFError(f"no GGUF name for tensor {hf_name!r} of this {model_type} model")
        arr = p.detach().float().cpu().numpy()
        if model_type in _PERMUTE_QK and base.endswith(("q_proj", "k_proj")):
            arr = _permute(arr, n_head if base.endswith("q_proj") else n_kv)
        yield f"{new}.{suffix}", arr


def _add_tokenizer(w, tok: dict, tokenizer, arch: str) -> None:
    """Tokenizer metadata: model, pre-tokenizer, tokens, types, scores, merges, special ids."""
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok["scores"] is not None:
        w.add_token_scores(tok["scores"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))



# ---------------------------------------------------------------- reload and compare


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file through transformers' `gguf_file=` loader."""

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@torch.inference_mode()
def verify_gguf(path: str | Path, model: torch.nn.Module, tokenizer, gguf_type: str) -> dict:
    """Reload `path` with transformers and compare its logits and tokenizer with `model` (fp32, CPU)."""

    back, back_tok = load_gguf(path)
    ids = _check_ids(model.get_input_embeddings().weight.shape[0])
    ref = model(ids.to(next(model.parameters()).device)).logits.float().cpu()
    got = back(ids).logits.float()
    diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
    scale = ref.abs().max().item()
    rel = diff / max(scale, 1e-12)
    enc_ref = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    enc_got = back_tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    tol = TOLERANCE.get(gguf_type)
    r = {"max_abs_diff": diff, "logit_scale": scale, "rel_diff": rel, "tolerance": tol,
         "positions": ids.numel(), "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())
         if got.shape == ref.shape else 0.0, "tokenizer_match": enc_ref == enc_got,
         "config": {k: getattr(back.config, k, None) for k in ("model_type", "hidden_size", "head_dim",
                                                             "intermediate_size", "num_hidden_layers",
                                                             "tie_word_embeddings")}}
    r["passed"] = bool(r["tokenizer_match"] and (rel <= tol if tol is not None else np.isfinite(diff)))
    if not r["passed"]:
        r["reason"] = ("the tokenizer encodes differently after the reload" if not r["tokenizer_match"] else
                       f"logits differ by {rel:.3g} x max |logit| (tolerance {tol})")
    return r


def export_gguf(folder: str | Path, gguf_type: str = "f16", out: str | Path | None = None,
                verify: bool = True) -> dict:
    """Write the GGUF file of an exported folder (default `<folder>-<type>.gguf` beside it), reload and
    compare it; the result is added to `prunescope_gguf.json` and the model card. Raises GGUFError
    (after recording) when the reload check fails."""

    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise GGUFError(f"{folder} holds no config.json; give an exported model folder")
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"unknown GGUF type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_supported(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    path = Path(out) if out else folder.parent / f"{folder.name}-{gguf_type}.gguf"
    info = write_gguf(model, tokenizer, path, gguf_type, name=folder.name)
    info["safetensors_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if verify:
        info["check"] = verify_gguf(path, model, tokenizer, gguf_type)
    log.info("wrote %s (%s, %.1f MB)%s", path, gguf_type, info["bytes"] / 1e6,
             f", reload max |diff| {info['check']['max_abs_diff']:.3g}" if verify else "")
    record(folder, info)
    if verify and not info["check"]["passed"]:
        raise GGUFError(f"{path} was written but failed its reload check: {info['check']['reason']}")
    return info


def read_results(folder: str | Path) -> list[dict]:
    """The GGUF files written for an export folder (newest per type), as recorded."""
    return list(((read_json(Path(folder) / RESULT_FILE) or {}).get("files") or {}).values())


def record(folder: Path, info: dict) -> None:
    """Add `info` to the folder's GGUF record and rewrite the model card's GGUF section."""

    data = read_json(folder / RESULT_FILE) or {}
    files = data.get("files") or {}
    files[info["type"]] = {**info, "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(folder / RESULT_FILE, {"files": files})
    card = folder / "README.md"
    if card.is_file():
        atomic_write_text(card, replace_section(card.read_text(encoding="utf-8"), CARD_HEADING,
                                                card_section(list(files.values()))))


def card_section(files: list[dict]) -> str:
    """The model card's GGUF section: one row per file."""
    lines = [CARD_HEADING, "", "Written with the `gguf` package's GGUFWriter; reloaded with transformers' "
             "`gguf_file=` loader and compared with the safetensors weights on fixed tokens.", "",
             "| file | type | size | max \\|logit diff\\| | relative | reload check |", "|---|---|---|---|---|---|"]
    for f in sorted(files, key=lambda f: GGUF_TYPES.index(f["type"]) if f["type"] in GGUF_TYPES else 9):
        c = f.get("check") or {}
        res = ("passed" if c.get("passed") else f"FAILED ({c.get('reason', '')})") if c else "not run"
        lines.append(f"| `{Path(f['path']).name}` | {f['type']} | {f['bytes'] / 1e6:.1f} MB | "
                     f"{c.get('max_abs_diff', float('nan')):.3g} | {c.get('rel_diff', float('nan')):.2g} | {res} |")
    return "\n".join(lines) + "\n"
