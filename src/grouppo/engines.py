"""Frozen models under the engines that shard parameters: FSDP2 and DeepSpeed ZeRO-3.

The policy is placed by accelerate and transformers' ``Trainer``; a frozen model beside it (the reference,
or a temporary copy that precomputes the reference's log-probs) is grouppo's to place. Under data
parallelism and ZeRO-1/2 every process holds whole parameters, and so does a frozen model: a replica.
Under FSDP2 and ZeRO-3 each process holds a shard of every parameter, and a frozen model is held the
same way, so that it costs ``1 / num_processes`` of its size per process and is gathered layer by layer
as it runs (``prepare_frozen``). The helpers here make a copy of a sharded model (``frozen_copy``), copy
weights between models however each is held (``copy_weights``), and read a model's whole tensors one at
a time (``full_tensors``: to hash, save or compare them); every one of them is a collective under a
sharding engine, so every process must call it, in the same order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_PEFT_WRAPPERS = (".base_layer", ".original_module")


def sharding_engine(accelerator: Any) -> str | None:
    """``"fsdp2"`` or ``"zero3"`` when the accelerator's engine shards parameters, else None."""
    if getattr(accelerator, "is_fsdp2", False):
        return "fsdp2"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return "zero3"
    return None


def describe_engine(accelerator: Any) -> str:
    """The engine and processes of a run, in words (``"FSDP2 on 8 processes (cuda:0, ...)"``)."""
    n = accelerator.num_processes
    engine = sharding_engine(accelerator)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if engine == "fsdp2":
        name = "FSDP2 (parameters, gradients and optimizer states sharded)"
    elif engine == "zero3":
        name = "DeepSpeed ZeRO-3 (parameters, gradients and optimizer states partitioned)"
    elif plugin is not None:
        name = f"DeepSpeed ZeRO-{plugin.zero_stage}"
    elif n > 1:
        name = "data parallel (DDP)"
    else:
        return f"one process, device {accelerator.device.type}"
    return f"{name} on {n} processes, device {accelerator.device.type}"


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model``'s parameters are sharded across processes: DeepSpeed ZeRO-3 partitions
    (parameters carrying ``ds_id``) or FSDP2 (modules turned into ``FSDPModule``s by ``fully_shard``; inside
    a forward their parameters may be gathered already, so the modules are checked). Such a model cannot
    be copied whole, and every process must make the same calls to it."""
    from torch.distributed.fsdp import FSDPModule

    return any(hasattr(p, "ds_id") for p in model.parameters()) or any(
        isinstance(m, FSDPModule) for m in model.modules()
    )


@contextmanager
def _whole(tensor: torch.Tensor, modify: bool = False) -> Iterator[None]:
    """``tensor`` whole while inside: a ZeRO-3 partition is all-gathered (and, with ``modify``, rank 0's
    value partitioned again on leaving)."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0 if modify else None):
            yield
    else:
        yield


