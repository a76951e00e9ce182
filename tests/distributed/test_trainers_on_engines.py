"""The engine matrix: grouppo's trainers under DDP, FSDP2 (with and without activation checkpointing),
DeepSpeed ZeRO-2 and ZeRO-3, through accelerate and transformers' ``Trainer`` as a user runs them, on 2
CPU processes over gloo, against one process on the same global batch.

How the harness makes accelerate build the real engines on a machine without GPUs, and why it runs in
float32 with SGD, is in ``engine_worker``'s docstring. Every case trains 2 steps on ragged groups: 8
groups of K = 2 to 6 letter-reversal responses of different lengths, 2 groups per process and step (4
in the one process), so that the processes hold different numbers of responses and tokens at every step
and grouppo's equal-collectives plan is exercised through the trainer. The saved model is loaded back
with ``from_pretrained`` (a LoRA adapter onto its base) and its update (trained - initial weights) must
equal one process's within 1e-5 of the update's largest entry, and the logged losses within 1e-5.

What each case adds:

* ``coupled``: one backward through the whole batch instead of the decoupled one per response chunk;
* ``ac``: FSDP2 with accelerate's activation checkpointing (torch's ``checkpoint_wrapper``);
* ``module``: the model handed to the trainer as a module, loaded after the ``TrainingArguments`` (under
  ZeRO-3 that is a model ``from_pretrained`` already partitioned);
* ``refmodel``: a separate reference model by path (ZeRO-3: loaded partitioned, then a DeepSpeed
  inference engine);
* ``lora``: a PEFT LoRA policy, whose reference is its adapter-disabled base;
* ``precompute``: reference log-probs computed before training by every process together (under FSDP2
  and ZeRO-3 by a temporary sharded copy of the policy), cached on disk; the one-process run then finds
  that cache file, i.e. the key computed from the gathered shards is the key of the whole model;
* ``resume``: a checkpoint at every step (FSDP2: sharded, ``SHARDED_STATE_DICT``; ZeRO-3: DeepSpeed's
  partitioned checkpoint), SGD with momentum so that the optimizer has a state; a second trainer
  resumes from the first checkpoint and must end where one process's uninterrupted run ends;
* ``gdpo``: GDPO on belief records with 2 to 4 beliefs per question;
* ``online``: online GroupDPO, sampling on the sharded policy and re-syncing the sharded reference to it
  after each step. Its samples depend on how prompts are split between processes, so it is not
  compared with one process: it must train (the weights move, the processes log the same losses), and
  its second step, right after the re-sync, must start with reference = policy (a loss of log 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import engine_worker
import harness
import pytest
from engine_worker import Case

from grouppo.embedded.synthetic import reversal_groups, tiny_llama
from grouppo.load import write_jsonl

pytestmark = pytest.mark.slow  # two processes per case

HANG_LIMIT_S = 180
RTOL = 1e-5

CASES = [
    Case("ddp"),
    Case("ddp", response_chunk_size=None),
    Case("ddp", precompute=True),
    Case("fsdp2"),
    Case("fsdp2", response_chunk_size=None),
    Case("fsdp2", activation_checkpointing=True),
    Case("fsdp2", activation_checkpointing=True, response_chunk_size=None),
    Case("fsdp2", ref_model=True),
    Case("fsdp2", lora=True),
    Case("fsdp2", precompute=True),
    Case("fsdp2", resume=True),
    Case("fsdp2", trainer="gdpo"),
    Case("fsdp2", trainer="online"),
    Case("zero2"),
    Case("zero2", response_chunk_size=None),
    Case("zero3"),
    Case("zero3", response_chunk_size=None),
    Case("zero3", model_by_path=False),
    Case("zero3", ref_model=True),
    Case("zero3", lora=True),
    Case("zero3", precompute=True),
    Case("zero3", lora=True, precompute=True),
    Case("zero3", resume=True),
    Case("zero3", trainer="gdpo"),
    Case("zero3", trainer="online"),
    # A process with nothing to contrast runs the same calls with weight 0: no process is left waiting.
    Case("ddp", trainer="online", nothing="some"),
    Case("fsdp2", trainer="online", nothing="some"),
    Case("zero3", trainer="online", nothing="some"),
    Case("ddp", trainer="online", nothing="all"),
    Case("fsdp2", trainer="online", nothing="all"),
    # Mixed precision as each engine applies it, against one process under bf16 autocast.
    Case("ddp", bf16=True),
    Case("fsdp2", bf16=True),
    Case("zero3", bf16=True),
    Case("zero3", offload=True),
    # evaluation whose last batches are uneven across the processes
    Case("ddp", evaluate=True),
    Case("fsdp2", evaluate=True),
    Case("zero3", evaluate=True),
]

METRIC_KEYS = ("loss", "chosen", "rejected", "accuracies", "margins", "accuracy", "size", "nll", "entropy")
ENGINE = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
HELD = {"ddp": "whole", "fsdp2": "DTensor", "zero2": "whole", "zero3": "ZeRO-3 partitions"}
_ONE_PROCESS: dict[tuple, dict] = {}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    tiny_llama(tokenizer, seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    groups = [
        g
        for i, k in enumerate([2, 5, 3, 6, 2, 4, 6, 3])
        for g in reversal_groups(1, group_size=k, seed=100 + i)
    ]
    write_jsonl(groups, root / "groups.jsonl")
    prompts = [{"prompt": f"Reverse the word:\n{w}\n"} for w in ("abc", "bd", "cab", "dcba")]
    write_jsonl(prompts, root / "prompts.jsonl")
    evaluation = [
        g for i, k in enumerate([3, 6, 2, 5, 4]) for g in reversal_groups(1, group_size=k, seed=200 + i)
    ]
    write_jsonl(evaluation, root / "eval.jsonl")
    return {"model": root / "model", "data": root / "groups.jsonl", "prompts": root / "prompts.jsonl",
            "eval": root / "eval.jsonl"}  # fmt: skip


@pytest.fixture(scope="module")
def deepspeed_cpu():
    harness.prepare_deepspeed_cpu()


def _paths(inputs: dict[str, Path], out: Path, cache: Path) -> engine_worker.Paths:
    extra = {"ref_model": str(inputs["model"]), "prompts": str(inputs["prompts"]), "cache": str(cache),
             "eval": str(inputs["eval"])}  # fmt: skip
    return engine_worker.Paths(str(inputs["model"]), str(inputs["data"]), str(out), extra)


def _one_process(case: Case, inputs: dict[str, Path], tmp_path: Path) -> dict:
    """One process's run of ``case`` (straight through, no engine). Runs that must give the same model
    (a reference model that is a copy of the policy, precomputed or not, coupled or decoupled) share one;
    a precompute case runs its own, on the two processes' cache."""
    key = (case.trainer, case.lora, case.resume, case.bf16, case.evaluate)
    if case.precompute or key not in _ONE_PROCESS:
        out = tmp_path / "one"
        result = engine_worker.train(case, _paths(inputs, out, tmp_path / "cache"), 1, interrupt=False)
        result["weights"] = engine_worker.saved_weights(result["saved"], str(inputs["model"]))
        if case.precompute:
            return result
        _ONE_PROCESS[key] = result
    return _ONE_PROCESS[key]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_engine_trains_like_one_process(case, inputs, tmp_path, request):
    if case.engine.startswith("zero"):
        request.getfixturevalue("deepspeed_cpu")
    spec = engine_worker.Spec(case, _paths(inputs, tmp_path / "runs", tmp_path / "cache"))
    start = time.monotonic()
    results = harness.run_ranks(engine_worker.run_rank, spec, tmp_path, HANG_LIMIT_S)
    seconds = time.monotonic() - start

    for rank, result in enumerate(results):  # the engine the case asked for, holding what it should
        assert result["engine"] == ENGINE[case.engine], f"rank {rank} ran {result['engine']}"
        assert result["sharded"] == HELD[case.engine], f"rank {rank}: the policy was held {result['sharded']}"
        frozen = "none" if case.lora or case.precompute else HELD[case.engine]
        assert result["reference"] == frozen, f"rank {rank}: the reference was held {result['reference']}"
    assert results[0]["losses"] == results[1]["losses"]  # logged after the processes' losses are averaged
    if case.resume:
        assert results[0]["checkpoint"], "no checkpoint written"
    initial = engine_worker.saved_weights(str(inputs["model"]), str(inputs["model"]))
    weights = engine_worker.saved_weights(results[0]["saved"], str(inputs["model"]))
    update = {name: weights[name] - w for name, w in initial.items()}
    moved = max(float(u.abs().max()) for u in update.values())
    if case.nothing == "all":  # no process had anything to contrast: every step was weight 0
        assert moved == 0.0, "a run with nothing to contrast changed the model"
    else:
        assert moved > 1e-3, "training did not change the model"
    row = {"case": case.id, "seconds": round(seconds, 1), "max_update_difference": None}
    if case.trainer == "online" and not case.nothing:
        # re-synced after step 1, the reference equals the policy at step 2: every implicit reward is 0
        # and the loss (preference only) is log 2, only if the shards were copied right
        assert math.isclose(results[0]["losses"][1], math.log(2), rel_tol=1e-6), results[0]["losses"]

    if case.trainer != "online":
        cache_files = sorted((tmp_path / "cache").glob("*.json"))
        one = _one_process(case, inputs, tmp_path)
        if case.precompute:  # the one process found the two processes' cache file: no second key
            assert len(cache_files) == 1 and sorted((tmp_path / "cache").glob("*.json")) == cache_files
        expected = {name: w - initial[name] for name, w in one["weights"].items()}
        scale = max(float(u.abs().max()) for u in expected.values())
        rtol = RTOL
        if case.bf16:
            # The one process runs bf16 autocast (bf16 matrix products, float32 elsewhere); its update
            # differs from float32's by about one bf16 rounding (2^-8 = 3.9e-3 of the largest entry,
            # checked below). DDP applies the same autocast: within 2 such roundings. FSDP2
            # (param_dtype bf16) and DeepSpeed's bf16 mode compute every layer in bf16, norms and
            # residuals included, so their updates differ from autocast's by rounding of more
            # operations: within 16 roundings (0.0625). A sharding or reduction bug (a shard's gradient
            # lost, counted twice or mis-scaled) moves an update by order 1.
            fp32 = _one_process(dataclasses.replace(case, bf16=False), inputs, tmp_path)
            bf16_cost = max(float((one["weights"][n] - w).abs().max()) for n, w in fp32["weights"].items())
            row["bf16_vs_float32"] = bf16_cost / scale
            assert RTOL < bf16_cost / scale < 4 * 2**-8, f"autocast vs float32: {bf16_cost / scale:.2e}"
            rtol = 2 * bf16_cost / scale if case.engine == "ddp" else 16 * 2**-8
        for rank in range(harness.WORLD_SIZE):
            harness.compare_tensors("update", rank, update, expected, rtol)
        row["max_update_difference"] = (
            max(float((update[n] - u).abs().max()) for n, u in expected.items()) / scale
        )
        if case.evaluate:
            # Both processes ran every evaluation batch (none hung) and report the same metrics, and those
            # are one process's: accelerate evens out the last batches with repeated groups, and neither
            # eval_loss nor any eval_* metric may count them.
            measured = [
                {k: v for k, v in r["evaluation"].items() if k.endswith(METRIC_KEYS)} for r in results
            ]
            assert measured[0] == measured[1] and len(measured[0]) > 10
            assert all(math.isfinite(v) for v in measured[0].values())
            row["evaluation"] = {"two": measured[0], "one": one["evaluation"]}
            for key, value in measured[0].items():
                want = one["evaluation"][key]
                assert math.isclose(value, want, rel_tol=1e-4, abs_tol=1e-6), f"{key}: {value} != {want}"
        assert len(one["losses"]) == len(results[0]["losses"]) == case.steps
        for got, want in zip(results[0]["losses"], one["losses"], strict=True):
            assert math.isclose(got, want, rel_tol=rtol), f"loss {got} != one process's {want}"
    _record(row)


