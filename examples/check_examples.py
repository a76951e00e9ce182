"""Check the example configs without launching anything: `python examples/check_examples.py`.

Needs the packages grouppo installs (accelerate, transformers); no GPU, no deepspeed, no network.

For each accelerate config of examples/accelerate/ it does what `accelerate launch --config_file F
-m grouppo groupdpo --config examples/groupdpo_7b.yaml` does before it starts a process, and stops there:

1. `load_config_from_file`: an unknown top-level key is an error there.
2. The launch command's own parser and `_validate_launch_command`, which copies the file's values onto
   the launch arguments. A key inside `fsdp_config` or `deepspeed_config` that no launch option has is
   silently ignored by accelerate, so this script checks each one against the parser's options.
3. The environment the launcher gives each process (`prepare_multi_gpu_env` or
   `prepare_deepspeed_cmd_env`), then, in that environment, the plugin each process would build
   (`FullyShardedDataParallelPlugin` or `DeepSpeedPlugin`) and its bf16 mixed-precision settings.
4. For FSDP: which modules the auto-wrap policy would shard as units, on small Qwen2 and Llama models
   built from configs (random weights, no download).

Then it parses examples/groupdpo_7b.yaml with the `grouppo groupdpo` command line's own parser (as
`--config` is read), so every key must be a grouppo or Trainer option. This machine has no GPU, so
`--use_cpu true` is added: transformers refuses `bf16: true` on a CPU-only machine otherwise.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
TRAINING_CONFIG = HERE / "groupdpo_7b.yaml"
CONFIGS = {
    # file: (distributed type, what must hold of the launch arguments after the file is read)
    "ddp_8gpu.yaml": ("MULTI_GPU", {"num_processes": 8, "num_machines": 1, "mixed_precision": "bf16"}),
    "fsdp2.yaml": ("FSDP", {"num_processes": 8, "fsdp_version": 2, "fsdp_activation_checkpointing": False}),
    "fsdp2_ac.yaml": ("FSDP", {"num_processes": 8, "fsdp_version": 2, "fsdp_activation_checkpointing": True}),
    "fsdp2_2nodes.yaml": ("FSDP", {"num_processes": 16, "num_machines": 2, "machine_rank": 0,
                                   "fsdp_version": 2}),
    "zero2.yaml": ("DEEPSPEED", {"num_processes": 8, "zero_stage": 2}),
    "zero3.yaml": ("DEEPSPEED", {"num_processes": 8, "zero_stage": 3, "zero3_init_flag": True,
                                 "zero3_save_16bit_model": True}),
}  # fmt: skip


def launch_args(path: Path):
    """The launch arguments as `accelerate launch --config_file path -m grouppo groupdpo ...` sees them."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    loaded = load_config_from_file(str(path))
    parser = launch_command_parser()
    options = {action.dest for action in parser._actions}
    argv = ["--config_file", str(path), "-m", "grouppo", "groupdpo", "--config", str(TRAINING_CONFIG)]
    args = parser.parse_args(argv)
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(loaded, section):
            name = key if key.startswith(prefix) else prefix + key
            if name not in options:
                raise SystemExit(f"{path.name}: {section}.{key} is no accelerate launch option (ignored)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, defaults, from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as `launch_command` does before it calls the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return loaded, args


def process_env(args) -> dict[str, str]:
    """The environment variables the launcher sets for each process."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.use_deepspeed:
            return prepare_deepspeed_cmd_env(args)[1]
        return prepare_multi_gpu_env(args)


def small_models():
    """Small Qwen2 and Llama causal LMs (3 layers), random weights: for the auto-wrap policy only."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256)  # fmt: skip
    return [Qwen2ForCausalLM(Qwen2Config(**shape)), LlamaForCausalLM(LlamaConfig(**shape))]


def check_fsdp(env: dict[str, str]) -> list[str]:
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with mixed_precision: bf16
    policy = plugin.mixed_precision_policy
    lines = [
        f"FSDP plugin: fsdp_version={plugin.fsdp_version} "
        f"reshard_after_forward={plugin.reshard_after_forward} "
        f"auto_wrap_policy={getattr(plugin.auto_wrap_policy, '__name__', plugin.auto_wrap_policy)} "
        f"state_dict_type={plugin.state_dict_type.name} "
        f"activation_checkpointing={plugin.activation_checkpointing} "
        f"cpu_ram_efficient_loading={plugin.cpu_ram_efficient_loading} cpu_offload={plugin.cpu_offload}",
        f"bf16 policy: param_dtype={policy.param_dtype} reduce_dtype={policy.reduce_dtype} "
        f"output_dtype={policy.output_dtype}",
    ]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    torch.manual_seed(0)
    for model in small_models():
        wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
        units = [name for name, module in model.named_modules() if module is not model and wrap(module)]
        layers = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
        assert units == layers, units
        lines.append(f"auto wrap, {type(model).__name__} ({model._no_split_modules}): units {units}")
    return lines


def check_deepspeed(env: dict[str, str]) -> list[str]:
    from accelerate.utils import DeepSpeedPlugin

    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision("bf16")
    config = plugin.deepspeed_config
    zero = config["zero_optimization"]
    return [
        f"DeepSpeed plugin: zero_stage={plugin.zero_stage} zero3_init_flag={plugin.zero3_init_flag} "
        f"zero3_save_16bit_model={plugin.zero3_save_16bit_model} "
        f"gradient_accumulation_steps={plugin.gradient_accumulation_steps!r} "
        f"gradient_clipping={plugin.gradient_clipping!r}",
        f"ds config: bf16={config.get('bf16')} fp16={config.get('fp16')} zero_optimization={zero}",
    ]


def check_accelerate_configs() -> None:
    found = sorted(p.name for p in (HERE / "accelerate").glob("*.yaml"))
    if found != sorted(CONFIGS):
        raise SystemExit(f"examples/accelerate holds {found}, this script knows {sorted(CONFIGS)}")
    for name, (kind, expected) in CONFIGS.items():
        loaded, args = launch_args(HERE / "accelerate" / name)
        assert loaded.distributed_type.value == kind, (name, loaded.distributed_type)
        got = {key: getattr(args, key) for key in expected}
        assert got == expected, (name, got, expected)
        assert args.module and args.training_script == "grouppo", name
        assert args.training_script_args[:1] == ["groupdpo"], name
        env = process_env(args)
        print(f"\n## {name}: {kind}, " + ", ".join(f"{k}={v}" for k, v in got.items()))
        print(f"launch: module {args.training_script} {' '.join(args.training_script_args)}")
        keys = sorted(k for k in env if k.startswith(("ACCELERATE_", "FSDP_")) and k not in os.environ)
        print("process env: " + " ".join(f"{k}={env[k]}" for k in keys))
        if args.num_machines > 1:  # torchrun's arguments, for this node
            print(f"torchrun: nnodes={args.nnodes} nproc_per_node={args.nproc_per_node} "
                  f"node_rank={args.node_rank} rdzv_backend={args.rdzv_backend} "
                  f"rdzv_endpoint={getattr(args, 'rdzv_endpoint', None)}")  # fmt: skip
            assert (args.nnodes, args.nproc_per_node) == ("2", "8")
        if kind == "FSDP":
            lines = check_fsdp(env)
        elif kind == "DEEPSPEED":
            lines = check_deepspeed(env)
        else:
            assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
            lines = []
        for line in lines:
            print(line)


def check_training_config() -> None:
    from grouppo.apps.cli.train import parse_training_arguments

    argv = ["--config", str(TRAINING_CONFIG), "--use_cpu", "true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, script, config, _ = parse_training_arguments(argv, "groupdpo")
    expected = {
        "bf16": True, "learning_rate": 5e-7, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8, "response_chunk_size": 2, "logits_chunk_size": 512,
        "activation_checkpointing": False, "gradient_checkpointing": False, "precompute_ref_logps": True,
        "max_length": 1536, "max_prompt_length": 512, "beta": 0.1, "loss_type": "all_pairs",
    }  # fmt: skip
    got = {key: getattr(config, key) for key in expected}
    assert got == expected, got
    assert script.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct" and script.dtype == "float32"
    print(f"\n## {TRAINING_CONFIG.name}: parsed by `grouppo groupdpo`'s parser")
    print(f"script: model={script.model_name_or_path} data={script.dataset_name} dtype={script.dtype}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in got.items()))


def main() -> int:
    check_accelerate_configs()
    check_training_config()
    print("\nall example configs check out (none was launched)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
