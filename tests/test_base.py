"""grouppo.base through GroupDPOTrainer: training, evaluation and saving, gradient accumulation, resume,
mixed precision, the non-finite guard, the model card, LoRA and pushing to the Hub."""

import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import trainer_config
from transformers import AutoModelForCausalLM, TrainerCallback

from grouppo import (
    GDPOConfig,
    GDPOTrainer,
    GroupDPOConfig,
    GroupDPOTrainer,
    OnlineGroupDPOConfig,
    OnlineGroupDPOTrainer,
)
from grouppo.embedded.synthetic import reversal_groups, tiny_llama

GROUPS = reversal_groups(12, group_size=4, seed=3)


def test_trains_evaluates_and_saves_a_loadable_model(tmp_path, tokenizer):
    model = tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GroupDPOTrainer(
        model,
        args=trainer_config(tmp_path, nll_weight=1.0),
        train_dataset=GROUPS,
        eval_dataset=GROUPS[:4],
        processing_class=tokenizer,
    )
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


@pytest.mark.parametrize("trainer_class", ["groupdpo", "gdpo"])
def test_evaluation_metrics_are_means_over_groups_whatever_the_batch_size(
    tmp_path, tokenizer, trainer_class
):
    """5 evaluation groups in batches of 1, 2 and 4 (last batch short): every metric that is a mean over
    groups, and eval_loss, is the same; a mean of the batches' means would weigh the short batch up."""
    beliefs = [
        {"prompt": [{"role": "user", "content": f"do you like {topic}"}],
         "beliefs": ["yes", "no", "maybe so"], "distribution": [0.5, 0.3, 0.2], "belief": belief,
         "chosen": f"{label} about {topic}", "rejected": f"something else about {topic}"}
        for topic in ("tea", "rain", "maps", "cats", "jazz")
        for belief, label in enumerate(["yes", "no", "maybe so"])
    ]  # fmt: skip
    config, trainer, data = {
        "groupdpo": (GroupDPOConfig, GroupDPOTrainer, reversal_groups(5, group_size=3, seed=11)),
        "gdpo": (GDPOConfig, GDPOTrainer, beliefs),
    }[trainer_class]
    results = []
    for size in (1, 2, 4):
        args = trainer_config(
            tmp_path, config, output_dir=str(tmp_path / str(size)), per_device_eval_batch_size=size
        )
        model, reference = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)  # rewards not 0
        run = trainer(model, ref_model=reference, args=args, eval_dataset=data, processing_class=tokenizer)
        results.append(run.evaluate())
    means = ("eval_rewards/", "eval_logps/", "eval_group/", "eval_loss")
    keys = [k for k in results[0] if k.startswith(means)]
    assert "eval_loss" in keys and "eval_rewards/margins" in keys and len(keys) >= 6
    spread = {k: max(r[k] for r in results) - min(r[k] for r in results) for k in keys}
    assert max(r["eval_rewards/margins"] for r in results) != 0.0
    for key in keys:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-6), (key, spread)
        assert results[2][key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-6), (key, spread)


