"""The main job (``grouppo quickstart``) end to end on a tiny model: evaluate, sample, train, evaluate, and
the run directory it promises."""

import json

import pytest
from conftest import recompute_metrics

from grouppo.apps.cli import main
from grouppo.apps.quickstart import METRICS
from grouppo.embedded.synthetic import tiny_llama


def length_reward(prompts, completions, **_):
    """Varies between the tiny model's samples, so groups carry a preference (IFEval checks rarely do)."""
    return [-abs(len(c) - 12) for c in completions]


@pytest.mark.slow
def test_quickstart_writes_the_promised_run_directory(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    argv = [
        "quickstart",
        "--output_dir",
        str(out),
        "--model_name_or_path",
        str(model_dir),
        "--train_prompts",
        "6",
        "--eval_prompts",
        "3",
        "--ifbench_prompts",
        "2",
        "--max_completion_length",
        "8",
        "--eval_max_new_tokens",
        "8",
        "--reward_funcs",
        "test_quickstart:length_reward",
        "--learning_rate",
        "0.01",
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = (out / "summary.md").read_text()
    for when in ("before", "after"):
        assert set(metrics[when]) == {"ifeval", "ifbench"}
        assert metrics[when]["ifeval"]["num_prompts"] == 3 and metrics[when]["ifbench"]["num_prompts"] == 2
        for benchmark in ("ifeval", "ifbench"):
            # The saved generations' per-instruction checks give the reported metrics.
            saved = (out / "eval" / f"{when}_{benchmark}.jsonl").read_text()
            rows = [json.loads(line) for line in saved.splitlines()]
            assert len(rows) == metrics[when][benchmark]["num_prompts"]
            expected = recompute_metrics(rows)
            assert {k: metrics[when][benchmark][k] for k in expected} == pytest.approx(expected, abs=1e-12)
    for benchmark in ("ifeval", "ifbench"):  # and summary.md tabulates them, before and after
        for m in METRICS:
            b, a = metrics["before"][benchmark][m], metrics["after"][benchmark][m]
            change = metrics["changes"][benchmark][m]
            assert change["difference"] == pytest.approx(a - b)
            low, high = change["interval"]
            line = next(row for row in summary.splitlines() if row.startswith(f"| {benchmark} | {m} |"))
            assert f"| {b:.3f} [" in line and f"| {a:.3f} [" in line
            assert f"| {a - b:+.3f} [{low:+.3f}, {high:+.3f}] |" in line
            assert ("includes 0" in line) == (low <= 0 <= high)
    assert any("loss" in row for row in metrics["train_history"])
    groups = [json.loads(line) for line in (out / "groups.jsonl").read_text().splitlines()]
    assert groups and all(len(g["responses"]) == len(g["scores"]) >= 2 for g in groups)
    # The run records what a report of it quotes: each phase's seconds and what sampling kept.
    assert metrics["sampling"]["prompts"] == 6 and metrics["sampling"]["groups"] == len(groups)
    phases = metrics["phase_seconds"]
    assert len(phases) == 4 and min(phases.values()) >= 0
    assert sum(phases.values()) <= metrics["seconds"] + 0.2  # the run, less loading; each rounded to 0.1 s
    for name in (
        "summary.md",
        "plots.png",
        "model/config.json",
        "eval/before_ifeval.jsonl",
        "eval/after_ifbench.jsonl",
        "train_prompts.jsonl",
    ):
        assert (out / name).is_file(), name
    assert "| ifeval | prompt_level_strict |" in capsys.readouterr().out


@pytest.mark.slow
def test_quickstart_online_samples_from_the_policy_as_it_trains(tmp_path, tokenizer):
    """``--mode online``: no sampling phase before training; the trainer samples and scores at each step."""
    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    argv = ["quickstart", "--mode", "online", "--output_dir", str(out)]
    argv += ["--model_name_or_path", str(model_dir)]
    argv += ["--train_prompts", "4", "--eval_prompts", "2", "--ifbench_prompts", "1"]
    argv += ["--max_completion_length", "8", "--eval_max_new_tokens", "8"]
    argv += ["--reward_funcs", "test_quickstart:length_reward", "--learning_rate", "0.01"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["phase_seconds"]) == [
        "evaluate before training", "train (online GroupDPO)", "evaluate after training"
    ]  # fmt: skip
    assert metrics["sampling"] == {} and not (out / "groups.jsonl").exists()
    steps = [h for h in metrics["train_history"] if "loss" in h]
    assert steps and all("reward" in h for h in steps)  # rewards of the policy's own samples, each step
    assert metrics["after"]["ifeval"]["num_prompts"] == 2 and (out / "model" / "config.json").is_file()


@pytest.mark.parametrize("setting", ["auto", "bfloat16", "float32"])
def test_training_dtype_turns_bfloat16_autocast_on_by_the_hardware(tmp_path, setting):
    """auto: bfloat16 autocast (float32 master weights) where the hardware computes bfloat16 natively."""
    import torch

    from grouppo.apps.quickstart import QuickstartConfig, train_config
    from grouppo.generation import bfloat16_is_native

    args = train_config(QuickstartConfig(training_dtype=setting), tmp_path, online=False)
    native = bfloat16_is_native(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert args.bf16 == {"auto": native, "bfloat16": True, "float32": False}[setting]
