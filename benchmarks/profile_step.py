"""Where the time of one training step goes: torch.profiler over one step of `grouppo bench`'s setup.

    .venv/bin/python benchmarks/profile_step.py --strategy decoupled:1 --group-size 32

Prints the operators with the most self CPU time (or CUDA time on a GPU) and the step's wall time,
for the strategy given and for ``coupled`` on the same model and group, so the two can be compared.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from grouppo.apps.bench.spec import BenchSpec, add_shape_arguments, build_groups, build_model, shape_from_args
from grouppo.apps.bench.steps import trainer_and_batch


def profile_step(spec: BenchSpec, rows: int) -> None:
    model = build_model(spec)
    trainer, batch = trainer_and_batch(spec, model, build_groups(spec), "/tmp/grouppo-profile")

    def step() -> None:
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step()  # warm-up, creates AdamW's state
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
    wall = time.perf_counter() - start
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n=== {spec.strategy}, K={spec.group_size}: step {wall:.2f} s (under the profiler)")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="decoupled:1")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=15)
    add_shape_arguments(parser)
    # The shape of the CPU run in the README's Performance section.
    parser.set_defaults(hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=6, vocab=32000)
    args = parser.parse_args()
    for strategy in ("coupled", args.strategy):
        spec = BenchSpec(strategy=strategy, group_size=args.group_size, **shape_from_args(args))
        profile_step(spec, args.rows)


if __name__ == "__main__":
    main()
