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


def fake_accelerator(n=1, fsdp2=False, zero_stage=None):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    state = SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=None)
    return SimpleNamespace(num_processes=n, is_fsdp2=fsdp2, state=state, device=torch.device("cpu"))


def test_engines_are_named():
    assert sharding_engine(fake_accelerator(2, fsdp2=True)) == "fsdp2"
    assert sharding_engine(fake_accelerator(2, zero_stage=3)) == "zero3"
    assert sharding_engine(fake_accelerator(2, zero_stage=2)) is None
    assert describe_engine(fake_accelerator()) == "one process, device cpu"
    assert describe_engine(fake_accelerator(2)) == "data parallel (DDP) on 2 processes, device cpu"
    assert describe_engine(fake_accelerator(4, zero_stage=2)).startswith("DeepSpeed ZeRO-2 on 4 processes")


def test_fsdp_version_1_is_refused_before_anything_loads(monkeypatch):
    """FSDP1 is refused with the reason and the fix, whether the config asks for it or an accelerate
    config without fsdp_version does (accelerate then takes version 1); FSDP2 is taken."""
    import pytest

    from grouppo import GroupDPOConfig

    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        GroupDPOConfig(output_dir="out", fsdp="full_shard", fsdp_config={"version": 1})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ValueError, match="FSDP version 1 is not supported"):
        GroupDPOConfig(output_dir="out")
    monkeypatch.setenv("FSDP_VERSION", "2")
    from grouppo.base import fsdp_version

    assert fsdp_version(SimpleNamespace(fsdp="", fsdp_config=None)) == 2
