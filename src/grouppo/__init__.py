"""grouppo: group-wise preference optimization for Hugging Face causal language models."""

from grouppo.beliefs import prepare_belief_records
from grouppo.data import DataError, labels_from_scores, load_records, prepare_groups
from grouppo.decoupled import group_logps
from grouppo.gdpo import GDPOConfig, GDPOTrainer
from grouppo.losses import LOSSES, GroupBatch, Groups, gdpo_loss, group_dpo_loss
from grouppo.trainer import GroupDPOConfig, GroupDPOTrainer

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "DataError",
    "GDPOConfig",
    "GDPOTrainer",
    "GroupBatch",
    "GroupDPOConfig",
    "GroupDPOTrainer",
    "Groups",
    "gdpo_loss",
    "group_dpo_loss",
    "group_logps",
    "labels_from_scores",
    "load_records",
    "prepare_belief_records",
    "prepare_groups",
]
