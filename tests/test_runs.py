"""grouppo.runs through the trainers: one run per output_dir, resume only the same run and only from a
complete checkpoint, SIGTERM and SIGINT save then stop, a final save cut short leaves nothing half
written, and no file grouppo reads back can run code."""

import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from conftest import trainer_config
from transformers import TrainerCallback

from grouppo.embedded.synthetic import reversal_groups, tiny_llama
from grouppo.groupdpo import GroupDPOTrainer
from grouppo.runs import (
    LOCK_FILE,
    RUN_FILE,
    RunChangedError,
    RunLock,
    RunLockedError,
    TrainingInterrupted,
    changed_fields,
    latest_complete_checkpoint,
)

GROUPS = reversal_groups(12, group_size=4, seed=3)


def trainer(tmp_path, tokenizer, groups=GROUPS, **kw):
    settings = dict(
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=2,
        optim="sgd",
        learning_rate=0.5,
    )
    args = trainer_config(tmp_path, **{**settings, **kw})
    return GroupDPOTrainer(
        tiny_llama(tokenizer, seed=0), args=args, train_dataset=groups, processing_class=tokenizer
    )


def weights(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


# --------------------------------------------------------------------------------------------- the lock
def test_a_second_run_into_a_live_runs_output_dir_is_refused_with_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "2026-12-04 10:00:00"})
        )
        with pytest.raises(
            RunLockedError, match=f"in use by another run: pid {holder.pid} on .* started 2026-12-04"
        ):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.acquire()  # the same process again (a second train() call): re-entrant
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunLockedError, match="run on another host \\(elsewhere"):
        RunLock(tmp_path).acquire()


def test_training_holds_the_lock_of_its_output_dir(tmp_path, tokenizer):
    t = trainer(tmp_path, tokenizer, max_steps=1)
    t.train()
    lock = tmp_path / "out" / LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    t.run_lock.release()
    assert not lock.exists()


