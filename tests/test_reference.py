"""grouppo.reference: the precomputed reference equals the live one, the adapter-disabled base, the disk
cache (keyed by model and data, a bad file recomputed), non-finite values refused."""

import json
import logging
import math

import pytest
import torch
from conftest import trainer_config

from grouppo import (
    GroupDPOTrainer,
)
from grouppo import reference as refcache
from grouppo.embedded.synthetic import reversal_groups, tiny_llama

GROUPS = reversal_groups(12, group_size=4, seed=3)


def test_precomputed_reference_equals_live_reference(tmp_path, tokenizer):
    live = GroupDPOTrainer(tiny_llama(tokenizer), args=trainer_config(tmp_path), train_dataset=GROUPS,
                           processing_class=tokenizer)  # fmt: skip
    pre = GroupDPOTrainer(tiny_llama(tokenizer), args=trainer_config(tmp_path, precompute_ref_logps=True),
                          train_dataset=GROUPS, processing_class=tokenizer)  # fmt: skip
    assert pre.ref_model is None and "ref_logps" in pre.train_dataset.column_names
    batch = pre.data_collator([pre.train_dataset[i] for i in range(4)])
    torch.testing.assert_close(batch["ref_logps"], live.reference.logps(batch), rtol=1e-5, atol=1e-5)


def test_reference_cache_is_reused_and_keyed_by_model_and_data(tmp_path, tokenizer, monkeypatch):
    from grouppo import reference as refcache

    cfg = trainer_config(tmp_path, precompute_ref_logps=True, ref_logps_cache_dir=str(tmp_path / "cache"))
    first = GroupDPOTrainer(tiny_llama(tokenizer), args=cfg, train_dataset=GROUPS, processing_class=tokenizer)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    def no_compute(self, dataset):
        raise AssertionError("the cached reference log-probs should have been read")

    monkeypatch.setattr(refcache.Reference, "compute", no_compute)
    again = GroupDPOTrainer(tiny_llama(tokenizer), args=cfg, train_dataset=GROUPS, processing_class=tokenizer)
    assert again.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]

    other_model = tiny_llama(tokenizer, seed=1)
    other_data = first.train_dataset.select(range(5)).remove_columns("ref_logps")
    same_model = first.accelerator.unwrap_model(first.model)
    reference = refcache.cache_path(tmp_path, same_model, first.train_dataset)
    assert refcache.cache_path(tmp_path, other_model, first.train_dataset) != reference
    assert refcache.cache_path(tmp_path, same_model, other_data) != reference


def test_peft_reference_is_the_adapter_disabled_base(tmp_path, tokenizer):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = GroupDPOTrainer(tiny_llama(tokenizer), args=trainer_config(tmp_path), train_dataset=GROUPS,
                              processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    assert trainer.ref_model is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    base = tiny_llama(tokenizer)
    from grouppo import group_logps

    with torch.no_grad():
        expected = group_logps(base, batch)
        adapted = group_logps(trainer.model, batch)
    torch.testing.assert_close(trainer.reference.logps(batch), expected)
    assert not torch.allclose(adapted, expected)  # the adapter does change the policy


# ---------------------------------------------------------------------------------------------- non-finite
def _poison(model):
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


# ------------------------------------------------------------------------------------- reference cache
@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "edit_value", "nan_with_checksum", "wrong_shape", "old_format"],
)
def test_a_bad_reference_cache_is_reported_by_path_and_recomputed(tmp_path, tokenizer, caplog, damage):
    cfg = trainer_config(tmp_path, precompute_ref_logps=True, ref_logps_cache_dir=str(tmp_path / "cache"))
    first = GroupDPOTrainer(tiny_llama(tokenizer), args=cfg, train_dataset=GROUPS, processing_class=tokenizer)
    (path,) = (tmp_path / "cache").glob("*.json")
    text = path.read_text()
    content = json.loads(text)
    values = content["values"]
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "edit_value":
        values[0][0] += 1.0  # parseable, plausible, and wrong
        path.write_text(json.dumps(content))
    elif damage == "nan_with_checksum":
        values[0][0] = math.nan
        content["sha256"] = refcache._values_digest(values)
        path.write_text(json.dumps(content))
    elif damage == "wrong_shape":
        values[0].append(-1.0)
        content["sha256"] = refcache._values_digest(values)
        path.write_text(json.dumps(content))
    else:
        path.write_text(json.dumps(values))  # the format before checksums: a bare list
    with caplog.at_level(logging.WARNING, logger="grouppo.reference"):
        again = GroupDPOTrainer(
            tiny_llama(tokenizer), args=cfg, train_dataset=GROUPS, processing_class=tokenizer
        )
    assert str(path) in caplog.text and "recomputing" in caplog.text
    assert again.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]
    assert refcache.load(path, again.train_dataset) is not None  # rewritten whole


def test_reference_log_probs_that_are_not_finite_stop_before_training(tmp_path, tokenizer):
    cfg = trainer_config(tmp_path, precompute_ref_logps=True, ref_logps_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FloatingPointError, match="reference log-probs are not finite"):
        GroupDPOTrainer(
            _poison(tiny_llama(tokenizer)), args=cfg, train_dataset=GROUPS, processing_class=tokenizer
        )
    assert not list((tmp_path / "cache").glob("*.json"))


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPPO_CACHE", str(tmp_path / "g"))
    assert refcache.cache_root() == tmp_path / "g"
    assert refcache.default_cache_dir() == tmp_path / "g" / "ref_logps"
    monkeypatch.delenv("GROUPPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert refcache.cache_root() == tmp_path / "xdg" / "grouppo"
