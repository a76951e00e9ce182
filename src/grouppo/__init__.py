"""grouppo: group-wise preference optimization for Hugging Face causal language models.

The core reads top to bottom: ``data`` (record schemas, validation) -> ``tokenize`` -> ``collate`` ->
``logps`` (per-response log-probs, prompt shared) -> ``decoupled`` (the exact decoupled backward) ->
``losses`` (pure group losses) -> ``reference`` -> ``base`` (the trainers' shared step) -> ``groupdpo``.
``load`` and ``convert`` read files and other formats, ``models`` and ``generation`` load models and
sample from them. The other methods live in ``online`` and ``gdpo``, what ships inside in ``embedded``,
and the command line, the benchmarks and ``grouppo quickstart`` in ``apps``.

The names below are imported when first used, so that ``import grouppo`` (and ``grouppo --help``) stays
fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from grouppo.environment import grouppo_version

__version__ = grouppo_version()

# name: the module that defines it
_EXPORTS = {
    "DataError": "grouppo.data",
    "labels_from_scores": "grouppo.data",
    "prepare_belief_records": "grouppo.data",
    "prepare_groups": "grouppo.data",
    "group_logps": "grouppo.decoupled",
    "GDPOConfig": "grouppo.gdpo.trainer",
    "GDPOTrainer": "grouppo.gdpo.trainer",
    "GroupDPOConfig": "grouppo.groupdpo",
    "GroupDPOTrainer": "grouppo.groupdpo",
    "load_records": "grouppo.load",
    "LOSSES": "grouppo.losses",
    "FlatGroupBatch": "grouppo.losses",
    "PaddedGroups": "grouppo.losses",
    "gdpo_loss": "grouppo.losses",
    "group_dpo_loss": "grouppo.losses",
    "OnlineGroupDPOConfig": "grouppo.online.trainer",
    "OnlineGroupDPOTrainer": "grouppo.online.trainer",
    "PreferenceConfig": "grouppo.base",
    "PreferenceTrainer": "grouppo.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grouppo' has no attribute {name!r}")
