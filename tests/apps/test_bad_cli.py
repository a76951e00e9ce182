"""Bad input to the command line: each is an error that names what is wrong and where, reported before
any model loads (the model path given is one that does not exist: it is never read), and nothing is left
half written (no model files in output_dir)."""

import json

import pytest

from grouppo.apps.cli import main
from grouppo.embedded.opinions import make_opinions
from grouppo.embedded.synthetic import reversal_groups, tiny_llama
from grouppo.load import write_jsonl

GROUPS = reversal_groups(6, group_size=4, seed=3)
MODEL_FILES = ("config.json", "model.safetensors", "adapter_model.safetensors", "training_args.bin")


@pytest.fixture
def paths(tmp_path):
    """Valid group data, an output_dir not created yet and a model path that does not exist."""
    data = tmp_path / "groups.jsonl"
    write_jsonl(GROUPS, data)
    return {"data": data, "out": tmp_path / "out", "model": tmp_path / "no-such-model"}


def assert_nothing_written(out):
    written = [p for p in out.rglob("*") if p.name in MODEL_FILES or p.name.startswith("checkpoint-")]
    assert not written, written


def train(paths, *extra):
    """The model (never there) and output_dir options."""
    return ["--model_name_or_path", str(paths["model"]), "--output_dir", str(paths["out"]), *extra]


def usage_error(argv, capsys):
    """Run ``argv``, which must be refused as argparse refuses a bad option: exit 2, usage on stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: grouppo" in err
    return err


def error(argv, capsys):
    """Run ``argv``, which must fail as a data or setup problem: exit 1, ``error: ...`` on stderr, no
    traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------- --config