def _trained(tmp_path, tokenizer, name, resume_from_checkpoint=None, **kw):
    args = trainer_config(tmp_path, output_dir=str(tmp_path / name), optim="sgd", learning_rate=0.5, **kw)
    trainer = GroupDPOTrainer(
        tiny_llama(tokenizer), args=args, train_dataset=GROUPS, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer.model.state_dict()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tokenizer):
    # A group is never split: 2 micro-batches of 2 groups make the same step as 1 batch of 4 groups.
    one = _trained(tmp_path, tokenizer, "one", per_device_train_batch_size=4)
    accumulated = _trained(
        tmp_path, tokenizer, "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    for key, value in one.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_same_run(tmp_path, tokenizer):
    straight = _trained(tmp_path, tokenizer, "straight", max_steps=3)
    _trained(tmp_path, tokenizer, "first", max_steps=3, save_strategy="steps", save_steps=1)
    resumed = _trained(
        tmp_path,
        tokenizer,
        "first",
        max_steps=3,
        resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-1"),
    )
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_scores_under_autocast(tmp_path, tokenizer):
    """accelerate's autocast lives on ``model.forward``, which scoring replaces: the trainer must enter it."""
    from grouppo import group_logps

    trainer = GroupDPOTrainer(
        tiny_llama(tokenizer),
        args=trainer_config(tmp_path, bf16=True, use_cpu=True),
        train_dataset=GROUPS,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = group_logps(model, batch)
    with torch.no_grad():
        full = group_logps(model, batch)
        got = trainer.score(trainer.model, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, full)  # bf16 matmuls do change the values


PROMPTS = [
    {"prompt": f"Reverse the word:\n{w}\n", "target": w[::-1]} for w in ("abc", "fgj", "qxz", "bad")
] * 2


BELIEFS = [
    {
        "prompt": [{"role": "user", "content": f"do you like {topic}"}],
        "beliefs": ["yes", "no", "maybe so"],
        "distribution": [0.5, 0.3, 0.2],
        "belief": belief,
        "chosen": f"{label} about {topic}",
        "rejected": f"something else about {topic}",
    }
    for topic in ("tea", "rain", "maps")
    for belief, label in enumerate(["yes", "no", "maybe so"])
]


def length_reward(prompts, completions, target, **_):
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target, strict=True)]


