"""On-disk cache of precomputed reference log-probs, keyed so that any change invalidates it.

Precomputing the reference once per dataset is the cheap way to train offline; recomputing it on every
run of the same data and model is not. The key is a SHA-256 over everything the values depend on: the
reference's weights and dtypes (every tensor of its state dict, as TRL hashes models), the tokenized
groups (prompt and response token ids, so data, tokenizer, chat template and truncation are all
covered), and a format version bumped whenever grouppo changes how it scores. A cached file is plain
JSON: one list of floats per group, in dataset order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

FORMAT_VERSION = 1


def cache_root() -> Path:
    """grouppo's cache folder: ``$GROUPPO_CACHE``, else ``$XDG_CACHE_HOME/grouppo`` (``~/.cache/grouppo``)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("GROUPPO_CACHE") or xdg / "grouppo")


def default_cache_dir() -> Path:
    """Where reference log-probs are cached: ``cache_root() / "ref_logps"``."""
    return cache_root() / "ref_logps"


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict, with names and dtypes. A PEFT model's adapter weights
    are left out: the reference is the base with the adapter disabled, whatever the adapter holds."""
    adapters = tuple(f".{name}." for name in getattr(model, "peft_config", {}))
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if adapters and any(a in name for a in adapters):
            continue
        tensor = tensor.detach().cpu()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.float()  # numpy has no such dtypes; float32 holds them exactly
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def data_digest(dataset: Dataset) -> str:
    """SHA-256 of the tokenized groups: every prompt's and response's token ids, in order."""
    h = hashlib.sha256()
    for row in dataset.select_columns(["prompt_ids", "response_ids"]):
        h.update(np.asarray(row["prompt_ids"], dtype=np.int64).tobytes())
        for ids in row["response_ids"]:
            h.update(b"|" + np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"#")
    return h.hexdigest()


def cache_path(cache_dir: str | Path, model: torch.nn.Module, dataset: Dataset) -> Path:
    """Where the reference log-probs of ``dataset`` under the reference ``model`` live."""
    key = hashlib.sha256(
        f"v{FORMAT_VERSION}|{model_digest(model)}|{data_digest(dataset)}".encode()
    ).hexdigest()
    return Path(cache_dir) / f"{key}.json"


def load(path: Path, dataset: Dataset) -> list[list[float]] | None:
    """The cached values, or None when absent or not matching the dataset's shape."""
    if not path.exists():
        return None
    values = json.loads(path.read_text())
    sizes = [len(r) for r in dataset["response_ids"]]
    if [len(v) for v in values] != sizes:
        return None
    return values


def save(path: Path, values: list[list[float]]) -> None:
    """Write atomically (a temporary file, then a rename), so concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)
