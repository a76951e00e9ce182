"""The model card a trainer writes into every output folder (and ``push_to_hub`` uploads), in TRL's
manner: what was trained, from what, on what, how, and the last metrics; a PEFT adapter's type and
settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from grouppo.environment import grouppo_version


def model_card(trainer: Any, model_name: str | None = None) -> str:
    """A model card in TRL's manner: what was trained, from what, on what, how, and the last metrics. The
    front matter is written by a YAML writer, so that no path or name can add a field to it."""
    args = trainer.args
    method = trainer.card_method
    settings = {name: getattr(args, name) for name in trainer.card_settings if hasattr(args, name)}
    last = {}
    for entry in trainer.state.log_history:
        last.update({k: v for k, v in entry.items() if isinstance(v, int | float)})
    metric_rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(last.items())) or "| (none logged) | |"
    adapter = adapter_settings(trainer.accelerator.unwrap_model(trainer.model))
    settings.update({f"adapter {k}": v for k, v in adapter.items()})
    setting_rows = "\n".join(f"| {k} | {cell(v)} |" for k, v in settings.items())
    base = trainer.base_model_name or "unknown"
    front = {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "tags": ["grouppo", method.replace(" ", "-").lower(), "trl-compatible"]
        + ([adapter["type"].lower()] if adapter else []),
    }
    loading = (
        f"\nThe output is a {adapter['type']} adapter: load it with "
        "`peft.AutoPeftModelForCausalLM.from_pretrained(path)`, or `PeftModel.from_pretrained(base_model, "
        "path)` (`merge_and_unload()` folds it in).\n"
        if adapter
        else ""
    )
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {cell(model_name or Path(args.output_dir).name)}

{cell(base)} fine-tuned with {method} by [grouppo](https://pypi.org/project/grouppo/) {grouppo_version()}:
{trainer.state.global_step} optimizer steps.
{loading}
- **Data:** {cell(trainer.data_description or "not recorded")}
- **Method:** {method} ({type(trainer).__name__}), reference {trainer.reference.describe()}

## Settings

| setting | value |
|---|---|
{setting_rows}

## Final metrics (last logged values)

| metric | value |
|---|---|
{metric_rows}
"""


def adapter_settings(model: Any) -> dict[str, Any]:
    """The PEFT adapter of ``model`` (its type, rank, alpha, dropout, target modules and the modules
    trained in full), or {} for a model trained in all its weights."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return {}
    config = next(iter(configs.values()))
    kind = str(getattr(config, "peft_type", "adapter")).split(".")[-1]
    if getattr(config, "use_dora", False):
        kind = "DoRA"
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora")
    values = {name: getattr(config, name) for name in fields if getattr(config, name, None) is not None}
    if isinstance(values.get("target_modules"), set):
        values["target_modules"] = sorted(values["target_modules"])
    return {"type": kind, **values}


def cell(value: Any) -> str:
    """``value`` on one line of markdown, its table bars escaped."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")
