"""``grouppo groupdpo``, ``grouppo online`` and ``grouppo gdpo``: the training commands, as ``trl dpo``.

Their options are the fields of ``ScriptArguments`` (model, data, PEFT) and of the trainer's config
(``GroupDPOConfig``, ``OnlineGroupDPOConfig``, ``GDPOConfig``), as flags or as keys of a YAML ``--config``.
What can be checked without the model is, first: the options, output_dir, the checkpoint to resume from,
and the data (read and validated by the trainer before its tokenizer and model load).
"""

from __future__ import annotations

from typing import Any

from grouppo.apps.cli.arguments import GDPO_EMBEDDED_DEFAULTS, REFUSED, ScriptArguments
from grouppo.apps.cli.config import (
    CommandError,
    dataclass_parser,
    is_main_process,
    parse_with_config,
    read_data,
    resume_checkpoint,
    writable_dir,
)
from grouppo.embedded.models import EMBEDDED_MODEL

DESCRIPTIONS = {
    "groupdpo": "GroupDPO on group records (prompt, K responses, scores or labels), or on TRL pairwise or "
    "UltraFeedback data, converted.",
    "online": "Online GroupDPO: each step samples num_generations responses per prompt record from the "
    "policy, scores them with reward_funcs and trains on the groups.",
    "gdpo": "GDPO on belief records; without --dataset_name, the embedded opinion data and defaults fit "
    "for a CPU.",
}
EPILOG = (
    "Every option is also a key of the YAML --config file (`beta: 0.1`; a list for an option taking "
    "several values, true/false for a switch); flags given after it override it. --resume_from_checkpoint "
    "takes a checkpoint folder, or true for the latest checkpoint-N in output_dir."
)


def trainer_classes(kind: str) -> tuple[type, type]:
    """The config and trainer classes of ``grouppo {kind}``."""
    if kind == "online":
        from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

        return OnlineGroupDPOConfig, OnlineGroupDPOTrainer
    if kind == "gdpo":
        from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer

        return GDPOConfig, GDPOTrainer
    from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer

    return GroupDPOConfig, GroupDPOTrainer


def training_parser(kind: str) -> Any:
    """The parser of ``grouppo {kind}``: ScriptArguments, the trainer's config and --config."""
    config_class, _ = trainer_classes(kind)
    parser = dataclass_parser(
        (ScriptArguments, config_class),
        prog=f"grouppo {kind}",
        usage=f"grouppo {kind} [--config CONFIG.yaml] [--option value ...]",
        description=DESCRIPTIONS[kind],
        epilog=EPILOG,
    )
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = (
                "A checkpoint folder to resume training from, or true: the latest checkpoint-N in "
                "output_dir (an error if there is none)."
            )
    return parser


def refuse_trl_options(parser: Any, argv: list[str]) -> None:
    """A usage error naming a TRL option grouppo does not take (a flag or a key of --config) and why."""
    names = [token[2:].split("=", 1)[0] for token in argv if token.startswith("--")]
    if "--config" in argv[:-1]:
        import yaml

        try:
            with open(argv[argv.index("--config") + 1], encoding="utf-8") as f:
                values = yaml.safe_load(f)
            names += list(values) if isinstance(values, dict) else []
        except (OSError, yaml.YAMLError):
            pass  # reported by parse_with_config
    for name in names:
        if name in REFUSED:
            parser.error(f"--{name}: not supported by grouppo: {REFUSED[name]}")


def parse_training_arguments(argv: list[str], kind: str) -> tuple[Any, ScriptArguments, Any, bool]:
    """(parser, script arguments, config, embedded) of a training command's argv (the --config YAML first,
    flags over it); ``embedded``: gdpo without --dataset_name (the embedded opinions and their defaults)."""
    parser = training_parser(kind)
    refuse_trl_options(parser, argv)
    script, config, *_ = parse_with_config(parser, argv)
    embedded = kind == "gdpo" and not script.dataset_name
    if embedded:  # again, the embedded defaults under the YAML and the flags
        script, config, *_ = parse_with_config(parser, argv, defaults=GDPO_EMBEDDED_DEFAULTS)
    if not embedded and not script.dataset_name:
        parser.error("--dataset_name is required (as a flag or a key of --config)")
    if kind == "online" and not config.reward_funcs:
        parser.error(
            "--reward_funcs is required (built-in names such as ifeval, module:function paths "
            "or reward model names; as a flag or a key of --config)"
        )
    return parser, script, config, embedded


