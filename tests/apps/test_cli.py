"""The ``grouppo`` command line as a user meets it: help, --version, one spelling of the model, data and
output options across commands, every documented command, YAML configs read as the same flags, the
evaluation split, and resuming from the latest checkpoint."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grouppo
from grouppo import GroupDPOConfig
from grouppo.apps import bench, demo, quickstart
from grouppo.apps.cli import COMMANDS, main
from grouppo.apps.cli import data as data_command
from grouppo.apps.cli import evaluate as eval_command
from grouppo.apps.cli.sampling import generate_parser, sample_parser
from grouppo.apps.cli.train import parse_training_arguments, training_data, training_parser
from grouppo.embedded.synthetic import reversal_groups, tiny_llama
from grouppo.load import write_jsonl

REPO = Path(__file__).resolve().parents[2]
GROUPS = reversal_groups(12, group_size=4, seed=3)


# ------------------------------------------------------------------------------------------ help, version
def test_top_level_help_goes_to_stdout_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command, (_, help) in COMMANDS.items():
        assert re.search(rf"\n\s+{command}\s", out) and help.split()[0] in out, command
    assert main([]) == 2  # no command: the same help, on stdout
    assert "usage: grouppo" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"grouppo {grouppo.__version__}"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert not captured.out and "usage: grouppo" in captured.err and "invalid choice: 'trian'" in captured.err


@pytest.mark.parametrize(
    "argv,shown",
    [
        (["sample", "--help"], ["--num_generations NUM_GENERATIONS", "(default: 4)", "--dataset_name"]),
        (["groupdpo", "--help"], ["--beta BETA", "(default: 0.1)", "--config", "--resume_from_checkpoint"]),
        (["eval", "ifeval", "--help"], ["--max_new_tokens MAX_NEW_TOKENS", "(default: 384)", "--limit"]),
        (["eval", "--help"], ["{ifeval,ifbench,gdpo,compare}", "compare two models"]),
        (["bench", "steps", "--help"], ["--group_sizes", "(default: [2, 8, 32])"]),
        (["bench", "--help"], ["{steps,memory,generation,precision}"]),
    ],
)
def test_command_help_shows_the_defaults_on_stdout(argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help wraps lines
    for text in shown:
        assert text in out, text


# ------------------------------------------------------------------------------------- one naming scheme
SPELLINGS = [  # (parser, argv): the model, data and output options are spelled alike in every command
    (sample_parser, ["--model_name_or_path", "M", "--dataset_name", "p.jsonl", "--output_dir", "o.jsonl"]),
    (eval_command.build_parser, ["ifeval", "--model_name_or_path", "M", "--dataset_name", "p.jsonl"]),
    (generate_parser, ["--model_name_or_path", "M", "--dataset_name", "b.jsonl", "--output_dir", "g.jsonl"]),
    (eval_command.build_parser, ["gdpo", "--model_name_or_path", "M", "--dataset_name", "b.jsonl"]),
    (quickstart.build_parser, ["--model_name_or_path", "M", "--output_dir", "run"]),
    (demo.build_parser, ["--output_dir", "run"]),
]


@pytest.mark.parametrize(
    "build,argv", SPELLINGS, ids=["sample", "eval", "generate", "eval-gdpo", "quickstart", "demo"]
)
def test_one_spelling_of_the_model_data_and_output_options(build, argv):
    parsed = vars(build().parse_args(argv))
    given = dict(zip(argv[1::2] if argv[0] in ("ifeval", "gdpo") else argv[::2],
                     argv[2::2] if argv[0] in ("ifeval", "gdpo") else argv[1::2], strict=True))  # fmt: skip
    for flag, value in given.items():
        assert parsed[flag[2:]] == value, flag
    with pytest.raises(SystemExit):  # the older spellings are gone
        build().parse_args([a.replace("--model_name_or_path", "--model") for a in argv] + ["--model"])


def length_reward(prompts, completions, **_):
    return [-abs(len(c) - 3) for c in completions]


@pytest.mark.slow
def test_sample_and_eval_run(tmp_path, model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": f"Reverse the word:\n{w}\n"} for w in ("abc", "fgj", "qxz")], prompts)
    out = tmp_path / "sampled"  # a folder: receives groups.jsonl
    argv = ["sample", "--model_name_or_path", str(model_dir), "--dataset_name", str(prompts),
            "--output_dir", str(out), "--num_generations", "4", "--max_new_tokens", "6",
            "--reward_funcs", "test_cli:length_reward"]  # fmt: skip
    assert main(argv) == 0
    groups = [json.loads(line) for line in (out / "groups.jsonl").read_text().splitlines()]
    assert groups and all(len(g["responses"]) == len(g["scores"]) for g in groups)
    bar = capsys.readouterr().err  # the prompts sampled, with rate (a log line: stderr is captured)
    assert re.search(r"^sampling: 3/3 prompt \([0-9.]+ prompt/s, [0-9]+ s, groups=[0-9]+\)$", bar, re.M), bar
    metrics = tmp_path / "m.json"
    argv = ["eval", "ifeval", "--model_name_or_path", str(model_dir), "--limit", "2", "--max_new_tokens", "4",
            "--json", str(metrics)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(metrics.read_text())["num_prompts"] == 2
    assert re.search(r"^generating: 2/2 seq \(", capsys.readouterr().err, re.M)


def test_bench_runs(tmp_path, monkeypatch, capsys):
    # In this process (the memory-growth run measures nothing here): the options reach the run.
    from grouppo.apps.bench import memory

    def in_process(spec, timeout=None):
        return memory.run_backward_memory(spec)

    monkeypatch.setattr(memory, "measure_step_memory", in_process)
    tiny = ["--hidden", "16", "--intermediate", "32", "--layers", "1", "--heads", "2", "--kv_heads", "2",
            "--vocab", "64", "--prompt_len", "4", "--response_len", "3"]  # fmt: skip
    out = tmp_path / "memory"
    argv = ["bench", "memory", "--strategies", "coupled", "decoupled:1", "--group_sizes", "2", "3",
            "--output_dir", str(out), *tiny]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["group_size"], r["strategy"]) for r in rows] == [
        (2, "coupled"), (2, "decoupled:1"), (3, "coupled"), (3, "decoupled:1")
    ]  # fmt: skip
    assert {r["prompt_len"] for r in rows} == {4}
    assert "bench: 100%" in capsys.readouterr().err


# --------------------------------------------------------------------------- every documented command
def documented_commands():
    """``grouppo ...`` command lines of README.md, docs/*.md (code blocks) and the Makefile, as argv."""
    lines = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fenced = False
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif fenced:
                lines.append((path.name, line))
    make = (REPO / "Makefile").read_text().splitlines()
    lines += [("Makefile", line.replace("$(BIN)/", "")) for line in make if "$(BIN)/grouppo " in line]
    # Inline in docs/benchmarks.md's prose (over two lines there).
    lines.append(("benchmarks.md", "grouppo bench steps --strategies coupled decoupled:4 --find_max_k "
                  "--group_sizes 2 --hidden 1536 --intermediate 8960 --layers 28 --heads 12 --kv_heads 2 "
                  "--vocab 151936 --prompt_len 512 --response_len 512 --dtype bfloat16"))  # fmt: skip
    commands = []
    for where, line in lines:
        match = re.search(r"(?:^|\s|/)grouppo (\w.*)", line.split("#")[0])
        if match and not line.lstrip().startswith(("from ", "import ")):
            commands.append((where, shlex.split(match.group(1).replace("[", "").replace("]", ""))))
    return commands


def unparsed(argv):
    """What the command's parser leaves over of ``argv`` (it raises SystemExit on a bad option)."""
    command, rest = argv[0], argv[1:]
    if command in ("groupdpo", "online", "gdpo"):
        parser = training_parser(command)
    else:
        build = {"sample": sample_parser, "eval": eval_command.build_parser, "generate": generate_parser,
                 "data": data_command.build_parser, "demo": demo.build_parser, "bench": bench.build_parser,
                 "quickstart": quickstart.build_parser}  # fmt: skip
        parser = build[command]()
    return parser.parse_known_args(rest)[1]


def test_every_documented_command_still_parses():
    commands = documented_commands()
    assert len(commands) >= 20 and {argv[0] for _, argv in commands} >= {
        "quickstart", "groupdpo", "online", "gdpo", "sample", "eval", "generate", "data", "bench"
    }  # fmt: skip
    for where, argv in commands:
        assert unparsed(argv) == [], (where, argv)


# ------------------------------------------------------------------------------------ YAML as the flags
def test_yaml_values_reach_the_config_as_the_same_flags_would(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "dataset_name: d.jsonl\nbeta: 0.3\nlearning_rate: 1e-5\nsave_strategy: no\nreport_to: []\n"
        "lora_target_modules: [q_proj, v_proj]\nresponse_chunk_size: null\n"
        "model_init_kwargs: {dtype: float32}\nuse_peft: true\ndisable_dropout: false\nloss_type: sdpo\n"
        "num_train_epochs: 2\n"
    )
    out = str(tmp_path / "out")
    _, script, config, _ = parse_training_arguments(
        ["--config", str(cfg), "--output_dir", out, "--beta", "0.2"], "groupdpo"
    )
    assert config.beta == 0.2  # the flag over the YAML
    assert config.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as a string; as a flag it is a float
    assert config.save_strategy == "no"  # YAML's bare `no` is false: taken as the choice "no"
    assert config.report_to == [] and config.response_chunk_size is None
    assert config.model_init_kwargs == {"dtype": "float32"} and config.num_train_epochs == 2.0
    assert config.disable_dropout is False and config.loss_type == "sdpo" and config.output_dir == out
    assert script.use_peft is True and script.lora_target_modules == ["q_proj", "v_proj"]
    assert script.dataset_name == "d.jsonl"


def test_the_evaluation_split_comes_from_the_same_dataset_when_it_has_one(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"train": GROUPS[:6], "test": GROUPS[6:9]}))
    out = str(tmp_path / "out")
    common = ["--dataset_name", str(data), "--output_dir", out]
    _, script, config, _ = parse_training_arguments([*common, "--eval_strategy", "steps"], "groupdpo")
    train, evaluation = training_data(script, config)
    assert [g["prompt"] for g in train] == [g["prompt"] for g in GROUPS[:6]]
    assert [g["prompt"] for g in evaluation] == [g["prompt"] for g in GROUPS[6:9]]
    _, script, config, _ = parse_training_arguments(common, "groupdpo")  # evaluation off: none read
    assert training_data(script, config)[1] is None


# ---------------------------------------------------------------------------------------------- resuming
class Killed(Exception):
    """Stands for the process being killed in the middle of training."""


@pytest.mark.slow
def test_resume_from_checkpoint_true_continues_the_killed_run(tmp_path, model_dir, monkeypatch, capsys):
    from grouppo.groupdpo import GroupDPOTrainer

    data = tmp_path / "groups.jsonl"
    write_jsonl(GROUPS, data)

    def argv(name, *extra):
        return ["groupdpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
                "--output_dir", str(tmp_path / name), "--max_steps", "4",
                "--per_device_train_batch_size", "3", "--optim", "sgd", "--learning_rate", "0.5",
                "--save_strategy", "steps", "--save_steps", "1",
                "--report_to", "none", "--disable_tqdm", "true", *extra]  # fmt: skip

    assert main(argv("straight")) == 0
    step = GroupDPOTrainer.training_step
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        if kill_after is not None and self.state.global_step == kill_after:
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(GroupDPOTrainer, "training_step", counted)
    kill_after = 2  # killed in step 3, after checkpoint-2 was written
    with pytest.raises(Killed):
        main(["--debug", *argv("killed")])  # --debug: the exception itself, not its error line
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (killed / "model.safetensors").exists()
    calls.clear()
    kill_after = None
    assert main(argv("killed", "--resume_from_checkpoint", "true")) == 0
    assert calls == [2, 3]  # only the two steps left were trained
    assert f"resuming from {killed / 'checkpoint-2'}" in capsys.readouterr().out
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    initial = load_file(model_dir / "model.safetensors")
    assert max((straight[k] - initial[k]).abs().max() for k in initial) > 1e-3  # training moved the weights
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_the_program_exits_with_its_code_after_the_exit_handlers_and_with_its_output(tmp_path, world_size):
    """``grouppo`` as a launcher's process (``WORLD_SIZE`` 2) ends without the interpreter's teardown,
    with ``os._exit``: the exit code, the buffered output and the ``atexit`` handlers (loggers, trackers)
    must survive that, as they do in a plain run."""
    import os
    import subprocess
    import sys

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_jsonl([{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}], good)
    write_jsonl([{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.0]}], bad)
    script = (
        "import atexit, sys\n"
        "atexit.register(print, 'exit handler ran')\n"
        "from grouppo.apps.cli import run\n"
        "sys.argv = ['grouppo', 'data', 'validate', sys.argv[1], '--skip_invalid']\n"
        "run()\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size}
    for data, code in ((good, 0), (bad, 1)):
        done = subprocess.run([sys.executable, "-c", script, str(data)], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == code, done.stderr[-2000:]
        assert "group" in done.stdout and done.stdout.rstrip().endswith("exit handler ran"), done.stdout


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


# ------------------------------------------------------------------- TRL's options, walked one by one
TRL_VALUES = {  # a value other than the default for every TRL option grouppo takes, and where it lands
    "trust_remote_code": (["true"], "script", True),
    "precompute_ref_batch_size": (["3"], "config", 3),
    "loss_weights": (["1.0", "0.5", "--loss_type", "sigmoid", "sft"], "config", [1.0, 0.5]),
    "label_smoothing": (["0.1"], "config", 0.1),
    "pad_token": (["<|pad|>"], "config", "<|pad|>"),
    "model_init_kwargs": (['{"attn_implementation": "eager"}'], "config", {"attn_implementation": "eager"}),
    "disable_dropout": (["false"], "config", False),
    "max_length": (["77"], "config", 77),
    "precompute_ref_log_probs": ([], "config", True),  # a bare flag, as TRL takes it
    "loss_type": (["sigmoid", "sft"], "config", "all_pairs"),
    "beta": (["0.3"], "config", 0.3),
    "model_name_or_path": (["some/model"], "script", "some/model"),
    "model_revision": (["v1"], "script", "v1"),
    "dtype": (["bfloat16"], "script", "bfloat16"),
    "attn_implementation": (["eager"], "script", "eager"),
    "use_peft": (["true"], "script", True),
    "lora_r": (["4"], "script", 4),
    "lora_alpha": (["8"], "script", 8),
    "lora_dropout": (["0.1"], "script", 0.1),
    "lora_target_modules": (["q_proj", "v_proj"], "script", ["q_proj", "v_proj"]),
    "lora_modules_to_save": (["lm_head"], "script", ["lm_head"]),
    "lora_task_type": (["CAUSAL_LM"], "script", "CAUSAL_LM"),
    "use_rslora": (["true"], "script", True),
    "use_dora": (["true"], "script", True),
}


def test_every_trl_dpo_and_model_option_is_taken_or_refused_with_a_reason(tmp_path, capsys):
    """Each field TRL's DPOConfig adds to TrainingArguments, and each of its ModelConfig, given to
    ``grouppo groupdpo``: taken (its value reaches the config or the script arguments) or refused by
    name with the reason; none is dropped in silence."""
    import dataclasses

    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    from grouppo.apps.cli.arguments import REFUSED

    shared = {f.name for f in dataclasses.fields(TrainingArguments)}
    names = [f.name for f in dataclasses.fields(trl.DPOConfig) if f.name not in shared]
    names += [f.name for f in dataclasses.fields(trl.ModelConfig)]
    counts = {"taken": 0, "refused": 0}
    for name in dict.fromkeys(names):
        assert name in TRL_VALUES or name in REFUSED, f"--{name} is neither taken nor refused"
        if name in REFUSED:
            with pytest.raises(SystemExit):
                parse_training_arguments(["--dataset_name", "d.jsonl", f"--{name}", "1"], "groupdpo")
            err = capsys.readouterr().err
            assert f"--{name}: not supported by grouppo: {REFUSED[name]}" in err, name
            counts["refused"] += 1
            continue
        given, where, expected = TRL_VALUES[name]
        argv = ["--dataset_name", "d.jsonl", "--output_dir", str(tmp_path), f"--{name}", *given]
        _, script, config, _ = parse_training_arguments(argv, "groupdpo")
        assert getattr(script if where == "script" else config, name) == expected, name
        counts["taken"] += 1
    assert (
        counts["taken"] == len([n for n in dict.fromkeys(names) if n in TRL_VALUES])
        and counts["refused"] >= 15
    )


def test_trls_loss_lists_and_label_smoothing_mean_what_they_mean_in_trl(tmp_path):
    _, _, config, _ = parse_training_arguments(
        ["--dataset_name", "d", "--output_dir", str(tmp_path), "--loss_type", "sigmoid", "sft",
         "--loss_weights", "1.0", "0.3"], "groupdpo"
    )  # fmt: skip
    assert config.loss_type == "all_pairs" and config.nll_weight == 0.3 and config.preference_weight == 1.0
    with pytest.raises(SystemExit):
        parse_training_arguments(["--dataset_name", "d", "--loss_type", "sigmoid", "ipo"], "groupdpo")
    with pytest.raises(SystemExit):  # conservative DPO is a pairwise loss
        parse_training_arguments(["--dataset_name", "d", "--loss_type", "sdpo", "--label_smoothing", "0.2"],
                                 "groupdpo")  # fmt: skip


def test_trls_online_sampling_flags_mean_what_they_mean_in_trl(tmp_path, capsys):
    """``max_completion_length`` caps generation (``max_new_tokens`` is its other name), the sampling
    options reach the generator, TRL's options for reusing a generation are refused by name, and a
    prefix of an option is not taken for the option."""
    base = ["--dataset_name", "p.jsonl", "--reward_funcs", "ifeval", "--output_dir", str(tmp_path)]
    _, _, config, _ = parse_training_arguments(
        [*base, "--max_completion_length", "16", "--top_k", "5", "--min_p", "0.1", "--repetition_penalty",
         "1.1", "--temperature", "0.7", "--top_p", "0.9"], "online"
    )  # fmt: skip
    sampling = config.sampling()
    assert (sampling.max_new_tokens, sampling.top_k, sampling.min_p) == (16, 5, 0.1)
    assert (sampling.repetition_penalty, sampling.temperature, sampling.top_p) == (1.1, 0.7, 0.9)
    _, _, config, _ = parse_training_arguments([*base, "--max_new_tokens", "7"], "online")
    assert config.max_completion_length == config.sampling().max_new_tokens == 7
    assert parse_training_arguments(base, "online")[2].sampling().max_new_tokens == 256  # the default
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_training_arguments([*base, "--max_new_tokens", "7", "--max_completion_length", "9"], "online")
    assert "two names of one option" in capsys.readouterr().err
    for name in ("steps_per_generation", "num_iterations", "use_vllm"):
        with pytest.raises(SystemExit):
            parse_training_arguments([*base, f"--{name}", "2"], "online")
        assert f"--{name}: not supported by grouppo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_training_arguments([*base, "--label_smooth", "0.1"], "groupdpo")
    assert "--label_smooth" in capsys.readouterr().err
