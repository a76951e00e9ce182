"""One rank of the engine matrix in ``test_engines.py``: grouppo's trainers through accelerate's DDP,
FSDP2 and DeepSpeed plugins, on 2 CPU processes over gloo.

``run_rank`` is the child process. It joins a 2-process group the way ``accelerate launch`` would leave
it (``RANK``, ``WORLD_SIZE``, ...), builds the trainer from a ``TrainingArguments`` that names the engine
(``fsdp``/``fsdp_config`` or ``deepspeed``) and trains, then writes the saved model's weights and what
it measured to ``rank{N}.pt``, or the traceback to ``rank{N}.err``. The test process trains the same
run in one process (``train``, ``engine="single"``) and compares.

Why the harness is shaped this way:

* accelerate turns on FSDP and DeepSpeed only for accelerator devices: its ``PartialState`` picks the
  backend by device, and on a machine without GPUs it returns ``MULTI_CPU`` and runs an FSDP or DeepSpeed
  configuration as plain DDP, silently. ``pretend_accelerator`` makes ``PartialState`` report a GPU-type
  distributed type over gloo with the device ``cpu``, so accelerate builds the real engines (FSDP2's
  ``fully_shard``, DeepSpeed's ``deepspeed.initialize`` on DeepSpeed's CPU accelerator) on this machine.
  Everything past device selection is accelerate's, transformers' and DeepSpeed's own code.
* Forked ranks (``harness.run_ranks``): a fork inherits the test process's imports, so a rank
  starts in a second instead of the ten that importing transformers and DeepSpeed takes; the singleton
  states accelerate keeps are reset first, since the test process may have filled them.
* float32 and SGD: ZeRO-3 keeps float32 master weights, and SGD's update is linear in the gradient, so
  the trained weights of 2 ranks and of one process differ only by the order of float32 sums (Adam's
  first step divides each gradient by its own magnitude and would amplify that noise on near-zero
  entries). Compared as the update (trained - initial) relative to its largest entry, within 1e-5.
Not a test module (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import torch

WORLD_SIZE = harness.WORLD_SIZE
LR = 0.5
STEPS = 2
PER_RANK = 2  # groups per rank and step; one process takes WORLD_SIZE * PER_RANK


@dataclass(frozen=True)
class Case:
    """One training run of the matrix."""

    engine: str  # "ddp", "fsdp2", "zero2", "zero3" (or "single": the one-process run)
    trainer: str = "groupdpo"  # "groupdpo", "online", "gdpo"
    response_chunk_size: int | None = 2  # 2: decoupled backward; None: coupled
    activation_checkpointing: bool = False  # FSDP2: fsdp_config activation_checkpointing
    model_by_path: bool = True  # the model given as a path (as the CLI does), else a loaded module
    lora: bool = False
    precompute: bool = False
    ref_model: bool = False  # a separate reference model, by path
    steps: int = STEPS
    resume: bool = False  # train 1 step with a checkpoint, then resume from it to ``steps``
    # online: "" every prompt scored by length; "some": rank 0's prompts get one constant reward, so
    # rank 0 has nothing to contrast at any step; "all": every prompt does, on every rank
    nothing: str = ""
    bf16: bool = False  # mixed precision: bf16 compute (the engine's own policy), float32 master weights
    offload: bool = False  # ZeRO-3: parameters and optimizer states offloaded to the CPU
    evaluate: bool = False  # after training, evaluate 5 ragged groups: the processes' last batches uneven

    @property
    def id(self) -> str:
        parts = [self.engine, self.trainer, "decoupled" if self.response_chunk_size else "coupled"]
        flags = {
            "ac": self.activation_checkpointing, "module": not self.model_by_path, "lora": self.lora,
            "precompute": self.precompute, "refmodel": self.ref_model, "resume": self.resume,
            f"nothing_{self.nothing}": bool(self.nothing), "bf16": self.bf16, "offload": self.offload,
            "evaluate": self.evaluate,
        }  # fmt: skip
        return "-".join(parts + [k for k, v in flags.items() if v])


@dataclass
class Paths:
    model: str
    data: str
    out: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """What a rank is given: the case and where its inputs and outputs are."""

    case: Case
    paths: Paths

    @property
    def id(self) -> str:
        return self.case.id


# ------------------------------------------------------------------------------------------ the run
def engine_args(engine: str, bf16: bool = False, offload: bool = False) -> dict[str, Any]:
    """The ``TrainingArguments`` that select ``engine`` (what accelerate config files select)."""
    if engine == "fsdp2":
        # cpu_ram_efficient_loading (accelerate's default): only rank 0 reads the weights, the others
        # hold meta tensors until accelerate shards the model and broadcasts rank 0's
        fsdp = {"version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": True}
        return {"fsdp": True, "fsdp_config": fsdp}
    if engine in ("zero2", "zero3"):
        stage = int(engine[-1])
        zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
        if stage == 3:
            # every parameter partitioned (the default keeps small ones whole: all of this tiny model's)
            # and released after each call, so that every layer call gathers
            zero.update(
                stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                stage3_prefetch_bucket_size=2048, stage3_gather_16bit_weights_on_model_save=True,
            )  # fmt: skip
            if offload:
                zero.update(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
        return {
            "deepspeed": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "zero_optimization": zero,
                "zero_allow_untested_optimizer": True,
                # with offload, DeepSpeed wants its own CPU Adam unless told to keep the trainer's (SGD)
                "zero_force_ds_cpu_optimizer": False,
                "bf16": {"enabled": "auto" if bf16 else False},
                "steps_per_print": 1_000_000,
            }
        }
    return {"use_cpu": True}  # DDP: accelerate's CPU path (MULTI_CPU over gloo)


def belief_records() -> list[dict[str, Any]]:
    """GDPO records: 4 questions of 2 to 4 beliefs and 1 to 3 belief-conditioned pairs (ragged groups:
    the processes hold different numbers of pairs). Every GDPO term is a mean over groups, so the
    processes' means average to one process's whatever the pairs per group."""
    beliefs = ["yes", "no", "maybe so", "it depends a lot"]
    records = []
    for q, (k, pairs) in enumerate([(2, 1), (4, 3), (3, 2), (4, 2)]):
        weights = [float(i + 1 + q) for i in range(k)]
        distribution = [w / sum(weights) for w in weights]
        for p in range(pairs):
            records.append({
                "prompt": f"question {q}: is it {'good ' * (q + 1)}?",
                "beliefs": beliefs[:k], "distribution": distribution, "belief": p % k,
                "chosen": f"answer {'a' * (p + 2)} {q}", "rejected": f"no {'b' * (q + 1)}",
            })  # fmt: skip
    return records


def length_reward(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
    """Online GroupDPO's reward in the matrix: longer completions score higher."""
    return [float(len(c)) for c in completions]


