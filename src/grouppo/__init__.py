"""grouppo: group-wise preference optimization for Hugging Face causal language models.

The core reads top to bottom: ``data`` (record schemas, validation) -> ``tokenize`` -> ``collate`` ->
``logps`` (per-response log-probs, prompt shared) -> ``decoupled`` (the exact decoupled backward) ->
``losses`` (pure group losses) -> ``reference`` -> ``base`` (the trainers' shared step) -> ``groupdpo``.
``load`` and ``convert`` read files and other formats, ``models`` and ``generation`` load models and
sample from them. The other methods live in ``online`` and ``gdpo``, what ships inside in ``embedded``,
and the command line, benchmarks and main job in ``apps``.
"""

from grouppo.base import PreferenceConfig, PreferenceTrainer
from grouppo.data import DataError, labels_from_scores, prepare_belief_records, prepare_groups
from grouppo.decoupled import group_logps
from grouppo.environment import grouppo_version
from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer
from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
from grouppo.load import load_records
from grouppo.losses import LOSSES, FlatGroupBatch, PaddedGroups, gdpo_loss, group_dpo_loss
from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

__version__ = grouppo_version()

__all__ = [
    "LOSSES",
    "DataError",
    "GDPOConfig",
    "GDPOTrainer",
    "FlatGroupBatch",
    "GroupDPOConfig",
    "GroupDPOTrainer",
    "PaddedGroups",
    "OnlineGroupDPOConfig",
    "OnlineGroupDPOTrainer",
    "PreferenceConfig",
    "PreferenceTrainer",
    "gdpo_loss",
    "group_dpo_loss",
    "group_logps",
    "labels_from_scores",
    "load_records",
    "prepare_belief_records",
    "prepare_groups",
]
