"""grouppo.engines: the one predicate of sharded parameters, and the engine described in words."""

from types import SimpleNamespace

import torch
from torch.distributed.fsdp import FSDPModule

from grouppo.embedded.synthetic import tiny_llama
from grouppo.engines import describe_engine, is_sharded, sharding_engine


def test_a_plain_model_is_not_sharded(tokenizer):
    assert not is_sharded(tiny_llama(tokenizer))


def test_zero3_partitions_and_fsdp2_modules_are_sharded(tokenizer):
    model = tiny_llama(tokenizer)
    next(model.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    assert is_sharded(model)

    layer = torch.nn.Linear(2, 2)
    layer.__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})  # as fully_shard swaps it
    assert is_sharded(torch.nn.Sequential(torch.nn.Linear(2, 2), layer))
    assert not is_sharded(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def fake_accelerator(n=1, fsdp2=False, zero_stage=None, fsdp1=False):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    state = SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=object() if fsdp1 else None)
    return SimpleNamespace(num_processes=n, is_fsdp2=fsdp2, state=state, device=torch.device("cpu"))


def test_engines_are_named():
    assert sharding_engine(fake_accelerator(2, fsdp2=True)) == "fsdp2"
    assert sharding_engine(fake_accelerator(2, zero_stage=3)) == "zero3"
    assert sharding_engine(fake_accelerator(2, zero_stage=2)) is None
    assert describe_engine(fake_accelerator()) == "one process, device cpu"
    assert describe_engine(fake_accelerator(2)) == "data parallel (DDP) on 2 processes, device cpu"
    assert describe_engine(fake_accelerator(4, zero_stage=2)).startswith("DeepSpeed ZeRO-2 on 4 processes")
    assert describe_engine(fake_accelerator(2, fsdp1=True)).startswith("FSDP (version 1) on 2")
