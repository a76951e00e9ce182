"""Data parallelism: under DistributedDataParallel (2 CPU processes, gloo) the decoupled group backward
gives every rank the gradient of the loss averaged over both ranks' groups, as one process computes it;
and ``accelerate launch`` with 2 processes of 2 groups trains the same model as 1 process of 4 groups.

grouppo scores through the backbone, not ``model.forward``; these tests fail if the scoring bypasses
DDP's forward, because DDP then never arms its all-reduce and each rank keeps its own gradient.
"""

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import group_loss, random_groups
from safetensors.torch import load_file

from grouppo.collate import GroupCollator
from grouppo.embedded.synthetic import reversal_groups, tiny_llama, tiny_tokenizer
from grouppo.load import write_jsonl

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_are_averaged_over_ranks(tmp_path, tokenizer):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
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
    tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(reversal_groups(16, group_size=4, seed=5), tmp_path / "groups.jsonl")
    (tmp_path / "cfg.yaml").write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ndataset_name: {tmp_path / 'groups.jsonl'}\n"
        "max_steps: 3\noptim: sgd\nlearning_rate: 0.5\nresponse_chunk_size: 2\nnll_weight: 0.5\n"
        "report_to: []\nsave_strategy: 'no'\ndisable_tqdm: true\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    cli = ["-m", "grouppo", "groupdpo", "--config", str(tmp_path / "cfg.yaml")]
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
