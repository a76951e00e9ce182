"""grouppo.groupdpo: GroupDPOConfig's choices, ranges, TRL's names and defaults, and the response cut at
max_completion_length."""

import pytest
from conftest import trainer_config

from grouppo import (
    GDPOConfig,
    GroupDPOConfig,
    GroupDPOTrainer,
    OnlineGroupDPOConfig,
)
from grouppo.embedded.synthetic import reversal_groups, tiny_llama


def test_config_rejects_unknown_choices(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        GroupDPOConfig(output_dir=str(tmp_path), loss_type="ipo")
    with pytest.raises(ValueError, match="positive_rule"):
        GroupDPOConfig(output_dir=str(tmp_path), positive_rule="median")


GROUPS = reversal_groups(12, group_size=4, seed=3)


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("cls", "option", "value"),
    [
        (GroupDPOConfig, "beta", 0.0),
        (GroupDPOConfig, "beta", -0.1),
        (GroupDPOConfig, "beta", float("nan")),
        (GroupDPOConfig, "nll_weight", -0.2),
        (GroupDPOConfig, "score_temperature", 0.0),
        (GroupDPOConfig, "score_temperature", -1.0),
        (GroupDPOConfig, "response_chunk_size", 0),
        (GroupDPOConfig, "logits_chunk_size", 0),
        (GroupDPOConfig, "max_length", 0),
        (GroupDPOConfig, "max_completion_length", 0),
        (GroupDPOConfig, "max_nonfinite_steps", 0),
        (GDPOConfig, "beta", 0.0),
        (GDPOConfig, "calibration_weight", -1.0),
        (OnlineGroupDPOConfig, "num_generations", 1),
        (OnlineGroupDPOConfig, "top_p", 1.5),
        (OnlineGroupDPOConfig, "temperature", -1.0),
    ],
)
def test_objective_options_out_of_range_are_refused_by_name(tmp_path, cls, option, value):
    with pytest.raises(ValueError, match=rf"^{option}=.*expected"):
        cls(output_dir=str(tmp_path), **{option: value})


def test_trl_names_and_defaults(tmp_path):
    args = GroupDPOConfig(output_dir=str(tmp_path), loss_type="sigmoid", precompute_ref_log_probs=True)
    assert args.loss_type == "all_pairs" and args.precompute_ref_logps
    # DPOConfig's defaults, not TrainingArguments' 5e-5 and 500.
    assert (args.learning_rate, args.logging_steps) == (1e-6, 10)


def test_max_completion_length_cuts_every_response(tmp_path, tokenizer):
    cut = GroupDPOTrainer(tiny_llama(tokenizer), args=trainer_config(tmp_path, max_completion_length=3),
                          train_dataset=GROUPS, processing_class=tokenizer)  # fmt: skip
    full = GroupDPOTrainer(tiny_llama(tokenizer), args=trainer_config(tmp_path), train_dataset=GROUPS,
                           processing_class=tokenizer)  # fmt: skip
    for short, whole in zip(
        cut.train_dataset["response_ids"], full.train_dataset["response_ids"], strict=True
    ):
        assert short == [ids[:3] for ids in whole]
    assert any(len(ids) > 3 for group in full.train_dataset["response_ids"] for ids in group)