def marked_reward(prompts: list[Any], completions: list[str], constant: list[bool], **_: Any) -> list[float]:
    """Length, except on prompts marked ``constant``: 1.0 for every completion (a pass/fail reward that
    nothing passes), so their groups hold no preference."""
    return [1.0 if c else float(len(text)) for text, c in zip(completions, constant, strict=True)]


def _trainer(case: Case, paths: Paths, world_size: int, **overrides: Any) -> Any:
    """The trainer of ``case``, for one of ``world_size`` processes."""
    from grouppo.load import load_records

    config: dict[str, Any] = dict(
        output_dir=paths.out,
        per_device_train_batch_size=PER_RANK * WORLD_SIZE // world_size,
        max_steps=case.steps,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        response_chunk_size=case.response_chunk_size,
        logits_chunk_size=4,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        ddp_timeout=harness.GLOO_TIMEOUT_S,
        precompute_ref_logps=case.precompute,
        ref_logps_cache_dir=paths.extra.get("cache"),
        bf16=case.bf16,
        **(engine_args(case.engine, case.bf16, case.offload) if world_size > 1 else {}),
    )
    if case.activation_checkpointing and world_size > 1:
        config["fsdp_config"]["activation_checkpointing"] = True
    config.update(overrides)
    model: Any = paths.model
    if not case.model_by_path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(paths.model)
    peft_config = None
    if case.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    common = dict(
        model=model,
        ref_model=paths.extra.get("ref_model") if case.ref_model else None,
        peft_config=peft_config,
    )
    if case.trainer == "gdpo":
        from grouppo.gdpo import GDPOConfig, GDPOTrainer

        return GDPOTrainer(args=GDPOConfig(**config), train_dataset=belief_records(), **common)
    if case.trainer == "online":
        from grouppo.online import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

        config.update(num_generations=3, max_new_tokens=5, ref_sync_steps=1)
        prompts, reward = load_records(paths.extra["prompts"]), length_reward
        if case.nothing:
            # one prompt a step per process, in order: rank 0 takes prompts 0, 2, ..., rank 1 the others
            config.update(
                per_device_train_batch_size=1, train_sampling_strategy="sequential", ref_sync_steps=None
            )
            prompts = [{**p, "constant": case.nothing == "all" or i % 2 == 0} for i, p in enumerate(prompts)]
            reward = marked_reward
        return OnlineGroupDPOTrainer(
            args=OnlineGroupDPOConfig(**config), reward_funcs=reward, train_dataset=prompts, **common,
        )  # fmt: skip
    from grouppo import GroupDPOConfig, GroupDPOTrainer

    config["nll_weight"] = 0.5
    if case.evaluate:  # 2 groups a batch: on 2 processes, 5 groups leave process 1's last batch all repeats
        # (one process evaluates the same batches one after another)
        config["per_device_eval_batch_size"] = PER_RANK
        common["eval_dataset"] = load_records(paths.extra["eval"])
    return GroupDPOTrainer(args=GroupDPOConfig(**config), train_dataset=load_records(paths.data), **common)


