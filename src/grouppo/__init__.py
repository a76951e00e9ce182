"""grouppo: group-wise preference optimization for Hugging Face causal language models.

The core reads top to bottom: ``data`` (record schemas, validation, loading) -> ``tokenize`` ->
``collate`` -> ``logps`` (per-response log-probs, prompt shared) -> ``decoupled`` (the exact decoupled
backward) -> ``losses`` (pure group losses) -> ``reference`` -> ``trainer`` (the step). ``convert`` reads
other formats. Method extensions live in ``online`` and ``gdpo``, what ships inside in ``embedded``, and
the command line and main job in ``apps``.
"""

from grouppo.data import DataError, labels_from_scores, prepare_belief_records, prepare_groups
from grouppo.decoupled import group_logps
from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer
from grouppo.load import load_records
from grouppo.losses import LOSSES, FlatGroupBatch, PaddedGroups, gdpo_loss, group_dpo_loss
from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer
from grouppo.trainer import GroupDPOConfig, GroupDPOTrainer, PreferenceConfig, PreferenceTrainer

__version__ = "0.1.0"

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