def test_yaml_that_is_not_a_mapping(paths, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("- beta: 0.1\n- learning_rate: 1e-6\n")
    err = usage_error(
        ["groupdpo", "--config", str(cfg), "--dataset_name", str(paths["data"]), *train(paths)], capsys
    )
    assert f"{cfg}: expected a mapping of option names to values" in err and "got a list" in err
    assert not paths["out"].exists()


def test_yaml_unknown_key(paths, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset_name: {paths['data']}\nbetaa: 0.1\n")
    err = usage_error(["groupdpo", "--config", str(cfg), *train(paths)], capsys)
    assert f"{cfg}: unknown key 'betaa' (did you mean 'beta'?)" in err
    assert not paths["out"].exists()


@pytest.mark.parametrize(
    "line,key,shown,expected,flag",
    [
        ("beta: [1, 2]", "beta", "[1, 2] (a list)", "a number", ["--beta", "1", "2"]),
        (
            "per_device_train_batch_size: 2.5",
            "per_device_train_batch_size",
            "2.5 (a number)",
            "an integer",
            ["--per_device_train_batch_size", "2.5"],
        ),
        (
            'learning_rate: "fast"',
            "learning_rate",
            "'fast' (a string)",
            "a number",
            ["--learning_rate", "fast"],
        ),
    ],
)
def test_yaml_value_of_the_wrong_type(paths, tmp_path, capsys, line, key, shown, expected, flag):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset_name: {paths['data']}\n{line}\n")
    err = usage_error(["groupdpo", "--config", str(cfg), *train(paths)], capsys)
    assert f"{cfg}: key {key!r} has the value {shown}; expected {expected}" in err
    # ... as the same value given as a flag is refused.
    flagged = usage_error(["groupdpo", "--dataset_name", str(paths["data"]), *train(paths), *flag], capsys)
    assert f"argument --{key}" in flagged or "unrecognized arguments: 2" in flagged
    assert not paths["out"].exists()


# ------------------------------------------------------------------------------------------ output_dir
def test_unwritable_output_dir(paths, tmp_path, capsys):
    blocker = tmp_path / "a-file"  # tests run as root, which chmod does not stop: a file in the way does
    blocker.write_text("not a folder\n")
    paths["out"] = blocker / "out"
    err = error(["groupdpo", "--dataset_name", str(paths["data"]), *train(paths)], capsys)
    assert f"output_dir {str(paths['out'])!r} cannot be written" in err
    assert blocker.read_text() == "not a folder\n"
    # where sampled groups would go is checked as well, before the model loads and sampling starts
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": "Say hi."}], prompts)
    err = error(
        [
            "sample",
            "--dataset_name",
            str(prompts),
            "--output_dir",
            str(blocker / "groups.jsonl"),
            "--model_name_or_path",
            str(paths["model"]),
        ],
        capsys,
    )
    assert f"{str(blocker)!r} cannot be written" in err and "no-such-model" not in err


def test_missing_dataset_name(paths, capsys):
    err = usage_error(["groupdpo", *train(paths)], capsys)
    assert "--dataset_name is required" in err
    assert not paths["out"].exists()
    # online training needs its rewards as well
    err = usage_error(["online", "--dataset_name", str(paths["data"]), *train(paths)], capsys)
    assert "--reward_funcs is required" in err
    assert not paths["out"].exists()


# ------------------------------------------------------------------------------------------------- data
def _bad_data(kind, tmp_path):
    """(data file, what the error must name) for a data error in each training command's data."""
    path = tmp_path / "data.jsonl"
    if kind == "groupdpo-json":
        path.write_text(json.dumps(GROUPS[0]) + "\n" + '{"prompt": "p", "responses": ["a"\n')
        return path, [f"{path}: line 2: not valid JSON"]
    if kind == "groupdpo-field":
        write_jsonl([GROUPS[0], {**GROUPS[1], "scores": [1.0]}], path)
        return path, [f"{path}: line 2", "'scores'"]
    if kind == "online":
        write_jsonl([{"prompt": "Say hi."}, {"instruction": "no prompt here"}], path)
        return path, [f"{path}: line 2", "'prompt'"]
    record = make_opinions(seed=0)["train"][0]
    write_jsonl([record, {**record, "distribution": [0.5, 0.2, 0.1, 0.1]}], path)
    return path, [f"{path}: line 2", "'distribution'"]


@pytest.mark.parametrize("kind", ["groupdpo-json", "groupdpo-field", "online", "gdpo"])
def test_data_error_is_reported_before_the_model_loads(paths, tmp_path, capsys, kind):
    data, named = _bad_data(kind, tmp_path)
    command = kind.split("-")[0]
    extra = ["--reward_funcs", "ifeval"] if command == "online" else []
    err = error([command, "--dataset_name", str(data), *train(paths), *extra], capsys)
    for text in named:
        assert text in err, (text, err)
    assert "no-such-model" not in err  # the model was never read
    assert_nothing_written(paths["out"])


@pytest.mark.parametrize("command", ["sample", "eval", "generate"])
def test_data_error_of_sampling_commands_comes_before_the_model(tmp_path, capsys, command):
    data = tmp_path / "data.jsonl"
    write_jsonl([{"prompt": "Say hi.", "instruction_id_list": [], "kwargs": []}, {"prompt": ""}], data)
    argv = {
        "sample": ["sample", "--dataset_name", str(data), "--output_dir", str(tmp_path / "g.jsonl")],
        "eval": ["eval", "ifeval", "--dataset_name", str(data)],
        "generate": ["generate", "--dataset_name", str(data), "--output_dir", str(tmp_path / "g.jsonl")],
    }[command]
    err = error([*argv, "--model_name_or_path", str(tmp_path / "no-such-model")], capsys)
    assert f"{data}: line " in err and "no-such-model" not in err
    assert not (tmp_path / "g.jsonl").exists()


# ---------------------------------------------------------------------------------------------- resuming
def test_resume_from_checkpoint_true_without_a_checkpoint(paths, capsys):
    paths["out"].mkdir()
    (paths["out"] / "notes.txt").write_text("an earlier run's notes\n")
    argv = [
        "groupdpo",
        "--dataset_name",
        str(paths["data"]),
        *train(paths),
        "--resume_from_checkpoint",
        "true",
    ]
    err = error(argv, capsys)
    assert f"output_dir {str(paths['out'])!r} holds no complete checkpoint-N folder" in err
    assert "no-such-model" not in err
    assert_nothing_written(paths["out"])


def test_resume_from_a_checkpoint_folder_that_is_not_there(paths, capsys):
    missing = paths["out"] / "checkpoint-7"
    argv = [
        "groupdpo",
        "--dataset_name",
        str(paths["data"]),
        *train(paths),
        "--resume_from_checkpoint",
        str(missing),
    ]
    err = error(argv, capsys)
    assert f"--resume_from_checkpoint {missing}: no such checkpoint folder" in err
    assert_nothing_written(paths["out"])


# ------------------------------------------------------------------------------------------ data validate
def test_validate_exits_1_when_nothing_is_usable(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl(
        [
            {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.0]},
            {"prompt": "q", "responses": ["a"], "scores": [0.0]},
        ],
        data,
    )
    assert main(["data", "validate", str(data), "--skip_invalid"]) == 1
    captured = capsys.readouterr()
    assert f"error: {data}: nothing usable" in captured.err
    assert captured.out  # the summary says what was skipped and why
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "validate", str(empty)]) == 1
    assert f"error: {empty}: nothing usable" in capsys.readouterr().err


def test_validate_reads_belief_records(tmp_path, capsys):
    data = tmp_path / "beliefs.jsonl"
    write_jsonl(make_opinions(seed=0)["train"][:6], data)
    assert main(["data", "validate", str(data)]) == 0
    assert "belief" in capsys.readouterr().out.lower()


def test_quickstart_refuses_a_reward_it_cannot_load_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    err = usage_error(
        [
            "quickstart",
            "--model_name_or_path",
            str(tmp_path / "no-such-model"),
            "--output_dir",
            str(out),
            "--reward_funcs",
            "no_such_module:reward",
        ],
        capsys,
    )
    assert "reward 'no_such_module:reward': cannot import module 'no_such_module'" in err
    assert "no-such-model" not in err and not out.exists()


def test_quickstart_refuses_an_unknown_training_dtype_before_the_model_loads(tmp_path, capsys):
    argv = [
        "quickstart",
        "--model_name_or_path",
        str(tmp_path / "no-such-model"),
        "--output_dir",
        str(tmp_path / "run"),
        "--training_dtype",
        "float8",
    ]
    err = usage_error(argv, capsys)
    assert "training_dtype must be auto, bfloat16 or float32, got 'float8'" in err