def training_data(script: ScriptArguments, config: Any) -> tuple[list, list | None]:
    """The training and evaluation records of a training command (read, not yet validated: the trainer
    does that before anything loads). Without ``eval_dataset_name``, evaluation takes
    ``dataset_test_split`` of the training data when it has that split and evaluation is on
    (``eval_strategy`` not "no"), as TRL does."""
    from grouppo.load import dataset_splits

    name = script.dataset_name
    train = read_data(name, split=script.dataset_train_split, config_name=script.dataset_config)
    eval_name, eval_config = script.eval_dataset_name, None
    if eval_name is None and config.eval_strategy != "no":
        if script.dataset_test_split not in dataset_splits(name, script.dataset_config):
            raise CommandError(
                f"eval_strategy is {str(getattr(config.eval_strategy, 'value', config.eval_strategy))!r} but "
                f"there is no evaluation data: {name} has no {script.dataset_test_split!r} split; give "
                "--eval_dataset_name (or --dataset_test_split), or --eval_strategy no"
            )
        eval_name, eval_config = name, script.dataset_config
    evaluation = None
    if eval_name is not None:
        evaluation = read_data(eval_name, split=script.dataset_test_split, config_name=eval_config)
    return train, evaluation


def check_report_to(config: Any) -> None:
    """CommandError naming every ``report_to`` integration that is not installed (before any model loads)."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = [r for r in (config.report_to or []) if r not in ("none", "all")]
    missing = [r for r in wanted if r not in get_available_reporting_integrations()]
    if missing:
        raise CommandError(
            f"--report_to {' '.join(missing)}: not installed; install it (pip install {' '.join(missing)}) "
            f"or choose another (installed: {', '.join(get_available_reporting_integrations()) or 'none'})"
        )


def train(argv: list[str], kind: str) -> int:
    """Run ``grouppo {kind}``."""
    _, trainer_class = trainer_classes(kind)
    _, script, config, embedded = parse_training_arguments(argv, kind)
    check_report_to(config)
    writable_dir(config.output_dir)
    resume = resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if embedded:
        from grouppo.embedded.opinions import write_opinions

        data_dir = f"{config.output_dir}/data"
        # Seed 0 always, as `grouppo data make-opinions` writes by default: the splits (and so the
        # held-out test questions) do not move with the training seed.
        write_opinions(data_dir, seed=0, template=config.belief_template)
        script.dataset_name = f"{data_dir}/train.jsonl"
        if config.eval_strategy != "no":  # else its reference pass would be computed for nothing
            script.eval_dataset_name = script.eval_dataset_name or f"{data_dir}/eval.jsonl"
        print(f"embedded opinion data (seed 0) written to {data_dir}")
    train_records, evaluation = training_data(script, config)
    init = dict(config.model_init_kwargs or {})
    dtype = script.torch_dtype or script.dtype
    loading = {"revision": script.model_revision, "trust_remote_code": script.trust_remote_code or None}
    loading = {k: v for k, v in loading.items() if v}
    init.update({"dtype": dtype} if dtype != "auto" else {})
    init.update(loading)
    if script.attn_implementation:
        init["attn_implementation"] = script.attn_implementation
    config.model_init_kwargs = init
    peft_config = None
    if script.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
            target_modules=script.lora_target_modules, modules_to_save=script.lora_modules_to_save,
            task_type=script.lora_task_type, use_rslora=script.use_rslora, use_dora=script.use_dora,
        )  # fmt: skip
    # A revision or remote code concerns the tokenizer too; otherwise the trainer loads it after the data.
    tokenizer = None
    if loading:
        from grouppo.models import load_tokenizer

        tokenizer = load_tokenizer(script.model_name_or_path or EMBEDDED_MODEL, **loading)
    trainer = trainer_class(
        script.model_name_or_path or EMBEDDED_MODEL,
        ref_model=script.ref_model_name_or_path,
        args=config,
        train_dataset=train_records,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if is_main_process():
        print(f"training with {trainer.describe_setup()}", flush=True)
        if resume is not None:
            print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    metrics = trainer.evaluate() if evaluation is not None else None
    # Every rank waits for the others and the process group is torn down here, not left to the
    # interpreter's teardown (see ``grouppo.apps.cli.run`` for why that teardown is skipped).
    main = trainer.accelerator.is_main_process
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if main:  # one process says it
        if metrics is not None:
            print(metrics)
        print(f"saved to {config.output_dir}")
    return 0


def groupdpo(argv: list[str]) -> int:
    return train(argv, "groupdpo")


def online(argv: list[str]) -> int:
    return train(argv, "online")


def gdpo(argv: list[str]) -> int:
    return train(argv, "gdpo")
