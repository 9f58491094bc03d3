"""Layer streaming: score a model whose weights do not fit on the execution device.

`stream_model(model, device)` keeps every weight off the device — in CPU RAM, or, for a model loaded
with `engine.models.load(..., stream="disk")`, in the checkpoint's safetensors files on disk — and
leaves `meta` placeholders in the model. The mechanism is accelerate's `cpu_offload` (the one behind
big-model inference): an `AlignDevicesHook` on every module that owns weights copies them onto the
execution device just before that module runs and drops them right after it returns. Peak device
memory is the largest single module (usually the embedding / lm_head) plus activations and buffers,
instead of the whole model. The arithmetic is unchanged (the same kernels on the same device with
the same weights), so streamed scores equal the unstreamed ones. A mixture of experts' sparse block
(router and every expert of the layer) loads as one module, for the whole of its forward.

Costs and limits:
- every forward re-copies each weight it uses (host -> device on CUDA; on CPU only the hooks'
  Python overhead); the depth-perplexity sweep runs L(L+1)/2 layer passes per batch, so with
  streaming it also copies that many layers per batch (the width + BI pass copies L);
- the on-device copies are dropped after each module, so no gradient can be kept: Taylor+ is refused;
- the model cannot be moved with `.to()` while streamed (its parameters are on `meta`).

The model carries a `StreamInfo` (`stream_info(model)`); `execution_device(model)` is where its
forward runs (streamed or not), and `offloaded_weights(model)` gives the real values behind the
`meta` placeholders (read lazily, one tensor at a time), which `engine.models.fingerprint` uses so a
streamed model has the same fingerprint — and shares the score cache — with its unstreamed self.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, remove_hook_from_submodules
from accelerate.utils import PrefixedDataset
from torch import nn
from transformers import AutoModelForCausalLM

from engine.arch.moe import MOE_FIELDS, moe_parts
from engine.devices import resolve_device

log = logging.getLogger(__name__)

ATTR = "_prunescope_stream"
OFFLOAD_KINDS = ("cpu", "disk")


@dataclass(frozen=True)
class StreamInfo:
    """How a streamed model is run: where its weights rest, where its forward executes."""

    offload: str  # "cpu" (weights in RAM) | "disk" (weights read from files at each forward)
    execution_device: torch.device
    tied: bool  # lm_head shares the embedding (read before offloading: `meta` tensors cannot tell)
    weights: Mapping[str, torch.Tensor]  # state-dict name -> real value (lazy for "disk")


def stream_info(model: nn.Module) -> StreamInfo | None:
    """The model's StreamInfo, or None when it is not streamed."""
    return getattr(model, ATTR, None)


def is_streamed(model: nn.Module) -> bool:
    return stream_info(model) is not None


def execution_device(model: nn.Module) -> torch.device:
    """Where the model's forward runs: the streaming device, an accelerate hook's execution device,
    else the device of its first parameter that is not on `meta` (cpu for a model without any)."""
    info = stream_info(model)
    if info is not None:
        return info.execution_device
    hook = getattr(model, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def offloaded_weights(model: nn.Module) -> Mapping[str, torch.Tensor] | None:
    """state-dict name -> real tensor for a streamed model (None if not streamed)."""
    info = stream_info(model)
    return None if info is None else info.weights


def _tied(model: nn.Module) -> bool:
    """Whether the output embedding shares the input embedding's weight, read from real tensors."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return False
    a, b = inp.weight, out.weight
    if a.device.type == "meta" or b.device.type == "meta":  # already offloaded: trust the config
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return bool(getattr(cfg, "tie_word_embeddings", False))
    return a is b or a.data_ptr() == b.data_ptr()


def _whole_blocks(model: nn.Module) -> list[str] | None:
    """Classes whose weights load together for their whole forward: a mixture of experts' sparse blocks
    (router and experts), so the expert-importance hook, which runs after the experts return, still sees
    their weights. None for other models (each module loads its own)."""
    if getattr(model.config, "model_type", None) not in MOE_FIELDS:
        return None
    parts = [moe_parts(model, i) for i in range(int(model.config.num_hidden_layers))]
    return sorted({type(p.block).__name__ for p in parts if p is not None})


def stream_model(model: nn.Module, device: str | torch.device = "auto",
                 weights: Mapping[str, torch.Tensor] | None = None, offload: str = "cpu") -> nn.Module:
    """Keep `model`'s weights off `device` and load each module's onto it only while it runs (in place).

    weights: where the weights rest, name -> tensor for every state-dict entry (default: the model's
    own state dict moved to CPU — no copy for a model already on CPU). `offload` only labels it
    ("cpu" | "disk") for the metadata. Returns the model, with `stream_info(model)` set.
    """
    if offload not in OFFLOAD_KINDS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_KINDS)}, got {offload!r}")
    if is_streamed(model):
        raise ValueError("this model is streamed already")
    if getattr(model, "_hf_hook", None) is not None and weights is None:
        raise ValueError("this model already carries accelerate hooks (device_map / offload); load it without "
                         "them to stream it")
    dev = resolve_device(device)
    tied = _tied(model)
    if weights is None:
        weights = {name: t.to("cpu") for name, t in model.state_dict().items()}
    cpu_offload(model, execution_device=dev, state_dict=weights, preload_module_classes=_whole_blocks(model))
    setattr(model, ATTR, StreamInfo(offload=offload, execution_device=dev, tied=tied, weights=weights))
    log.info("streaming %s: weights kept on %s, run on %s", type(model).__name__, offload, dev)
    return model


def load_disk_streamed(path: str, dtype: torch.dtype, device: str | torch.device = "auto",
                       offload_dir: str | Path | None = None, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` with every weight left on disk, streamed to `device`.

    transformers builds the model on `meta` and indexes the checkpoint's own safetensors files (weights
    it must convert on load are re-saved in `offload_dir`, a temporary folder removed with the model
    when not given), so RAM holds no copy of the model: each module's weights are read (and cast to
    `dtype`) from disk when it runs. For models larger than RAM as well as the device.
    """
    tmp = None
    if offload_dir is None:
        offload_dir = tmp = tempfile.mkdtemp(prefix="prunescope-offload-")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "disk"},
                                                     offload_folder=str(offload_dir), **kwargs)
        # transformers dispatched it to run on the CPU; keep its weights map, re-hook for `device`
        loader = None
        for m in model.modules():
            hook = getattr(m, "_hf_hook", None)
            wm = getattr(hook, "weights_map", None) if isinstance(hook, AlignDevicesHook) else None
            if wm is not None:
                loader = wm.dataset if isinstance(wm, PrefixedDataset) else wm
                break
        if loader is None:
            raise RuntimeError(f"transformers did not offload {path} to disk (no weights map found)")
        remove_hook_from_submodules(model)
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map
        keys = set(loader)  # (`k in loader` would read the tensor)
        missing = [k for k, t in model.state_dict().items() if t.device.type == "meta" and k not in keys]
        if missing:
            raise RuntimeError(f"disk offload of {path} lacks weights for {missing[:5]}")
        stream_model(model, device, weights=loader, offload="disk")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        weakref.finalize(model, shutil.rmtree, tmp, True)
    return model
