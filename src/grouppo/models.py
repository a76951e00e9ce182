"""The one way every command, trainer and script turns a model name into a model and a tokenizer.

``None``, ``""``, ``"default"``, ``"embedded"`` and ``"SmolLM2-135M-Instruct"`` name the embedded model
(``grouppo.embedded.models``: converted once, offline); any other name is a Hugging Face Hub name or a
local path, as for ``from_pretrained``.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grouppo.embedded.models import EMBEDDED_HUB_NAME, embedded_model_dir, is_embedded

logger = logging.getLogger(__name__)


def resolve_model(name_or_path: str | None) -> str:
    """The ``from_pretrained`` argument for ``name_or_path``: the embedded model's directory for an alias
    (converting it on first use), anything else unchanged (a hub name or a local path). The Hub name of
    the embedded model (``EMBEDDED_HUB_NAME``) resolves to the embedded copy, with a warning, when the
    Hub cannot be reached and the model is not in the local Hugging Face cache."""
    if is_embedded(name_or_path):
        return str(embedded_model_dir())
    if name_or_path == EMBEDDED_HUB_NAME and not Path(name_or_path).is_dir() and not _cached(name_or_path):
        if not hub_reachable():
            logger.warning(
                "%s cannot be downloaded (no connection to the Hugging Face Hub) and is not in the local "
                "cache: using grouppo's embedded copy of it (the Q4_1 GGUF release, dequantized to float32: "
                "close to the Hub's weights, not equal to them)", name_or_path,
            )  # fmt: skip
            return str(embedded_model_dir())
    return name_or_path


def _cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # an old or missing huggingface_hub: treat as not cached
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub answers (False at once when ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be loaded; the message names it and what a loadable one holds."""


EXPECTED = "a folder holding config.json and the weights (model.safetensors), or a Hugging Face Hub name"


def _check_local(name: str, model: bool = True) -> None:
    path = Path(name)
    if path.is_file():
        raise ModelLoadError(f"model {name!r} is a file; expected {EXPECTED}")
    if model and path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {name!r} holds no config.json; expected {EXPECTED}")


def load_model(
    name_or_path: str | PreTrainedModel | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` of the resolved name (``dtype=None``: the checkpoint's); a
    model object is returned as it is."""
    if isinstance(name_or_path, torch.nn.Module):
        return name_or_path
    if dtype is not None:
        kwargs["dtype"] = dtype
    name = resolve_model(name_or_path)
    _check_local(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as error:  # OSError, ValueError, safetensors' SafetensorError (a truncated file), ...
        raise ModelLoadError(f"cannot load the model {name!r}: {type(error).__name__}: {error}") from error


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its EOS token as pad token (padding is masked, so any token
    does); a tokenizer with neither cannot end or pad a response, and is refused."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"the tokenizer {name!r} has neither a pad token nor an EOS token: grouppo needs an EOS "
                "token to end responses; set tokenizer.eos_token (and tokenizer.pad_token) before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` of the resolved name, with a pad token (``ensure_pad_token``)."""
    name = resolve_model(name_or_path)
    _check_local(name, model=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as error:  # OSError, ValueError, a KeyError from a damaged tokenizer.json, ...
        problem = f"{type(error).__name__}: {error}"
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {problem}") from error
    return ensure_pad_token(tokenizer)