# ------------------------------------------------------------------------------------------ resuming
def test_resume_continues_only_the_same_run(tmp_path, tokenizer):
    first = trainer(tmp_path, tokenizer)
    first.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    record = json.loads((tmp_path / "out" / "checkpoint-2" / RUN_FILE).read_text())
    assert record["trainer"] == "GroupDPOTrainer" and record["beta"] == 0.1 and len(record["data"]) == 64
    # Other data (K = 2 instead of 4), another beta, another loss: each refused, naming what changed.
    other_data = [{"prompt": g["prompt"], "responses": g["responses"][:2], "labels": [1, 0]} for g in GROUPS]
    for changed, expected in (
        (dict(groups=other_data), "data: "),
        (dict(beta=5.0), "beta: 0.1 -> 5.0"),
        (dict(loss_type="sdpo"), "loss_type: 'all_pairs' -> 'sdpo'"),
    ):
        again = trainer(tmp_path, tokenizer, **changed)
        with pytest.raises(RunChangedError, match=expected):
            again.train(resume_from_checkpoint=checkpoint)
    # ... unless the user asks for it (warned).
    trainer(tmp_path, tokenizer, beta=5.0, resume_with_changes=True).train(resume_from_checkpoint=checkpoint)
    assert changed_fields({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 -> 3", "c: None -> 4"]


def test_a_checkpoint_cut_short_is_never_resumed_from(tmp_path, tokenizer):
    trainer(tmp_path, tokenizer).train()
    out = tmp_path / "out"
    # A kill during the save of checkpoint 4: its optimizer file is empty, its state and mark not written.
    (out / "checkpoint-4" / RUN_FILE).unlink()
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"")
    assert latest_complete_checkpoint(out) == (str(out / "checkpoint-3"), [str(out / "checkpoint-4")])
    with pytest.raises(RunChangedError, match="not a complete grouppo checkpoint"):
        trainer(tmp_path, tokenizer).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    resumed = trainer(tmp_path, tokenizer, max_steps=5)
    resumed.train(resume_from_checkpoint=True)  # the newest complete one: checkpoint-3
    assert resumed.state.global_step == 5


# --------------------------------------------------------------------------------------------- signals
class SignalAt(TrainerCallback):
    def __init__(self, step, signum, times=1):
        self.step, self.signum, self.times = step, signum, times

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_then_stops_and_resuming_ends_where_the_straight_run_ends(
    tmp_path, tokenizer, signum
):
    straight = trainer(tmp_path / "straight", tokenizer)
    straight.train()
    stopped = trainer(tmp_path / "stopped", tokenizer, save_strategy="no")
    stopped.add_callback(SignalAt(1, signum))
    with pytest.raises(
        TrainingInterrupted, match=f"stopped by {signal.Signals(signum).name} at step 2"
    ) as info:
        stopped.train()
    assert (
        info.value.checkpoint.endswith("checkpoint-2")
        and not (tmp_path / "stopped" / "out" / "checkpoint-3").exists()
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    resumed = trainer(tmp_path / "stopped", tokenizer, save_strategy="no")
    resumed.train(resume_from_checkpoint=True)
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_second_signal_stops_at_once_without_saving(tmp_path, tokenizer):
    t = trainer(tmp_path, tokenizer, save_strategy="no")
    t.add_callback(SignalAt(1, signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# ------------------------------------------------------------------------------------------ the disk
def test_a_final_save_cut_short_writes_nothing_and_names_the_last_checkpoint(
    tmp_path, tokenizer, monkeypatch
):
    import transformers.modeling_utils

    t = trainer(tmp_path, tokenizer)
    t.train()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)  # the weights' write
    with pytest.raises(
        OSError,
        match="saving the model to .* failed \\(No space left on device\\); nothing was "
        "written there; the last complete checkpoint is .*checkpoint-4",
    ):
        t.save_model(str(tmp_path / "final"))
    # No config without weights, no staging folder left: the folder is as it was (empty).
    assert not (tmp_path / "final").exists() or not any((tmp_path / "final").iterdir())
    monkeypatch.undo()
    t.save_model(str(tmp_path / "final"))  # with room on the disk, the same call saves a loadable model
    assert (tmp_path / "final" / "model.safetensors").is_file() and not (
        tmp_path / "final" / ".grouppo-saving"
    ).exists()


# --------------------------------------------------------------------------------------------- payloads
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/grouppo-payload-ran"


def test_no_file_grouppo_reads_back_runs_code(tmp_path, tokenizer):
    """A pickle payload planted in each file of a checkpoint that is read on resume (transformers' own
    files, grouppo's run record, an online run's state) never runs."""
    from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

    if os.path.exists(MARKER):
        os.remove(MARKER)
    prompts = [{"prompt": f"Reverse the word:\n{w}\n"} for w in ("abc", "fgj", "qxz", "bad")]
    args = trainer_config(
        tmp_path,
        OnlineGroupDPOConfig,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=2,
        num_generations=3,
        max_new_tokens=4,
    )

    def lengths(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    def make():
        return OnlineGroupDPOTrainer(
            tiny_llama(tokenizer),
            reward_funcs=lengths,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )

    make().train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    planted = pickle.dumps(Payload())
    for name in (
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "online_state_0.json",
        "online_state_0.pt",
        RUN_FILE,
        "training_args.bin",
    ):
        original = (checkpoint / name).read_bytes() if (checkpoint / name).exists() else None
        (checkpoint / name).write_bytes(planted)
        t = make()
        t.args.max_steps = 3
        try:
            t.train(resume_from_checkpoint=str(checkpoint))
        except Exception:  # noqa: S110  (refused or unreadable is fine: what matters is that nothing ran)
            pass
        assert not os.path.exists(MARKER), f"the payload in {name} ran"
        if original is None:
            (checkpoint / name).unlink()
        else:
            (checkpoint / name).write_bytes(original)
    # The control: the same bytes do run when unpickled, so the test can fail.
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads({planted!r})"], check=True)
    assert os.path.exists(MARKER)
    os.remove(MARKER)


# ------------------------------------------------------------------------------------------ tied weights
def test_resuming_a_model_with_tied_weights_warns_of_no_missing_key_and_keeps_other_warnings(
    tmp_path, tokenizer, caplog
):
    """A model whose LM head is tied to its embedding saves the shared weight once; transformers then
    warns on resume that ``lm_head.weight`` is missing although the weights are whole. grouppo drops
    that warning only when every missing key is a tied weight."""
    import logging

    from transformers import LlamaForCausalLM

    from grouppo.runs import tied_names, tied_weights_resume

    config = tiny_llama(tokenizer).config
    config.tie_word_embeddings = True

    def make(**kw):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        assert tied_names(model) == {"lm_head.weight"}
        settings = dict(max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
        args = trainer_config(tmp_path, optim="sgd", learning_rate=0.5, **settings, **kw)
        return GroupDPOTrainer(model, args=args, train_dataset=GROUPS, processing_class=tokenizer)

    straight = make()
    straight.train()
    caplog.clear()
    resumed = make()
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert "missing keys" not in caplog.text
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=0)
    # The filter is narrow: a key that is not tied is still warned about, and the filter goes with the run.
    log = logging.getLogger("transformers.trainer")
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        with tied_weights_resume(resumed.model):
            log.warning("There were missing keys in the checkpoint model loaded: ['lm_head.weight'].")
            log.warning("There were missing keys in the checkpoint model loaded: ['model.norm.weight'].")
        log.warning("There were missing keys in the checkpoint model loaded: ['lm_head.weight'].")
    assert caplog.text.count("['model.norm.weight']") == 1 and caplog.text.count("['lm_head.weight']") == 1
