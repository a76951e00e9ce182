"""The reference policy of the implicit reward: where its log-probs come from, and their disk cache.

``Reference`` is one object whose methods are the reference's steps: it is built with the trainer's
policy (``Reference(policy, ref_model, adapter=..., precompute=...)``), placed by the trainer's
accelerator (``prepare``), precomputes a dataset's log-probs once when asked (``precompute``), scores a
batch during training (``logps``) and, online, can be re-synced to the policy (``sync``). It takes one
of four forms:

* a given reference model (``ref_model``), frozen;
* with a PEFT policy and no ``ref_model``: the base model with the adapter disabled (no extra copy);
* with ``precompute``: the values are computed before training, from the forms above or, when neither
  applies, from the initial policy itself, and read from the batches (``ref_logps``) afterwards;
* otherwise: a frozen copy of the initial policy.

Precomputing the reference once per dataset is the cheap way to train offline; recomputing it on every
run of the same data and model is not. The key is a SHA-256 over everything the values depend on: the
reference's weights and dtypes (every tensor of its state dict, as TRL hashes models), the tokenized
groups (prompt and response token ids, so data, tokenizer, chat template and truncation are all
covered), and a format version bumped whenever grouppo changes how it scores. A cached file is plain
JSON: ``{"format", "sha256", "values"}``, ``values`` holding one list of floats per group in dataset
order and ``sha256`` their digest. A file is checked when it is read (parses, format, digest, one value
per response, all finite); one that fails is reported by path and recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from grouppo.logps import eval_mode

if TYPE_CHECKING:
    from grouppo.trainer import PreferenceTrainer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2


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


def _values_digest(values: list[list[float]]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def load(path: Path, dataset: Dataset) -> list[list[float]] | None:
    """The cached values, or None when the file is absent; a file that is unreadable, of another format,
    altered (its digest), shaped unlike the dataset or holding non-finite values is reported and ignored,
    so the values are recomputed (and the file rewritten)."""
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or content.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a grouppo reference cache of format {FORMAT_VERSION}")
        values = content["values"]
        if content.get("sha256") != _values_digest(values):
            raise ValueError("its values do not match their checksum (the file was altered or truncated)")
        sizes = [len(r) for r in dataset["response_ids"]]
        if not isinstance(values, list) or [len(v) for v in values] != sizes:
            raise ValueError(f"it does not hold one value per response of the {len(sizes)} groups")
        if not all(math.isfinite(x) for row in values for x in row):
            raise ValueError("it holds values that are not finite")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        logger.warning("reference log-prob cache %s is unusable (%s): recomputing it", path, error)
        return None
    return values


def save(path: Path, values: list[list[float]]) -> None:
    """Write atomically (a temporary file, then a rename), so concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    content = {"format": FORMAT_VERSION, "sha256": _values_digest(values), "values": values}
    tmp.write_text(json.dumps(content), encoding="utf-8")
    tmp.replace(path)