def _adapters(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(f".{name}." for name in getattr(model, "peft_config", {}))


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers by name. A PEFT model's are named as in its base model without adapters
    (``base_model.model.`` and the tuner wrappers' ``.base_layer`` taken off, adapter weights left out),
    so that a PEFT policy and a plain copy of its base name the same weights the same way."""
    adapters = _adapters(model)
    prefix = "base_model.model." if adapters else ""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if adapters and (any(a in name for a in adapters) or ".modules_to_save." in name):
            continue
        name = name.removeprefix(prefix)
        for wrapper in _PEFT_WRAPPERS:
            name = name.replace(wrapper, "")
        yield name, tensor


def full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` (named as ``_tensors`` names them), whole and detached on
    the CPU, one at a time: ZeRO-3 partitions all-gathered, FSDP2's DTensors made full."""
    for name, tensor in sorted(_tensors(model)):
        if hasattr(tensor, "full_tensor"):
            yield name, tensor.full_tensor().detach().cpu()
        else:
            with _whole(tensor):
                yield name, tensor.detach().cpu().clone()


def _same_shards(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """True when this process's shards of ``src`` and ``dst`` hold the same elements."""
    if hasattr(src, "ds_id") and hasattr(dst, "ds_id"):
        # a parameter ZeRO-3 keeps whole on every rank (below stage3_param_persistence_threshold) is
        # used whole, not from its partition: those are written whole
        released = all(t.ds_status.name == "NOT_AVAILABLE" for t in (src, dst))
        return released and src.ds_numel == dst.ds_numel and src.ds_tensor.shape == dst.ds_tensor.shape
    if hasattr(src, "to_local") and hasattr(dst, "to_local"):
        return (src.shape, src.placements, src.device_mesh) == (dst.shape, dst.placements, dst.device_mesh)
    return False


@torch.no_grad()
def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Set ``dst``'s parameters and buffers to ``src``'s, matched by name (a PEFT model's base weights to
    a plain model's). Shards held alike on both sides are copied in place, with no communication (a
    ZeRO-3 policy into a ZeRO-3 copy, FSDP2 into FSDP2); otherwise each tensor is gathered whole and
    written into ``dst`` however it is held."""
    targets = dict(_tensors(dst))
    for name, tensor in _tensors(src):
        if name not in targets:
            raise ValueError(f"cannot copy weights: {type(dst).__name__} has no tensor {name!r}")
        target = targets.pop(name)
        if _same_shards(tensor, target):
            if hasattr(tensor, "ds_id"):
                target.ds_tensor.copy_(tensor.ds_tensor)
            else:
                target.to_local().copy_(tensor.to_local())
        elif hasattr(tensor, "full_tensor"):
            _write(target, tensor.full_tensor())
        else:
            with _whole(tensor):
                _write(target, tensor)
    if targets:
        raise ValueError(f"cannot copy weights: {type(src).__name__} has no tensor {sorted(targets)[0]!r}")


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``target``, however ``target`` is held."""
    if hasattr(target, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements).to_local()
        target.to_local().copy_(local)
    elif hasattr(target, "ds_id"):
        with _whole(target, modify=True):
            target.data.copy_(value)
    else:
        target.data.copy_(value)


def save_whole(model: torch.nn.Module, path: str, write: bool) -> None:
    """Gather ``model``'s tensors whole (every process calls) and, where ``write``, save them to the
    safetensors file ``path``, named as ``full_tensors`` names them."""
    from safetensors.torch import save_file

    tensors = dict(full_tensors(model))
    if write:
        save_file(tensors, path)


@torch.no_grad()
def load_whole(model: torch.nn.Module, path: str) -> None:
    """Load a ``save_whole`` file into ``model``, however it is held (every process calls)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    for name, tensor in _tensors(model):
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r}")
        _write(tensor, tensors[name])


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s weights to serve as a frozen model: for a PEFT model, its base model without
    the adapters. A ZeRO-3 model is copied the way transformers builds one (a new model of the same class
    and config, partitioned as it is built under ``deepspeed.zero.Init``) and given the weights partition
    by partition: ``copy.deepcopy`` would copy empty partitions without their gathering hooks."""
    peft = bool(_adapters(model))
    if not is_sharded(model):
        clone = copy.deepcopy(model)
        return clone.unload() if peft else clone
    base = model.get_base_model() if peft else model
    dtype = next(base.parameters()).dtype
    clone = type(base)._from_config(base.config, dtype=dtype)
    copy_weights(model, clone)
    return clone


def prepare_frozen(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """``model`` frozen, in evaluation mode, and held the way the accelerator's engine holds the policy:

    * FSDP2: sharded by ``fully_shard`` with the run's FSDP plugin (the same wrap policy, mixed
      precision and resharding as the policy);
    * DeepSpeed ZeRO-3: a DeepSpeed engine with the run's ZeRO-3 settings and no optimizer
      (ZeRO-Inference), partitioned and gathered layer by layer;
    * otherwise: accelerate's evaluation placement, a replica on the process's device.
    """
    model.eval().requires_grad_(False)
    engine = sharding_engine(accelerator)
    if engine == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    if engine == "zero3":
        import deepspeed

        ds_engine, *_ = deepspeed.initialize(model=model, config=_inference_config(accelerator))
        ds_engine.module.eval()
        return ds_engine
    return accelerator.prepare_model(model, evaluation_mode=True)


def _inference_config(accelerator: Any) -> dict[str, Any]:
    """The run's DeepSpeed config for a model without optimizer: its ZeRO-3 section (less the optimizer's
    offload and any value still ``"auto"``: DeepSpeed's defaults) and its precision."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = {
        key: value
        for key, value in config.get("zero_optimization", {}).items()
        if value != "auto" and key != "offload_optimizer"
    }
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    for precision in ("bf16", "fp16"):
        if config.get(precision, {}).get("enabled") is True:
            out[precision] = {"enabled": True}
    return out


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters an FSDP2 model keeps after a forward without backward: the root and
    the units ``reshard_after_forward=False`` leaves whole (accelerate's embedding and LM-head units)
    would otherwise stay gathered until the next call. For a frozen model there is no backward to
    reshard them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def release(model: torch.nn.Module | None) -> None:
    """Free a frozen model made by ``prepare_frozen`` (a DeepSpeed engine's hooks and partitions too)."""
    if model is not None and hasattr(model, "destroy"):
        model.destroy()
