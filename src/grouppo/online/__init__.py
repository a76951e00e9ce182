"""Online GroupDPO: sample K responses per prompt from the current policy, score them, train on the group.

``trainer`` holds ``OnlineGroupDPOConfig``/``OnlineGroupDPOTrainer``; ``rewards`` the reward functions in
TRL's ``reward_funcs`` shape; ``rollout`` the sample-score-group step that ``grouppo sample`` and the
trainer share. The samplers themselves are ``grouppo.generation``'s.
"""

from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

__all__ = ["OnlineGroupDPOConfig", "OnlineGroupDPOTrainer"]
