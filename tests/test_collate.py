"""grouppo.collate: the batch layout (one row per prompt, one per response) and the row selection that
the reference uses, and the group selection of evaluation."""

import torch

from grouppo.collate import GROUP_KEYS, GroupCollator, select_groups, select_rows, to_device


def features():
    return [
        {"prompt_ids": [5, 6, 7], "response_ids": [[8], [9, 10]], "labels": [1, 0], "scores": [1.0, 0.0]},
        {"prompt_ids": [11], "response_ids": [[12, 13, 14], [15], [16]], "labels": [1, 0, 0],
         "scores": [0.5, 0.2, 0.1]},
    ]  # fmt: skip


def test_groups_are_padded_prompt_once_responses_each():
    batch = GroupCollator(pad_token_id=0)(features())
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [11, 0, 0]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["response_ids"].tolist() == [[8, 0, 0], [9, 10, 0], [12, 13, 14], [15, 0, 0], [16, 0, 0]]
    assert batch["group_index"].tolist() == [0, 0, 1, 1, 1] and batch["slot"].tolist() == [0, 1, 0, 1, 2]
    assert batch["labels"].tolist() == [1, 0, 1, 0, 0] and "ref_logps" not in batch
    with_ref = GroupCollator(pad_token_id=0)(
        [{**f, "ref_logps": [-1.0] * len(f["labels"])} for f in features()]
    )
    assert with_ref["ref_logps"].tolist() == [-1.0] * 5


def test_selected_rows_keep_every_prompt_and_their_group_index():
    batch = GroupCollator(pad_token_id=0)(features())
    keep = torch.tensor([True, False, False, True, True])
    rows = select_rows(batch, keep)
    for key in GROUP_KEYS & set(batch):
        assert torch.equal(rows[key], batch[key])
    assert rows["response_ids"].tolist() == [[8, 0, 0], [15, 0, 0], [16, 0, 0]]
    assert rows["group_index"].tolist() == [0, 1, 1] and rows["slot"].tolist() == [0, 1, 2]
    assert set(rows) == set(batch)


def test_to_device_moves_tensors_and_leaves_other_values():
    moved = to_device({"a": torch.ones(2), "b": [1, 2]}, "meta")
    assert moved["a"].device.type == "meta" and moved["b"] == [1, 2]


def test_the_placeholder_is_one_group_of_two_responses_marked_as_such():
    from grouppo.collate import placeholder_batch

    batch = placeholder_batch(pad_token_id=0)
    assert batch["prompt_ids"].tolist() == [[0]] and batch["response_ids"].tolist() == [[0], [0]]
    assert batch["labels"].tolist() == [1, 0] and batch["placeholder"].tolist() == [1]
    assert set(select_rows(batch, torch.tensor([True, True]))) == set(batch)


def test_selected_groups_keep_their_prompts_and_only_their_responses():
    batch = GroupCollator(pad_token_id=0)(features() + features()[:1])
    first = select_groups(batch, 2)
    assert first["prompt_ids"].shape[0] == 2 and first["response_ids"].shape[0] == 5
    assert first["group_index"].tolist() == [0, 0, 1, 1, 1]
    assert first["scores"].tolist() == batch["scores"][:5].tolist()
    only = select_groups(batch, 1)
    assert only["prompt_ids"].tolist() == [[5, 6, 7]] and only["labels"].tolist() == [1, 0]