# --------------------------------------------------------------------------- after the first run
@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_data_with_no_records_is_named(paths, tmp_path, capsys, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    err = error(["groupdpo", "--dataset_name", str(data), *train(paths)], capsys)
    assert str(data) in err and "no records" in err
    assert_nothing_written(paths["out"])


def test_every_prompt_longer_than_max_length_is_named(paths, tmp_path, capsys, tokenizer):
    model = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    paths["model"] = model
    capsys.readouterr()  # the setup's own output
    err = error(
        ["groupdpo", "--dataset_name", str(paths["data"]), *train(paths), "--max_length", "4"], capsys
    )
    assert f"{paths['data']}: no trainable group left: every prompt fills max_length=4" in err
    assert_nothing_written(paths["out"])


@pytest.mark.parametrize("broken", ["no config", "truncated weights", "a file", "damaged tokenizer"])
def test_a_model_that_cannot_be_loaded_is_named(paths, tmp_path, capsys, tokenizer, broken):
    model = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    if broken == "no config":
        (model / "config.json").unlink()
        expected = f"model folder {str(model)!r} holds no config.json"
    elif broken == "truncated weights":
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        expected = f"cannot load the model {str(model)!r}: SafetensorError"
    elif broken == "damaged tokenizer":
        (model / "tokenizer.json").write_text("{}")  # valid JSON, not a tokenizer: a KeyError inside
        expected = f"cannot load the tokenizer of {str(model)!r}: KeyError"
    else:
        model = tmp_path / "model.bin"
        model.write_text("not a model\n")
        expected = f"model {str(model)!r} is a file"
    paths["model"] = model
    capsys.readouterr()  # the setup's own output
    err = error(["groupdpo", "--dataset_name", str(paths["data"]), *train(paths)], capsys)
    assert expected in err and err.count("\n") == 1  # one line
    assert_nothing_written(paths["out"])


def test_a_reward_that_cannot_be_imported_is_named_before_the_model_loads(paths, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": "Say hi."}], prompts)
    err = error(
        ["online", "--dataset_name", str(prompts), *train(paths), "--reward_funcs", "no_such_module:f"],
        capsys,
    )
    assert (
        "reward 'no_such_module:f': cannot import module 'no_such_module'" in err
        and "no-such-model" not in err
    )
    assert_nothing_written(paths["out"])


def test_a_report_to_integration_that_is_not_installed_is_refused_before_the_model_loads(paths, capsys):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    err = error(
        ["groupdpo", "--dataset_name", str(paths["data"]), *train(paths), "--report_to", "tensorboard"],
        capsys,
    )
    assert "--report_to tensorboard: not installed; install it (pip install tensorboard)" in err
    assert "no-such-model" not in err and not paths["out"].exists()


def test_an_output_dir_held_by_a_live_run_is_refused_with_its_pid(paths, tmp_path, capsys, tokenizer):
    import os
    import subprocess
    import sys

    model = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    paths["model"] = model
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        paths["out"].mkdir()
        capsys.readouterr()  # the setup's own output
        (paths["out"] / ".grouppo.lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "earlier"})
        )
        err = error(
            ["groupdpo", "--dataset_name", str(paths["data"]), *train(paths), "--max_steps", "1"], capsys
        )
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by another run: pid {holder.pid}" in err
    assert_nothing_written(paths["out"])


def test_an_interrupted_run_exits_with_the_signal_and_prints_the_command_that_resumes(
    paths, capsys, monkeypatch
):
    from grouppo.groupdpo import GroupDPOTrainer
    from grouppo.runs import TrainingInterrupted

    def interrupted(self, *args, **kwargs):
        raise TrainingInterrupted(
            "training stopped by SIGTERM at step 3; checkpoint saved to out/checkpoint-3",
            15,
            "out/checkpoint-3",
        )

    monkeypatch.setattr(GroupDPOTrainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(GroupDPOTrainer, "describe_setup", lambda self: "stand-in", raising=False)
    monkeypatch.setattr(GroupDPOTrainer, "train", interrupted)
    argv = ["groupdpo", "--dataset_name", str(paths["data"]), *train(paths)]
    assert main(argv) == 128 + 15
    err = capsys.readouterr().err
    assert "error: training stopped by SIGTERM at step 3" in err
    assert f"resume with: grouppo groupdpo --dataset_name {paths['data']}" in err
    assert err.rstrip().endswith("--resume_from_checkpoint true")


def test_resume_from_an_incomplete_checkpoint_folder_is_refused(paths, capsys):
    folder = paths["out"] / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a save cut short: no trainer_state.json, no run record
    argv = [
        "groupdpo",
        "--dataset_name",
        str(paths["data"]),
        *train(paths),
        "--resume_from_checkpoint",
        str(folder),
    ]
    err = error(argv, capsys)
    assert (
        f"--resume_from_checkpoint {folder}: an incomplete checkpoint" in err and "no-such-model" not in err
    )
