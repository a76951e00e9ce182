"""Online GroupDPO: sample K responses per prompt from the current policy, score them, train on the group.

``trainer`` holds ``OnlineGroupDPOConfig``/``OnlineGroupDPOTrainer``; ``generation`` the samplers
(transformers ``generate``, optional vLLM); ``rewards`` the reward functions in TRL's ``reward_funcs``
shape; ``rollout`` the sample-score-group step that ``grouppo sample`` and the trainer share.
"""

from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

__all__ = ["OnlineGroupDPOConfig", "OnlineGroupDPOTrainer"]
