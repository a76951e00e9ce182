import json
import os

import pytest
import torch

from grouppo.embedded.synthetic import (
    random_groups,  # noqa: F401  (the tests import it from here)
    tiny_llama,
    tiny_tokenizer,
)


@pytest.fixture(autouse=True, scope="session")
def _reference_cache_in_tmp(tmp_path_factory):
    """Precomputed reference log-probs are cached on disk: never in the user's home during tests."""
    os.environ["GROUPPO_CACHE"] = str(tmp_path_factory.mktemp("grouppo-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer, seed=0)


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """The tiny model and its tokenizer saved as a ``from_pretrained`` folder."""
    path = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def group_loss(model, batch, loss_type="all_pairs", **kw):
    """A group DPO loss with NLL on ``batch`` against fixed reference log-probs (``kw`` to group_logps)."""
    from grouppo.decoupled import group_logps
    from grouppo.losses import FlatGroupBatch, group_dpo_loss

    logps = group_logps(model, batch, **kw)
    ref = torch.linspace(-30, -10, logps.shape[0], dtype=logps.dtype)
    loss, _ = group_dpo_loss(
        FlatGroupBatch(logps, ref, batch["response_mask"].sum(-1), batch["labels"], batch["scores"],
                   batch["group_index"], batch["slot"]),
        beta=0.5, loss_type=loss_type, nll_weight=0.3,
    )  # fmt: skip
    return loss


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def loss_grad(model, batch, loss_type, **kw):
    """The flat gradient of ``group_loss`` from zeroed gradients."""
    model.zero_grad()
    group_loss(model, batch, loss_type, **kw).backward()
    return grads(model)


def recompute_metrics(rows):
    """IFEval's accuracies from saved generations' per-instruction results (None: unscored, left out of
    every denominator; a prompt with no scored instruction is left out of the prompt-level ones)."""
    out = {"num_prompts": len(rows), "unscored_instructions": sum(r["strict"].count(None) for r in rows)}
    for kind in ("strict", "loose"):
        prompts = [[v for v in r[kind] if v is not None] for r in rows]
        prompts = [p for p in prompts if p]
        instructions = [v for p in prompts for v in p]
        out[f"prompt_level_{kind}"] = sum(all(p) for p in prompts) / len(prompts) if prompts else 0.0
        out[f"instruction_level_{kind}"] = sum(instructions) / len(instructions) if instructions else 0.0
    return out


def assert_trained(saved, initial):
    """The model saved in folder ``saved`` loads, holds every tensor of the one in ``initial``, and
    training moved at least one of them (a run that saved its input unchanged fails)."""
    from safetensors.torch import load_file

    after, before = load_file(f"{saved}/model.safetensors"), load_file(f"{initial}/model.safetensors")
    assert after.keys() == before.keys()
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in before) > 1e-6


def trainer_config(tmp_path, cls=None, **kw):
    """A small, quiet training config (``cls``: GroupDPOConfig unless given) writing under ``tmp_path``."""
    from grouppo.groupdpo import GroupDPOConfig

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, per_device_eval_batch_size=4,
                max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no", disable_tqdm=True,
                logging_steps=1)  # fmt: skip
    base.update(kw)
    return (cls or GroupDPOConfig)(**base)


# ----------------------------------------------------------------------------- records and data files
def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


GROUP = {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}
PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
BELIEF = {
    "prompt": user("Should the city spend more on transit?"),
    "beliefs": ["more", "less"],
    "distribution": [0.7, 0.3],
    "belief": 0,
    "chosen": "More, buses are full.",
    "rejected": "Less, nobody rides.",
    "population": "A",
    "question_id": 0,
}


def jsonl(tmp_path, name, lines):
    """A JSON lines file from ``lines``: dicts are dumped, strings written as they are."""
    path = tmp_path / name
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def raises(exception, call, *fragments):
    """Run ``call``; assert it raises ``exception`` whose message holds every fragment; return it."""
    with pytest.raises(exception) as raised:
        call()
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return raised.value
