"""Data parallelism: under DistributedDataParallel (2 CPU processes, gloo) the decoupled group backward
gives every rank the gradient of the loss averaged over both ranks' groups, as one process computes it;
and ``accelerate launch`` with 2 processes of 2 groups trains the same model as 1 process of 4 groups.

grouppo scores through the backbone, not ``model.forward``; these tests fail if the scoring bypasses
DDP's forward, because DDP then never arms its all-reduce and each rank keeps its own gradient.
"""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import group_loss, random_groups
from harness import cli_env, cli_inputs, free_port
from safetensors.torch import load_file

from grouppo.collate import GroupCollator
from grouppo.embedded.synthetic import reversal_groups, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.slow  # two processes each: spawned ranks, or accelerate launch

SIZES = ([3, 5], [4, 2])  # rank 0's groups, rank 1's groups
POSITIVES = ([1, 2], [2, 1])


def _loss(model, feats, pad_token_id):
    return group_loss(model, GroupCollator(pad_token_id=pad_token_id)(feats), response_chunk_size=2)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        tokenizer = tiny_tokenizer()
        model = torch.nn.parallel.DistributedDataParallel(tiny_llama(tokenizer).double())
        feats = random_groups(SIZES[rank], POSITIVES[rank], seed=rank)
        _loss(model, feats, tokenizer.pad_token_id).backward()
        grad = torch.cat([p.grad.flatten() for p in model.module.parameters()])
        torch.save(grad, os.path.join(out_dir, f"grad{rank}.pt"))
        del model  # DDP's reducer must go before its process group: freed after it, gloo can hang
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_are_averaged_over_ranks(tmp_path, tokenizer):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    grads = [torch.load(tmp_path / f"grad{rank}.pt") for rank in range(2)]

    model = tiny_llama(tokenizer).double()
    losses = [
        _loss(model, random_groups(SIZES[r], POSITIVES[r], seed=r), tokenizer.pad_token_id) for r in range(2)
    ]
    (sum(losses) / 2).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])

    scale = expected.abs().max()
    for rank, grad in enumerate(grads):
        assert (grad - expected).abs().max() / scale < 1e-10, f"rank {rank} gradient differs from the average"


def test_accelerate_launch_two_processes_train_like_one(tmp_path, tokenizer):
    cfg = cli_inputs(tmp_path, tokenizer, reversal_groups(16, group_size=4, seed=5),
                     "max_steps: 3\noptim: sgd\nlearning_rate: 0.5\nresponse_chunk_size: 2\nnll_weight: 0.5\n"
                     "report_to: []\nsave_strategy: 'no'\ndisable_tqdm: true\n")  # fmt: skip
    env = cli_env(ACCELERATE_USE_CPU="1")
    cli = ["-m", "grouppo", "groupdpo", "--config", str(cfg)]
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
    ]
    for cmd, name, batch in ((launch, "two", 2), ([sys.executable], "one", 4)):
        args = [*cmd, *cli, "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", str(batch)]
        run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]

    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    init = load_file(tmp_path / "model" / "model.safetensors")
    moved = max((one[k] - init[k]).abs().max() for k in one)
    assert moved > 1e-3  # training did change the model
    assert max((one[k] - two[k]).abs().max() for k in one) < 1e-4 * moved


@pytest.mark.parametrize("signalled", ["launcher", "ranks"])
def test_sigterm_under_accelerate_launch_saves_then_stops_every_rank(tmp_path, tokenizer, signalled):
    """``accelerate launch`` puts each rank in a session of its own, so a signal to the launcher's process
    group does not reach them; the launcher (torchrun's agent) forwards SIGTERM to every rank, and a
    scheduler may signal the ranks themselves. Either way every rank saves one complete checkpoint at
    the same step and stops, one line says how to resume, and resuming finishes the run."""
    import signal
    import time

    cfg = cli_inputs(tmp_path, tokenizer, reversal_groups(64, group_size=4, seed=5),
                     "max_steps: 200\noptim: sgd\nlearning_rate: 0.1\nresponse_chunk_size: 2\nreport_to: []\n"
                     f"save_strategy: 'no'\nlogging_steps: 1\nper_device_train_batch_size: 2\n"
                     f"output_dir: {tmp_path / 'out'}\n")  # fmt: skip
    env = cli_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    argv = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "grouppo", "groupdpo", "--config",
            str(cfg)]  # fmt: skip
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in launcher.stdout:  # the first logged step: both ranks are training
        if "'loss'" in line:
            break
    ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    for pid in [launcher.pid] if signalled == "launcher" else ranks:
        os.kill(int(pid), signal.SIGTERM)
    start = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert time.monotonic() - start < 30, "the ranks did not stop within torchrun's 30 s grace"
    assert launcher.returncode != 0  # stopped, not finished
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "grouppo_run.json").exists(), err[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 200
    assert err.count(f"error: training stopped by SIGTERM at step {step}") == 1, err[-3000:]
    assert err.count("resume with: grouppo groupdpo") == 1
    assert {f"rng_state_{r}.pth" for r in (0, 1)} <= {p.name for p in checkpoints[0].iterdir()}
    argv[6] = str(free_port())
    resumed = subprocess.run([*argv, "--resume_from_checkpoint", "true"], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in resumed.stdout
    # it trained the steps that were left, one log line each, and saved the model
    assert resumed.stdout.count("'loss'") == 200 - step and f"saved to {tmp_path / 'out'}" in resumed.stdout