# ---------------------------------------------------------------------------------------------- non-finite
def _poison(model):
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def test_a_nan_weight_skips_every_step_stops_and_saves_nothing(tmp_path, tokenizer, caplog):
    model = _poison(tiny_llama(tokenizer))
    args = trainer_config(tmp_path, max_steps=10, max_nonfinite_steps=3)
    trainer = GroupDPOTrainer(model, args=args, train_dataset=GROUPS, processing_class=tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING), pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.train()
    assert trainer.nonfinite.skipped == 3 and "update is skipped" in caplog.text
    # Skipped steps changed no weight (the NaN was there before), and no model file was written.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)
    assert not list((tmp_path / "out").rglob("*.safetensors"))
    with pytest.raises(FloatingPointError, match="not saving"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists() or not list((tmp_path / "final").iterdir())
    # With checkpoints every step, the first checkpoint is refused: a NaN model is never written.
    args = trainer_config(tmp_path, max_steps=10, save_strategy="steps", save_steps=1)
    trainer = GroupDPOTrainer(model, args=args, train_dataset=GROUPS, processing_class=tokenizer)
    with pytest.raises(
        FloatingPointError, match="not saving to .*checkpoint-1: 1 parameter tensors hold NaN"
    ):
        trainer.train()
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_a_bad_step_is_skipped_and_counted_then_training_goes_on(tmp_path, tokenizer):
    # One step in four sees a non-finite loss: it is skipped (no update), counted, and training continues.
    calls = {"n": 0}

    class NaNOnce(GroupDPOTrainer):
        def objective(self, logps, ref_logps, inputs):
            calls["n"] += 1
            loss, metrics = super().objective(logps, ref_logps, inputs)
            return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    args = trainer_config(tmp_path, max_steps=4, optim="sgd", learning_rate=0.1)
    trainer = NaNOnce(tiny_llama(tokenizer), args=args, train_dataset=GROUPS, processing_class=tokenizer)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer.nonfinite.skipped == 1 and trainer.state.global_step == 4
    assert all(torch.equal(snapshots[1][k], snapshots[0][k]) for k in snapshots[0])  # step 2 changed nothing
    assert any(not torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[0])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.log_history[-2]["nonfinite_skipped_steps"] == 1


def test_a_learning_rate_that_explodes_stops_and_saves_nothing(tmp_path, tokenizer):
    args = trainer_config(
        tmp_path, max_steps=20, optim="sgd", learning_rate=1e30, max_grad_norm=0, max_nonfinite_steps=2
    )
    trainer = GroupDPOTrainer(
        tiny_llama(tokenizer), args=args, train_dataset=GROUPS, processing_class=tokenizer
    )
    with pytest.raises(FloatingPointError):
        trainer.train()
        trainer.save_model()  # reached only if training did not stop: must refuse non-finite weights
    assert not list((tmp_path / "out").rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- output dir
def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = GroupDPOConfig(output_dir=str(blocker / "run"), report_to=[])
    with pytest.raises(PermissionError, match="output_dir .*a-file/run.* cannot be written"):
        GroupDPOTrainer(str(tmp_path / "no-such-model"), args=args, train_dataset=GROUPS)


# ------------------------------------------------------------------------------------- kill and resume
class Kill(TrainerCallback):
    """Stops the process's work right after checkpoint ``at`` is written, as a kill would."""

    def __init__(self, at):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def _run(make, tmp_path, name, kill_at=None, resume=None):
    trainer = make(tmp_path / name)
    if kill_at is not None:
        trainer.add_callback(Kill(kill_at))
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        return None
    trainer.train(resume_from_checkpoint=resume)
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights, getattr(trainer, "rollout_stats", None)


def _offline(tokenizer):
    def make(out):
        args = trainer_config(
            out,
            output_dir=str(out),
            max_steps=5,
            optim="adamw_torch",
            learning_rate=1e-2,
            save_strategy="steps",
            save_steps=1,
            per_device_train_batch_size=2,
        )
        return GroupDPOTrainer(
            tiny_llama(tokenizer), args=args, train_dataset=GROUPS, processing_class=tokenizer
        )

    return make


def _gdpo(tokenizer):
    def make(out):
        args = trainer_config(
            out,
            GDPOConfig,
            output_dir=str(out),
            max_steps=5,
            learning_rate=3e-3,
            save_strategy="steps",
            save_steps=1,
            per_device_train_batch_size=1,
            precompute_ref_logps=True,
        )
        return GDPOTrainer(
            tiny_llama(tokenizer), args=args, train_dataset=BELIEFS, processing_class=tokenizer
        )

    return make


def _online(tokenizer):
    def make(out):
        args = trainer_config(
            out,
            OnlineGroupDPOConfig,
            output_dir=str(out),
            max_steps=5,
            per_device_train_batch_size=2,
            num_generations=4,
            max_new_tokens=6,
            learning_rate=0.5,
            optim="sgd",
            save_strategy="steps",
            save_steps=1,
            ref_sync_steps=2,
        )
        return OnlineGroupDPOTrainer(
            tiny_llama(tokenizer),
            reward_funcs=length_reward,
            args=args,
            train_dataset=PROMPTS,
            processing_class=tokenizer,
        )

    return make


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["offline", "gdpo", "online"])
def test_a_killed_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path, tokenizer, kind):
    make = {"offline": _offline, "gdpo": _gdpo, "online": _online}[kind](tokenizer)
    # Killed after checkpoint 3 of 5: online, the reference was re-synced to the policy at step 2, and
    # the sampler had been called 3 times; the resumed run must continue from exactly there.
    straight, straight_rollouts = _run(make, tmp_path, "straight")
    _run(make, tmp_path, "killed", kill_at=3)
    assert (tmp_path / "killed" / "checkpoint-3").is_dir() and not (
        tmp_path / "killed" / "checkpoint-4"
    ).exists()
    resumed, resumed_rollouts = _run(
        make, tmp_path, "killed", resume=str(tmp_path / "killed" / "checkpoint-3")
    )
    moved = max((straight[k] - v).abs().max() for k, v in make(tmp_path / "fresh").model.state_dict().items())
    assert moved > 1e-4  # the steps did change the model
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=f"{kind}: {key}")
    if kind == "online":  # the same responses were sampled, before and after the kill
        assert resumed_rollouts.rewards == straight_rollouts.rewards and resumed_rollouts.prompts == 10


