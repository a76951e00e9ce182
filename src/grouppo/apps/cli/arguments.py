"""The options of the training commands beside their trainer's config: the model, data and PEFT options
(``ScriptArguments``, TRL's ``ScriptArguments`` and ``ModelConfig`` names), the defaults of ``grouppo gdpo``
on the embedded opinion data, and the TRL options grouppo does not take, each with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScriptArguments:
    """Model, data and PEFT options of the training commands (the training options are the config's)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local path of the model (default: the embedded SmolLM2-135M-Instruct)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "JSONL/JSON/Parquet file, local dataset directory or Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data (file, dir or name). Default: the dataset_test_split of dataset_name "
            "when it has one and eval_strategy is not 'no' (as TRL does)."
        },
    )
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate on (of eval_dataset_name, else of dataset_name)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model (default: policy)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    torch_dtype: str | None = field(
        default=None, metadata={"help": "TRL's older name of dtype (either works)."}
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "The model's revision on the Hub: a branch, tag or commit."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: eager, sdpa, flash_attention_2, ... (transformers')."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the modelling code a Hub model ships (off: only transformers' own classes "
                  "load). Turn it on only for a model whose code you trust: it runs with your permissions."},
    )  # fmt: skip
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside the adapter (e.g. lm_head)."}
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA (alpha / sqrt(r))."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})


# TRL options (DPOConfig, ModelConfig) that grouppo does not take, and why: refused by name, never dropped.
REFUSED = {
    "load_in_4bit": "quantized (QLoRA) loading is not supported yet: it needs bitsandbytes and a GPU",
    "load_in_8bit": "quantized loading is not supported yet: it needs bitsandbytes and a GPU",
    "bnb_4bit_quant_type": "quantized loading is not supported yet",
    "use_bnb_nested_quant": "quantized loading is not supported yet",
    "bnb_4bit_quant_storage": "quantized loading is not supported yet",
    "lora_target_parameters": "adapting parameters (not modules) is not supported; use --lora_target_modules",
    "router_aux_loss_coef": "mixture-of-experts router losses are not added to grouppo's objectives",
    "dataset_num_proc": "grouppo reads and tokenizes data in one process (it is fast at these sizes)",
    "truncation_mode": "grouppo cuts prompts at the start (keeps their end, max_prompt_length) and responses "
    "at the end (max_length, max_completion_length); no other mode",
    "padding_free": "grouppo pads each batch (prompts shared, no padding-free packing)",
    "pad_to_multiple_of": "grouppo pads to the longest row of each batch",
    "use_weighting": "WPO's weighting is not implemented",
    "ld_alpha": "LD-DPO's length desensitization is not implemented",
    "f_divergence_type": "grouppo's losses use DPO's reverse KL; other f-divergences are not implemented",
    "f_alpha_divergence_coef": "f-divergences other than reverse KL are not implemented",
    "discopop_tau": "the DiscoPOP loss is not implemented",
    "activation_offloading": "activation offloading is not implemented (the decoupled backward keeps one "
    "chunk of activations; see response_chunk_size)",
    "sync_ref_model": "TR-DPO's reference sync is offered online only (grouppo online --ref_sync_steps)",
    "ref_model_mixup_alpha": "TR-DPO's reference mixing is not implemented",
    "ref_model_sync_steps": "offline reference sync is not implemented; online: --ref_sync_steps",
    "use_liger_kernel": "Liger kernels are not used: grouppo chunks the LM head itself (logits_chunk_size)",
    # TRL's online (GRPO/RLOO) generation options
    "steps_per_generation": "grouppo online samples fresh groups for every step's prompts; reusing one "
    "generation for several steps is not implemented (generation_batch_size only sizes generate calls)",
    "num_iterations": "grouppo online takes one optimizer step per sampled batch (no importance ratios "
    "to make several updates on one sample exact)",
    "use_vllm": "use --generation_backend vllm",
    "vllm_mode": "the vLLM engine runs colocated in the training process (--generation_backend vllm)",
    "generation_kwargs": "give the sampling options by name (temperature, top_p, top_k, min_p, "
    "repetition_penalty, max_completion_length)",
    "scale_rewards": "rewards only rank a group's responses into positives and negatives "
    "(positive_rule); they are not normalized into advantages",
    "mask_truncated_completions": "truncated completions are kept and scored as they are",
}


# ``grouppo gdpo`` without --dataset_name: the embedded opinion data and these defaults, sized for a CPU;
# any flag or YAML key overrides them.
GDPO_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/gdpo",
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,  # question x population groups (~15 rows each)
    "learning_rate": 5e-5,
    "lr_scheduler_type": "constant",
    "logging_steps": 4,
    "save_strategy": "no",
    "precompute_ref_logps": True,
    "max_length": 256,
    # Coupled: a batch of 4 short groups holds little activation memory, and on a CPU the decoupled
    # backward's extra forward would cost a quarter of the step.
    "response_chunk_size": None,
}
