"""GroupDPOTrainer end to end (reference modes, evaluation, saving) and the CLI round trip."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grouppo import GroupDPOConfig, GroupDPOTrainer
from grouppo.apps.cli import main
from grouppo.embedded.synthetic import reversal_groups, tiny_llama

GROUPS = reversal_groups(12, group_size=4, seed=3)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(kw)
    return GroupDPOConfig(**base)  # fmt: skip


def test_trains_evaluates_and_saves_a_loadable_model(tmp_path, tokenizer):
    model = tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GroupDPOTrainer(model, args=config(tmp_path, nll_weight=1.0), train_dataset=GROUPS,
                              eval_dataset=GROUPS[:4], processing_class=tokenizer)  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    for key in (
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_logps/chosen",
        "eval_group/pair_accuracy",
    ):
        assert key in metrics
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    logged = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert logged, trainer.state.log_history
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])


def _trained(tmp_path, tokenizer, name, resume_from_checkpoint=None, **kw):
    args = config(tmp_path, output_dir=str(tmp_path / name), optim="sgd", learning_rate=0.5, **kw)
    trainer = GroupDPOTrainer(tiny_llama(tokenizer), args=args, train_dataset=GROUPS,
                              processing_class=tokenizer)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer.model.state_dict()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tokenizer):
    # A group is never split: 2 micro-batches of 2 groups make the same step as 1 batch of 4 groups.
    one = _trained(tmp_path, tokenizer, "one", per_device_train_batch_size=4)
    accumulated = _trained(tmp_path, tokenizer, "acc", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)  # fmt: skip
    for key, value in one.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_same_run(tmp_path, tokenizer):
    straight = _trained(tmp_path, tokenizer, "straight", max_steps=3)
    _trained(tmp_path, tokenizer, "first", max_steps=3, save_strategy="steps", save_steps=1)
    resumed = _trained(tmp_path, tokenizer, "first", max_steps=3,
                       resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-1"))  # fmt: skip
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_equals_live_reference(tmp_path, tokenizer):
    live = GroupDPOTrainer(tiny_llama(tokenizer), args=config(tmp_path), train_dataset=GROUPS,
                           processing_class=tokenizer)  # fmt: skip
    pre = GroupDPOTrainer(tiny_llama(tokenizer), args=config(tmp_path, precompute_ref_logps=True),
                          train_dataset=GROUPS, processing_class=tokenizer)  # fmt: skip
    assert pre.ref_model is None and "ref_logps" in pre.train_dataset.column_names
    batch = pre.data_collator([pre.train_dataset[i] for i in range(4)])
    torch.testing.assert_close(batch["ref_logps"], live.reference.logps(batch), rtol=1e-5, atol=1e-5)


def test_reference_cache_is_reused_and_keyed_by_model_and_data(tmp_path, tokenizer, monkeypatch):
    from grouppo import reference as refcache

    cfg = config(tmp_path, precompute_ref_logps=True, ref_logps_cache_dir=str(tmp_path / "cache"))
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
    trainer = GroupDPOTrainer(tiny_llama(tokenizer), args=config(tmp_path), train_dataset=GROUPS,
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


def test_bf16_mixed_precision_scores_under_autocast(tmp_path, tokenizer):
    """accelerate's autocast lives on ``model.forward``, which scoring replaces: the trainer must enter it."""
    from grouppo import group_logps

    trainer = GroupDPOTrainer(tiny_llama(tokenizer), args=config(tmp_path, bf16=True, use_cpu=True),
                              train_dataset=GROUPS,
                              processing_class=tokenizer)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = group_logps(model, batch)
    with torch.no_grad():
        full = group_logps(model, batch)
        got = trainer.score(trainer.model, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, full)  # bf16 matmuls do change the values


def test_demo_words_are_one_token_per_letter_in_prompt_and_answer(tokenizer):
    # The demo task is learnable only if a word's letters are the same tokens in the prompt and answer.
    for group in reversal_groups(50, seed=0):
        word = group["answer"][::-1]
        prompt_tokens = tokenizer.convert_ids_to_tokens(tokenizer(group["prompt"])["input_ids"])
        assert prompt_tokens[-len(word) - 1 : -1] == list(word)
        for response in group["responses"]:
            assert tokenizer.convert_ids_to_tokens(tokenizer(response)["input_ids"]) == list(response)


def test_config_rejects_unknown_choices(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        GroupDPOConfig(output_dir=str(tmp_path), loss_type="ipo")
    with pytest.raises(ValueError, match="positive_rule"):
        GroupDPOConfig(output_dir=str(tmp_path), positive_rule="median")


def test_cli_convert_validate_train_round_trip(tmp_path, tokenizer, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": g["prompt"], "chosen": g["responses"][i], "rejected": g["responses"][j]}
            for g in GROUPS[:4] for i, j in ((0, 1), (0, 2), (3, 2))]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = tmp_path / "groups.jsonl"
    assert main(["data", "convert", "--from", "trl", str(pairs), str(groups), "--merge_prompts"]) == 0
    assert main(["data", "validate", str(groups)]) == 0
    summary = capsys.readouterr().out
    assert "records" in summary.lower()
    assert len(groups.read_text().splitlines()) == 4

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}) + "\n")
    assert main(["data", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: line 1: field 'scores'" in err  # the file and its 1-based line

    model_dir = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {model_dir}\ndataset_name: {groups}\nmax_steps: 1\nreport_to: []\n"
                   f"per_device_train_batch_size: 2\nsave_strategy: 'no'\nloss_type: sdpo\nbeta: 0.05\n"
                   f"nll_weight: 0.3\n")  # fmt: skip
    out = tmp_path / "trained"
    flags = ["--output_dir", str(out), "--beta", "0.2", "--positive_rule", "best_vs_rest"]
    argv = ["groupdpo", "--config", str(cfg), *flags]
    assert main(argv) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    # The configuration the trainer ran with (saved beside the model): flags override the YAML, YAML values
    # not overridden reach it, and what neither sets keeps GroupDPOConfig's default.
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert type(args) is GroupDPOConfig
    default = GroupDPOConfig(output_dir=str(tmp_path / "unused"))
    assert args.beta == 0.2 != default.beta  # flag over YAML (0.05)
    assert args.positive_rule == "best_vs_rest" != default.positive_rule  # flag only
    assert args.output_dir == str(out)
    assert (args.loss_type, args.nll_weight) == ("sdpo", 0.3)  # YAML only
    assert (args.max_steps, args.per_device_train_batch_size, args.save_strategy) == (1, 2, "no")
    assert args.loss_type != default.loss_type and args.nll_weight != default.nll_weight
    assert args.learning_rate == default.learning_rate


def test_cli_rejects_unknown_yaml_option(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name_or_path: x\ndataset_name: y\nbetaa: 0.1\n")
    with pytest.raises(SystemExit):
        main(["groupdpo", "--config", str(cfg)])