def test_every_output_dir_gets_a_model_card(tmp_path, tokenizer):
    trainer = GroupDPOTrainer(
        tiny_llama(tokenizer),
        args=trainer_config(tmp_path, nll_weight=0.5),
        train_dataset=GROUPS,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "GroupDPO" in card and "| nll_weight | 0.5 |" in card and "| loss_type | all_pairs |" in card
    assert "12 training groups from a dataset given in Python" in card
    last_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    assert f"| loss | {last_loss:.6g} |" in card
    assert "a frozen copy of the initial policy" in card


def test_a_lora_card_names_the_adapter_and_its_settings(tmp_path, tokenizer):
    import yaml
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = GroupDPOTrainer(tiny_llama(tokenizer), args=trainer_config(tmp_path), train_dataset=GROUPS,
                              processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    for row in ("| adapter type | LORA |", "| adapter r | 4 |", "| adapter lora_alpha | 8 |",
                "| adapter target_modules | ['q_proj', 'v_proj'] |"):  # fmt: skip
        assert row in card, row
    assert "AutoPeftModelForCausalLM" in card and "GroupDPO" in card


def test_two_identical_lora_runs_give_identical_adapters(tmp_path, tokenizer):
    # LoRA's random initialisation happens under args.seed, before the trainer seeds the run.
    from peft import LoraConfig

    def run(seed_noise):
        model = tiny_llama(tokenizer)
        torch.manual_seed(seed_noise)  # whatever the global RNG holds when the trainer is built
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = GroupDPOTrainer(
            model,
            args=trainer_config(tmp_path, seed=7),
            train_dataset=GROUPS,
            processing_class=tokenizer,
            peft_config=lora,
        )
        trainer.train()
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}

    first, second = run(1), run(2)
    assert first and all(torch.equal(first[k], second[k]) for k in first)


def test_push_to_hub_uploads_the_model_card(tmp_path, tokenizer, monkeypatch):
    # As TRL's trainers do: the card is written into the folder that push_to_hub uploads.
    import transformers.trainer

    uploaded = {}

    class FakeApi:
        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = {p.name: p.read_text() for p in Path(folder_path).glob("*.md")}
            uploaded.update(repo_id=repo_id, files=files)

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    trainer = GroupDPOTrainer(
        tiny_llama(tokenizer), args=trainer_config(tmp_path), train_dataset=GROUPS, processing_class=tokenizer
    )
    trainer.train()
    trainer.hub_model_id = "someone/grouppo-test"  # the repository, as init_hf_repo would set it
    trainer.push_to_hub()
    assert uploaded["repo_id"] == "someone/grouppo-test"
    card = uploaded["files"]["README.md"]
    assert card.startswith("---\nbase_model:") and "# out" in card and "GroupDPO" in card


def test_hostile_paths_cannot_add_fields_to_the_model_card(tmp_path, tokenizer):
    import yaml

    out = tmp_path / "ev\nlicense: evil-license"
    trainer = GroupDPOTrainer(
        tiny_llama(tokenizer),
        args=trainer_config(tmp_path, output_dir=str(out), max_steps=1),
        train_dataset=GROUPS,
        processing_class=tokenizer,
    )
    trainer.base_model_name = "me/model\nlicense: evil | x"
    trainer.data_description = "data\n---\nlicense: evil"
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert set(front) == {"base_model", "library_name", "tags"} and "license" not in front
    assert front["base_model"] == "me/model\nlicense: evil | x"  # kept, as a value
    body = card.split("---\n", 2)[2]
    assert "\nlicense:" not in body and "evil \\| x" in body  # one line each, table bars escaped


def test_a_window_of_skipped_steps_logs_its_loss_as_nan_and_counts_them(tmp_path, tokenizer):
    class AlwaysNaN(GroupDPOTrainer):
        def objective(self, logps, ref_logps, inputs):
            loss, metrics = super().objective(logps, ref_logps, inputs)
            return loss * float("nan"), metrics

    args = trainer_config(tmp_path, max_steps=2, max_nonfinite_steps=5, logging_steps=1)
    trainer = AlwaysNaN(tiny_llama(tokenizer), args=args, train_dataset=GROUPS, processing_class=tokenizer)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "skipped_steps" in h]
    assert len(steps) == 2 and all(h["skipped_steps"] == 1 and math.isnan(h["loss"]) for h in steps)
