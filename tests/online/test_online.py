"""Sampling to groups (``grouppo.rollout``, ``grouppo sample``) and the online trainer on a tiny model."""

import pytest
import torch
from conftest import assert_trained

from grouppo.apps.cli import main
from grouppo.data import prepare_groups
from grouppo.embedded.synthetic import tiny_llama
from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
from grouppo.load import load_records
from grouppo.online.rollout import group_records, rollout, score
from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

PROMPTS = [{"prompt": f"Reverse the word:\n{w}\n", "target": w[::-1]} for w in ("abc", "fgj", "qxz", "bad")]


def length_reward(prompts, completions, target, **_):
    """A deterministic reward that differs between responses: closeness of the length to the target's."""
    assert len(prompts) == len(completions) == len(target)
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target, strict=True)]


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


class FixedGenerator:
    """Returns the same K completions for every prompt: a rollout without sampling noise."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, num_generations=1):
        assert num_generations == len(self.texts)
        return [list(self.texts) for _ in prompts]


def test_score_passes_record_fields_aligned_with_completions():
    completions = [["cba", "c"], ["jgfx", "jgf"]]
    assert score(length_reward, PROMPTS[:2], completions) == [[0, -2], [-1, 0]]


def test_to_groups_drops_empty_completions_and_groups_without_preference(tokenizer):
    completions = [["cba", "c", ""], ["x", "y", "z"], ["", "", "jgf"]]
    values = [[0.0, -2.0, -3.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    groups, stats = group_records(PROMPTS[:3], completions, values, tokenizer)
    assert [g["responses"] for g in groups] == [["cba", "c"]]
    assert groups[0]["scores"] == [0.0, -2.0] and groups[0]["target"] == "cba"
    assert (stats.groups, stats.equal_reward_groups, stats.too_small_groups, stats.empty_completions) == (
        1,
        1,
        1,
        3,
    )


def test_sampled_groups_round_trip_through_the_group_schema(tokenizer):
    from grouppo.generation import SamplingConfig, TransformersGenerator

    model = tiny_llama(tokenizer, seed=0)
    generator = TransformersGenerator(model, tokenizer, SamplingConfig(max_new_tokens=6, seed=1))
    groups, stats = rollout(generator, length_reward, PROMPTS, 4, tokenizer)
    assert stats.completions == 16 and stats.groups == len(groups) > 0
    records, _ = prepare_groups(groups, positive_rule="top_bottom", skip_invalid=False)
    for group in records:
        assert group["scores"] == [-abs(len(r) - len(group["target"])) for r in group["responses"]]


def test_sample_cli_writes_valid_scored_groups(tmp_path, model_dir, capsys):
    from grouppo.load import write_jsonl

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "groups.jsonl"
    write_jsonl(PROMPTS, prompts)
    argv = [
        "sample",
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(prompts),
        "--num_generations",
        "4",
        "--output_dir",
        str(out),
        "--reward_funcs",
        "test_online:length_reward",
        "--max_new_tokens",
        "6",
    ]
    assert main(argv) == 0
    groups = load_records(str(out))
    assert groups and all(len(g["responses"]) == len(g["scores"]) >= 2 for g in groups)
    assert main(["data", "validate", str(out)]) == 0


def online_config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "online"),
        per_device_train_batch_size=2,
        max_steps=1,
        num_generations=4,
        max_new_tokens=6,
        learning_rate=0.5,
        optim="sgd",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    base.update(kw)
    return OnlineGroupDPOConfig(**base)


def test_online_step_equals_the_offline_step_on_the_same_groups(tmp_path, tokenizer):
    """One online step (rollout inside the step) moves the weights exactly as GroupDPOTrainer does on the
    groups that rollout produced: the online trainer adds sampling, nothing else."""
    texts = ["cba", "cb", "abc", "c"]
    online = OnlineGroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        reward_funcs=length_reward,
        args=online_config(tmp_path, per_device_train_batch_size=4),
        train_dataset=PROMPTS[:1] * 4,
        processing_class=tokenizer,
        generator=FixedGenerator(texts),
    )
    online.train()
    scores = score(length_reward, PROMPTS[:1] * 4, [texts] * 4)
    groups, _ = group_records(PROMPTS[:1] * 4, [texts] * 4, scores, tokenizer)
    offline = GroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        args=GroupDPOConfig(
            output_dir=str(tmp_path / "offline"),
            per_device_train_batch_size=4,
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=groups,
        processing_class=tokenizer,
    )
    offline.train()
    moved, initial = 0.0, tiny_llama(tokenizer, seed=0).state_dict()
    for (name, a), b in zip(online.model.named_parameters(), offline.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (a - initial[name]).abs().max().item())
    assert moved > 1e-3
    logged = online.state.log_history[0]
    assert logged["reward"] == pytest.approx(sum(length_reward(texts, texts, ["cba"] * 4)) / 4)


def test_online_trains_on_sampled_responses_and_logs_rewards(tmp_path, tokenizer):
    initial = tiny_llama(tokenizer, seed=0).state_dict()
    trainer = OnlineGroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        reward_funcs="test_online:length_reward",
        args=online_config(tmp_path, max_steps=2, ref_sync_steps=1),
        train_dataset=PROMPTS,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.rollout_stats.prompts == 4 and trainer.rollout_stats.completions == 16
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    # re-synced once, at step 1: the reference then holds the policy after its first step
    ref = trainer.accelerator.unwrap_model(trainer.ref_model).state_dict()
    assert any(not torch.equal(ref[n], initial[n]) for n in initial)
    assert {"reward", "frac_reward_zero_std", "loss"} <= set(trainer.state.log_history[0])


def test_groups_with_equal_rewards_are_skipped_and_counted(tmp_path, tokenizer):
    initial = tiny_llama(tokenizer, seed=0).state_dict()
    trainer = OnlineGroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        reward_funcs=constant_reward,
        args=online_config(tmp_path),
        train_dataset=PROMPTS[:2],
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.rollout_stats.equal_reward_groups == 2 and trainer.rollout_stats.groups == 0
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == 1.0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, initial[name]), name


def test_online_config_rejects_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        online_config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="precompute_ref_logps"):
        online_config(tmp_path, precompute_ref_logps=True)


def test_online_cli_trains_and_saves(tmp_path, model_dir, capsys):
    """`grouppo online` end to end: prompt records from a file, a reward by import path, a saved model."""
    from grouppo.load import write_jsonl

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    write_jsonl(PROMPTS, prompts)
    argv = [
        "online",
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(prompts),
        "--reward_funcs",
        "test_online:length_reward",
        "--num_generations",
        "4",
        "--max_new_tokens",
        "6",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "1",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
    ]
    assert main(argv) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    assert_trained(out, model_dir)


def test_progress_bars_are_opt_in(tmp_path, tokenizer, capsys, monkeypatch):
    """Commands turn the generator's and the rollout's progress on (stderr: count, rate, time left);
    online training steps, which generate at every step, leave it off. In a terminal it is a tqdm bar;
    redirected to a file, plain lines without carriage returns or cursor moves."""
    import grouppo.environment
    from grouppo.generation import SamplingConfig, TransformersGenerator
    from grouppo.online.rollout import rollout_dataset

    assert SamplingConfig().progress is False
    assert online_config(tmp_path).sampling().progress is False
    model = tiny_llama(tokenizer, seed=0)
    quiet = TransformersGenerator(model, tokenizer, SamplingConfig(max_new_tokens=3, batch_size=4))
    quiet.generate(["a", "b"], 3)
    assert capsys.readouterr().err == ""
    shown = SamplingConfig(max_new_tokens=3, batch_size=4, progress=True)
    loud = TransformersGenerator(model, tokenizer, shown)
    loud.generate(["a", "b"], 3)
    err = capsys.readouterr().err  # pytest's capture is not a terminal: log lines
    assert err.startswith("generating: 6/6 seq (") and "\r" not in err and "\x1b" not in err
    groups, stats = rollout_dataset(
        FixedGenerator(["cba", "c"]), length_reward, PROMPTS, 2, tokenizer, prompts_per_call=3, progress=True
    )
    err = capsys.readouterr().err
    assert err.startswith("sampling: 4/4 prompt (") and f"groups={stats.groups}" in err
    monkeypatch.setattr(grouppo.environment, "interactive", lambda: True)
    loud.generate(["a", "b"], 3)
    err = capsys.readouterr().err
    assert "generating: 100%" in err and "6/6 [" in err and "seq" in err


def test_generator_state_resumes_the_sampling_sequence(tokenizer):
    from grouppo.generation import SamplingConfig, TransformersGenerator

    model = tiny_llama(tokenizer, seed=0)
    config = SamplingConfig(max_new_tokens=5, seed=3)
    first = TransformersGenerator(model, tokenizer, config)
    first.generate(["abc"], 4)
    state = first.state_dict()
    expected = first.generate(["abc"], 4)
    resumed = TransformersGenerator(model, tokenizer, config)
    resumed.load_state_dict(state)
    assert resumed.generate(["abc"], 4) == expected
    assert TransformersGenerator(model, tokenizer, config).generate(["abc"], 4) != expected  # call 0's seeds


def nan_reward(prompts, completions, **_):
    return [float("nan")] * len(completions)


def test_a_reward_that_is_never_finite_stops_the_run_and_nothing_is_saved(tmp_path, tokenizer):
    from grouppo.online.rewards import RewardError

    trainer = OnlineGroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        reward_funcs=nan_reward,
        args=online_config(tmp_path, max_steps=6, max_reward_failures=2, logging_steps=1),
        train_dataset=PROMPTS,
        processing_class=tokenizer,
    )
    with pytest.raises(RewardError, match="2 steps in a row without a usable reward .*'nan_reward' gave no "
                       "finite value to any group \\(e.g. nan"):  # fmt: skip
        trainer.train()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_step_whose_reward_fails_is_skipped_counted_and_logged(tmp_path, tokenizer):
    calls = {"n": 0}

    def flaky(prompts, completions, target, **_):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the judge timed out")
        return length_reward(prompts, completions, target)

    initial = tiny_llama(tokenizer, seed=0).state_dict()
    trainer = OnlineGroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        reward_funcs=flaky,
        args=online_config(tmp_path, max_steps=2, logging_steps=1),
        train_dataset=PROMPTS,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "online/reward_failures" in h]
    assert [h["online/reward_failures"] for h in logged] == [1.0, 0.0]
    assert "online/nonfinite_reward_groups" in logged[-1]
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())


def test_online_logs_trls_dashboard_keys(tmp_path, tokenizer):
    """An online step logs what TRL's online trainers log for the same quantities (rewards per function,
    completion lengths, the share of groups whose rewards are all equal, tokens read) beside DPO's and
    grouppo's group metrics; generation stops at ``max_completion_length``."""

    def short(prompts, completions, **_):
        return [float(len(c) < 4) for c in completions]

    trainer = OnlineGroupDPOTrainer(
        tiny_llama(tokenizer, seed=0),
        reward_funcs=[length_reward, short],
        args=online_config(tmp_path, max_new_tokens=None, max_completion_length=5, reward_weights=[1.0, 0.5]),
        train_dataset=PROMPTS[:2],
        processing_class=tokenizer,
    )
    trainer.train()
    log = trainer.state.log_history[0]
    lengths = trainer.generator.last_lengths
    assert len(lengths) == 8 and max(lengths) <= 5
    assert log["completions/mean_length"] == pytest.approx(sum(lengths) / 8)
    assert log["completions/max_length"] == max(lengths) and log["completions/min_length"] == min(lengths)
    assert log["completions/clipped_ratio"] == sum(trainer.generator.last_clipped) / 8
    components = trainer.reward.last_components
    mean = sum(components["length_reward"]) / 8
    assert log["rewards/length_reward/mean"] == pytest.approx(mean)
    assert log["rewards/short/mean"] == pytest.approx(sum(components["short"]) / 8)
    combined = [a + 0.5 * b for a, b in zip(components["length_reward"], components["short"], strict=True)]
    assert log["reward"] == pytest.approx(sum(combined) / 8)
    assert log["reward_std"] == pytest.approx(torch.tensor(combined, dtype=torch.float64).std().item())
    assert 0 <= log["frac_reward_zero_std"] <= 1 and log["num_tokens"] > 0
    assert {"rewards/chosen", "logps/chosen", "logits/chosen", "logits/rejected", "group/pair_accuracy",
            "group/top1_accuracy"} <= set(log)  # fmt: skip