def _record(row: dict) -> None:
    """The matrix row, printed (``pytest -s``) and, with ``GROUPPO_MATRIX_OUT``, appended to that file."""
    print(json.dumps(row))
    if os.environ.get("GROUPPO_MATRIX_OUT"):
        with open(os.environ["GROUPPO_MATRIX_OUT"], "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ the example configs
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
LAUNCHED = {"fsdp2.yaml": "FSDP2", "fsdp2_ac.yaml": "FSDP2", "zero2.yaml": "DeepSpeed ZeRO-2",
            "zero3.yaml": "DeepSpeed ZeRO-3"}  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(inputs, tmp_path_factory) -> dict:
    """The CLI's config for the launches, and its one-process run (4 groups per step)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "cfg.yaml").write_text(
        f"model_name_or_path: {inputs['model']}\ndataset_name: {inputs['data']}\nmax_steps: 2\noptim: sgd\n"
        "learning_rate: 0.5\nresponse_chunk_size: 2\nlogits_chunk_size: 4\nnll_weight: 0.5\n"
        "precompute_ref_logps: true\nreport_to: []\nsave_strategy: 'no'\ndisable_tqdm: true\n"
        f"ref_logps_cache_dir: {root / 'cache'}\n"
    )
    env = harness.cli_env()
    cli = ["-m", "grouppo", "groupdpo", "--config", str(root / "cfg.yaml")]
    one = [sys.executable, *cli, "--output_dir", str(root / "one"), "--per_device_train_batch_size", "4"]
    run = subprocess.run(one, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"root": root, "cli": cli, "env": env}


def _launch_env(tmp_path: Path, cli_run: dict) -> dict:
    """The environment of a launch: ``engine_worker.pretend_accelerator`` applied in every process by a
    ``sitecustomize`` module, DeepSpeed on its CPU accelerator, one thread a process."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    tests = str(Path(__file__).resolve().parent)
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\n"
        "import engine_worker\nengine_worker.pretend_accelerator()\n"
    )
    env = {**cli_run["env"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _assert_trains_like_one_process(out: Path, cli_run: dict, inputs: dict[str, Path]) -> None:
    initial = engine_worker.saved_weights(str(inputs["model"]), str(inputs["model"]))
    one = engine_worker.saved_weights(str(cli_run["root"] / "one"), str(inputs["model"]))
    two = engine_worker.saved_weights(str(out), str(inputs["model"]))
    expected = {name: w - initial[name] for name, w in one.items()}
    assert max(float(u.abs().max()) for u in expected.values()) > 1e-3
    got = {name: w - initial[name] for name, w in two.items()}
    harness.compare_tensors("update", 0, got, expected, RTOL)


ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.mark.parametrize("config", sorted(LAUNCHED))
def test_example_config_launches_like_one_process(config, cli_run, inputs, tmp_path, request):
    """``accelerate launch --config_file examples/accelerate/<config> -m grouppo groupdpo``, as the README
    says, on 2 processes (``--num_processes 2``; ``--mixed_precision no``: float32 as the one process).
    The CLI must say which engine it runs (accelerate would otherwise fall back to DDP without a word)
    and save the model one process saves."""
    if "zero" in config:
        request.getfixturevalue("deepspeed_cpu")
    env = _launch_env(tmp_path, cli_run)
    launch = [ACCELERATE, "launch", "--config_file", str(EXAMPLES / config), "--num_processes", "2",
              "--mixed_precision", "no", "--main_process_port", str(harness.free_port())]  # fmt: skip
    out = tmp_path / "out"
    run = subprocess.run([*launch, *cli_run["cli"], "--output_dir", str(out), "--per_device_train_batch_size",
                          "2"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"training with {LAUNCHED[config]}" in run.stdout, run.stdout[-2000:]
    assert run.stdout.count(f"saved to {out}") == 1  # said once, by the main process
    _assert_trains_like_one_process(out, cli_run, inputs)


def test_two_node_config_launches_as_two_machines(cli_run, inputs, tmp_path):
    """``fsdp2_2nodes.yaml`` as its comments say to run it, one ``accelerate launch`` per node with its
    ``--machine_rank``, here 2 "nodes" of 1 process on this machine meeting at 127.0.0.1 (the file's
    placeholder address replaced, as a user must): FSDP2 over both, the model one process saves."""
    env = _launch_env(tmp_path, cli_run)
    port, out = str(harness.free_port()), tmp_path / "out"
    nodes = []
    for rank in (0, 1):
        launch = [ACCELERATE, "launch", "--config_file", str(EXAMPLES / "fsdp2_2nodes.yaml"),
                  "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                  "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                  "--mixed_precision", "no"]  # fmt: skip
        argv = [*launch, *cli_run["cli"], "--output_dir", str(out), "--per_device_train_batch_size", "2"]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        nodes.append(subprocess.Popen(argv, env=env, text=True, **pipes))
    runs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, runs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert "training with FSDP2" in runs[0][0] and "on 2 processes" in runs[0][0], runs[0][0][-2000:]
    _assert_trains_like_one_process(out, cli_run, inputs)


@pytest.mark.slow
def test_every_example_config_checks_out_without_a_launch():
    """``python examples/check_examples.py``, as docs/distributed.md says: every accelerate config read as
    the launcher reads it, and the 7B training config parsed by the command line's parser."""
    script = EXAMPLES.parent / "check_examples.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "all example configs check out" in run.stdout
    assert all(f"## {name}" in run.stdout for name in (*LAUNCHED, "groupdpo_7b.yaml"))


def test_the_memory_tables_of_the_docs_are_what_the_estimate_prints():
    """docs/distributed.md embeds ``python examples/memory_estimate.py``'s output: it must be that output."""
    docs = (EXAMPLES.parents[1] / "docs" / "distributed.md").read_text(encoding="utf-8")
    begin, end = "<!-- memory_estimate.py output: begin -->", "<!-- memory_estimate.py output: end -->"
    embedded = docs[docs.index(begin) + len(begin) : docs.index(end)].strip()
    script = EXAMPLES.parent / "memory_estimate.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert embedded == run.stdout.strip() and "| Llama-3-70B | FSDP2 |" in embedded