class Reference:
    """The reference policy of a ``PreferenceTrainer`` (see the module docstring for its four forms)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        ref_model: torch.nn.Module | None = None,
        *,
        adapter: bool = False,
        precompute: bool = False,
    ) -> None:
        if ref_model is not None:
            self.kind = "the given reference model"
        elif adapter:
            self.kind = "the base model with the adapter disabled"
        elif precompute:
            self.kind = "the initial policy"
        else:
            self.kind, ref_model = "a frozen copy of the initial policy", copy.deepcopy(policy)
        if precompute:
            self.kind = f"precomputed from {self.kind}"
        self.model = ref_model
        self._trainer: PreferenceTrainer | None = None

    def describe(self) -> str:
        """What the reference is, in words (for logs and model cards)."""
        return self.kind

    def prepare(self, trainer: PreferenceTrainer) -> None:
        """Freeze the reference model and place it with the trainer's accelerator (evaluation mode)."""
        self._trainer = trainer
        if self.model is not None:
            self.model.eval().requires_grad_(False)
            self.model = trainer.accelerator.prepare_model(self.model, evaluation_mode=True)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], initial_policy: bool = False) -> torch.Tensor:
        """Reference log-probs of the batch's rows: the precomputed ``ref_logps`` when the batch has them,
        else scored by the reference model, the adapter-disabled base, or (``initial_policy``: only while
        precomputing, before any step) the policy itself. Rows the trainer leaves out
        (``_reference_rows``) get 0."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        trainer = self._trainer
        keep = trainer._reference_rows(batch)
        if keep is None:
            return self._score(batch, initial_policy)
        n = keep.numel()
        rows = {
            key: value[keep] if not key.startswith("prompt") and value.shape[:1] == (n,) else value
            for key, value in batch.items()
        }
        scored = self._score(rows, initial_policy)
        out = scored.new_zeros(n)
        out[keep] = scored
        return out

    def _score(self, batch: dict[str, torch.Tensor], initial_policy: bool) -> torch.Tensor:
        trainer = self._trainer
        if self.model is not None:
            return trainer._logps(self.model, batch)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(policy, "disable_adapter"):
            reference = policy.disable_adapter()
        elif initial_policy:
            reference = nullcontext()
        else:
            raise ValueError(
                "This batch has no precomputed `ref_logps` and the trainer keeps no reference model "
                "(precompute_ref_logps=True): pass datasets to the trainer's constructor so their reference "
                "log-probs are computed before training."
            )
        with eval_mode(policy), reference:
            return trainer._logps(policy, batch)

    def precompute(self, dataset: Dataset | None) -> Dataset | None:
        """``dataset`` with a ``ref_logps`` column (one float per row), computed once or read from the disk
        cache. The main process computes first; the others then find its cache file."""
        if dataset is None or "ref_logps" in dataset.column_names:
            return dataset
        trainer = self._trainer
        args = trainer.args
        path = None
        if args.ref_logps_cache:
            scorer = trainer.accelerator.unwrap_model(self.model or trainer.model)
            path = cache_path(args.ref_logps_cache_dir or default_cache_dir(), scorer, dataset)
        with trainer.accelerator.main_process_first():
            values = load(path, dataset) if path else None
            if values is not None:
                logger.info("reference log-probs of %d groups read from %s", len(values), path)
            else:
                values = self.compute(dataset)
                bad = sum(not math.isfinite(x) for row in values for x in row)
                if bad:
                    raise FloatingPointError(
                        f"{bad} reference log-probs are not finite ({self.kind} scores NaN or "
                        "infinity): check the reference model's weights"
                    )
                if path and trainer.accelerator.is_main_process:
                    save(path, values)
        return dataset.add_column("ref_logps", values)

    def compute(self, dataset: Dataset) -> list[list[float]]:
        """Score every group of ``dataset`` with the reference (the initial policy when there is no other)."""
        trainer = self._trainer
        loader = DataLoader(
            dataset,
            batch_size=trainer.args.per_device_eval_batch_size,
            collate_fn=trainer.data_collator,
            shuffle=False,
        )
        values: list[list[float]] = []
        quiet = trainer.args.disable_tqdm or not trainer.accelerator.is_local_main_process
        for batch in tqdm(loader, desc="reference log-probs", unit="batch", disable=quiet):
            batch = trainer._prepare_inputs(batch)
            logps = self.logps(batch, initial_policy=True).cpu()
            sizes = torch.bincount(batch["group_index"].cpu()).tolist()
            values.extend(part.tolist() for part in logps.split(sizes))
        return values

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights into the reference model (online training's ``ref_sync_steps``)."""
        if self.model is None:
            raise ValueError("this reference has no model of its own to re-sync (PEFT or precomputed)")
        self._trainer.accelerator.unwrap_model(self.model).load_state_dict(policy.state_dict())
