"""grouppo: group-wise preference optimization for Hugging Face causal language models."""

from grouppo.data import DataError, labels_from_scores, load_records, prepare_groups
from grouppo.decoupled import group_logps
from grouppo.losses import LOSSES, GroupBatch, Groups, group_dpo_loss
from grouppo.trainer import GroupDPOConfig, GroupDPOTrainer

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "DataError",
    "GroupBatch",
    "GroupDPOConfig",
    "GroupDPOTrainer",
    "Groups",
    "group_dpo_loss",
    "group_logps",
    "labels_from_scores",
    "load_records",
    "prepare_groups",
]
