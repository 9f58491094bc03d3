"""What differs between one process, DDP and FSDP, in one small strategy object.

The training recipes (engine/distill.py) call the same methods whatever the launch:

    wrap(module, optimizer)         prepare the trainable module for this launch
    no_sync(last)                   context for one micro-batch (skips DDP's all-reduce until the last)
    backward(loss)                  loss.backward() the way this launch needs
    clip(params, max_norm)          clip and return the global gradient norm
    reduce_mean(vec)                mean of a vector over ranks (one collective per step)
    full_model_state(module)        the full (unsharded) state_dict on rank 0 (or everywhere)
    full_optim_state(optimizer)     optimizer.state_dict() with full moments on rank 0
    load_optim_state(optimizer, sd) load a full optimizer state
    gather_rng(rng)                 every rank's RNG state (a list) or None in one process
    pick(obj)                       rank 0's value of obj on every rank
    barrier()                       wait for every rank

Several processes come from `torchrun` / `accelerate launch` (WORLD_SIZE > 1): each rank takes its
slice of every micro-batch. FSDP is selected by ACCELERATE_USE_FSDP=true (what `accelerate launch
--use_fsdp` sets): torch FSDP2 `fully_shard`, one unit per decoder layer plus the root, full shard,
on CUDA (NCCL) or CPU (gloo); accelerate only turns FSDP on for GPUs, and its other FSDP_* settings
are not used.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

log = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """ACCELERATE_USE_FSDP=true: what `accelerate launch --use_fsdp` / an FSDP accelerate config sets."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


class SingleProcess:
    """One process: plain torch, no accelerate wrappers."""

    name = "single"
    sharded = False

    def __init__(self, device: torch.device):
        self.device, self.world, self.rank = device, 1, 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        return module, optimizer

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def no_sync(self, module: nn.Module, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce_mean(self, vec: torch.Tensor) -> torch.Tensor:
        return vec

    def any_rank(self, flag: bool) -> bool:
        return flag

    def full_model_state(self, module: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The full state_dict on rank 0 (on every rank with `everywhere`; {} elsewhere when sharded)."""
        return module.state_dict()

    def full_optim_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return optimizer.state_dict()

    def load_optim_state(self, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        optimizer.load_state_dict(sd)

    def gather_rng(self, rng: dict) -> list[dict] | None:
        return None

    def pick(self, obj):
        return obj

    def barrier(self) -> None:
        pass


class DataParallel(SingleProcess):
    """DDP through accelerate: every rank holds the whole student and its AdamW state."""

    name = "ddp"

    def __init__(self, accelerator):
        self.acc = accelerator
        self.device, self.world, self.rank = accelerator.device, accelerator.num_processes, accelerator.process_index

    def wrap(self, module, optimizer):
        return self.acc.prepare(module, optimizer)

    def unwrap(self, module):
        return self.acc.unwrap_model(module)

    def no_sync(self, module, last):
        return contextlib.nullcontext() if last else self.acc.no_sync(module)

    def backward(self, loss):
        self.acc.backward(loss)

    def clip(self, params, max_norm):
        return self.acc.clip_grad_norm_(params, max_norm)

    def reduce_mean(self, vec):
        return self.acc.reduce(vec, reduction="sum") / self.world

    def any_rank(self, flag):
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def full_model_state(self, module, everywhere=False):
        return self.acc.get_state_dict(module)

    def full_optim_state(self, optimizer):
        return optimizer.state_dict() if self.main else None

    def gather_rng(self, rng):
        out = [None] * self.world
        torch.distributed.all_gather_object(out, rng)
        return out

    def pick(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        self.acc.wait_for_everyone()


class FullyShardedDataParallel(DataParallel):
    """FSDP2 over all ranks: weights, gradients and AdamW moments split across the ranks."""

    name = "fsdp"
    sharded = True

    def wrap(self, module, optimizer):
        return module, optimizer  # sharded before the optimizer is made: see shard()

    def shard(self, module: nn.Module, layers: list[nn.Module]) -> None:
        """fully_shard in place: one unit per decoder layer, the root for the rest; moves shards to the device."""

        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        ps = list(module.parameters())
        log.info("FSDP2 over %d ranks: this rank holds %d of the %d student values", self.world,
                 sum(p.to_local().numel() for p in ps), sum(p.numel() for p in ps))

    def unwrap(self, module):
        return module

    def no_sync(self, module, last):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip(self, params, max_norm):
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def full_model_state(self, module, everywhere=False):
        module.reshard()  # an evaluation forward leaves the root's parameters unsharded
        out = {}
        for k, v in module.state_dict().items():
            v = full_tensor(v).detach()  # a collective: every rank, same order
            if self.main or everywhere:
                out[k] = v.cpu()
        return out

    def full_optim_state(self, optimizer):
        sd = optimizer.state_dict()
        state = {}
        for i in sorted(sd["state"]):
            s = {k: full_tensor(v).detach() if torch.is_tensor(v) else v for k, v in sorted(sd["state"][i].items())}
            state[i] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
        return {"state": state, "param_groups": sd["param_groups"]} if self.main else None

    def load_optim_state(self, optimizer, sd):
        """Each rank keeps its own shard of every moment (cut locally from the full tensor)."""

        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                        if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
                        for k, v in s.items()}
        optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it, same order); else t."""

    return t.full_tensor() if isinstance(t, DTensor) else t


def strategy_for_launch(device: torch.device) -> SingleProcess:
    """The strategy of this process's launch: one process, DDP, or FSDP (ACCELERATE_USE_FSDP)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess(device)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    return FullyShardedDataParallel(acc) if fsdp_requested() else DataParallel(acc)