def train(case: Case, paths: Paths, world_size: int, interrupt: bool = True) -> dict[str, Any]:
    """Train ``case`` in this process (one rank of ``world_size``), save the model; what it measured.

    With ``case.resume`` the run saves a checkpoint at every step, then a second trainer resumes from
    the first checkpoint and trains to the end: its model is the one saved (``interrupt=False``: the
    same run straight through, the one-process reference)."""
    resume = {}
    if case.resume:
        # a checkpoint at every step; momentum, so that the optimizer has a state to save and restore;
        # FSDP2 writes its checkpoints sharded (torch.distributed.checkpoint), one file set per process
        resume = {"save_strategy": "steps", "save_steps": 1, "optim_args": "momentum=0.9"}
        if case.engine == "fsdp2" and world_size > 1:
            resume["fsdp_config"] = {
                **engine_args("fsdp2")["fsdp_config"],
                "state_dict_type": "SHARDED_STATE_DICT",
            }
    trainer = _trainer(case, paths, world_size, **resume)
    state = trainer.accelerator.state
    if state.num_processes != world_size:
        raise RuntimeError(f"accelerate sees {state.num_processes} processes ({state.distributed_type}), "
                           f"not {world_size}")  # fmt: skip
    trainer.train()
    if case.resume and interrupt:
        checkpoint = Path(paths.out) / "checkpoint-1"
        trainer = _trainer(
            case, paths, world_size, **{**resume, "output_dir": str(Path(paths.out) / "resumed")}
        )
        trainer.train(resume_from_checkpoint=str(checkpoint))
    evaluation = trainer.evaluate() if case.evaluate else {}
    saved = Path(paths.out) / "model"
    trainer.save_model(str(saved))
    trainer.accelerator.wait_for_everyone()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    reference = trainer.reference.model
    return {
        "saved": str(saved),
        "losses": losses,
        "evaluation": evaluation,
        "sharded": _sharded(trainer.model_wrapped),
        "reference": "none" if reference is None else _sharded(reference),
        "checkpoint": sorted(p.name for p in (Path(paths.out) / "checkpoint-1").iterdir())
        if case.resume and interrupt
        else [],
    }


def saved_weights(saved: str, base: str) -> dict[str, torch.Tensor]:
    """The state dict of the model saved in ``saved``, loaded back with ``from_pretrained`` (a LoRA
    adapter onto its ``base``, then merged). In the test process: in a worker, ``from_pretrained`` builds
    a ZeRO-3 partitioned model."""
    from transformers import AutoModelForCausalLM

    if not (Path(saved) / "adapter_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(saved)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), saved
        ).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sharded(model: torch.nn.Module) -> str:
    """How the trained model's parameters were held: "DTensor" (FSDP2), "ZeRO-3 partitions", "whole"."""
    params = list(model.parameters())
    if all(hasattr(p, "to_local") for p in params):
        return "DTensor"
    if all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params):
        return "ZeRO-3 partitions"
    return "whole"


# ------------------------------------------------------------------------------------------ a rank
def pretend_accelerator() -> None:
    """Make accelerate build the FSDP and DeepSpeed engines on CPU processes (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    def set_device(self):
        self.device = torch.device("cpu")

    PartialState._prepare_backend = prepare_backend
    PartialState.set_device = set_device
    # bf16 on the pretended accelerator: transformers checks for a bf16-capable GPU
    import transformers.training_args

    transformers.training_args.is_torch_bf16_gpu_available = lambda: True


def run_rank(rank: int, port: int, case: dict, out_dir: str) -> None:
    """The child process of rank ``rank``: writes ``rank{N}.pt`` or ``rank{N}.err`` in ``out_dir``."""
    harness.guarded(_run, rank, port, case, out_dir)


def _run(rank: int, port: int, spec: dict, out: Path) -> None:
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState, PartialState

    case = Case(**spec["case"])
    torch.set_num_threads(1)  # two ranks on 2 cores
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    os.environ.pop("ACCELERATE_USE_CPU", None)
    # as accelerate launch sets it for an FSDP config: transformers' from_pretrained reads it (with
    # FSDP_CPU_RAM_EFFICIENT_LOADING) to load real weights on rank 0 only
    os.environ["ACCELERATE_USE_FSDP"] = "true" if case.engine == "fsdp2" else "false"
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state() if state is not AcceleratorState else state._reset_state(True)
    if case.engine in ("zero2", "zero3"):
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    if case.engine != "ddp":
        pretend_accelerator()
    start = time.monotonic()
    paths = Paths(**spec["paths"])
    result = train(case, paths, WORLD_SIZE)
    result["seconds"] = time.monotonic() - start
    result["engine"] = _engine_of()
    torch.save(result, out / f"rank{rank}.tmp")
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _engine_of() -> str:
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    return str(state.distributed_type).split(".")[-1]
