"""The reference policy of the implicit reward: where its log-probs come from, and their disk cache.

``Reference`` is one object whose methods are the reference's steps: it is built with the policy
(``Reference(policy, ref_model, adapter=..., precompute=...)``), placed by an accelerator and given the
scoring function and the row selection it uses (``prepare``), precomputes a dataset's log-probs once when
asked (``precompute``), scores a batch during training (``logps``) and, online, can be re-synced to the
policy (``sync``). It receives what it uses and knows nothing of the trainer. It takes one of four forms:

* a given reference model (``ref_model``), frozen;
* with a PEFT policy and no ``ref_model``: the base model with the adapter disabled (no extra copy);
* with ``precompute``: the values are computed before training, from the forms above or, when neither
  applies, from the initial policy itself, and read from the batches (``ref_logps``) afterwards;
* otherwise: a frozen copy of the initial policy.

Precomputing the reference once per dataset is the cheap way to train offline; recomputing it on every
run of the same data and model is not. The key is a SHA-256 over everything the values depend on: the
reference's weights and dtypes (every parameter and buffer, gathered whole under FSDP2 and ZeRO-3),
the tokenized groups (prompt and response token ids, so data, tokenizer, chat template and truncation
are all covered), and a format version bumped whenever grouppo changes how it scores. A cached file is plain
JSON: ``{"format", "sha256", "values"}``, ``values`` holding one list of floats per group in dataset
order and ``sha256`` their digest. A file is checked when it is read (parses, format, digest, one value
per response, all finite); one that fails is reported by path and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from torch.utils.data import DataLoader

from grouppo.collate import select_rows, to_device
from grouppo.engines import (
    copy_weights,
    frozen_copy,
    full_tensors,
    prepare_frozen,
    release,
    reshard,
    sharding_engine,
)
from grouppo.environment import progress_bar
from grouppo.logps import eval_mode

Score = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Rows = Callable[[dict[str, torch.Tensor]], "torch.Tensor | None"]

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
    """SHA-256 of every parameter and buffer, with names, dtypes and shapes, whole however the model is
    held (ZeRO-3 partitions and FSDP2 shards are gathered, one tensor at a time: every process must call
    it). A PEFT model's adapter weights are left out and its base weights named as in the base model:
    the reference is the base with the adapter disabled, whatever the adapter holds, and a plain copy of
    that base has the same digest."""
    h = hashlib.sha256()
    for name, tensor in full_tensors(model):
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
    """The reference policy of a trainer (see the module docstring for its four forms)."""

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
            self.kind, ref_model = "a frozen copy of the initial policy", frozen_copy(policy)
        if precompute:
            self.kind = f"precomputed from {self.kind}"
        self.policy = policy  # the module itself: engines wrap it (DDP, DeepSpeed) or shard it in place
        self.model = ref_model
        self.accelerator: Any = None
        self._score: Score | None = None
        self._rows: Rows | None = None

    def describe(self) -> str:
        """What the reference is, in words (for logs and model cards)."""
        return self.kind

    def prepare(self, accelerator: Any, score: Score, rows: Rows | None = None) -> None:
        """Place the reference model as ``accelerator``'s engine holds the policy (sharded under FSDP2 and
        ZeRO-3, a replica otherwise; ``grouppo.engines.prepare_frozen``) and set how rows are scored:
        ``score(model, batch)`` gives per-row log-probs, ``rows(batch)`` which rows the reference scores
        (a bool mask, None for all; the others get 0)."""
        self.accelerator, self._score, self._rows = accelerator, score, rows
        if self.model is not None:
            self.model = prepare_frozen(self.model, accelerator)

    @contextmanager
    def precomputing(self) -> Iterator[None]:
        """Around ``precompute`` calls. With no reference model of its own (the initial policy, or the
        adapter-disabled base) under FSDP2 or ZeRO-3, the policy is not usable yet: the engine shards it
        only when training starts, and ZeRO-3 built it already partitioned. A temporary frozen copy of its
        weights, held as the engine holds a reference, scores the datasets and is freed afterwards."""
        if self.model is not None or sharding_engine(self.accelerator) is None:
            yield
            return
        self.model = prepare_frozen(frozen_copy(self.policy), self.accelerator)
        try:
            yield
        finally:
            temporary, self.model = self.model, None
            release(temporary)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], initial_policy: bool = False) -> torch.Tensor:
        """Reference log-probs of the batch's rows: the precomputed ``ref_logps`` when the batch has them,
        else scored by the reference model, the adapter-disabled base, or (``initial_policy``: only while
        precomputing, before any step) the policy itself. Rows left out by ``rows`` get 0."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        keep = self._rows(batch) if self._rows is not None else None
        if keep is None:
            return self._scored(batch, initial_policy)
        scored = self._scored(select_rows(batch, keep), initial_policy)
        out = scored.new_zeros(keep.numel())
        out[keep] = scored
        return out

    def _scored(self, batch: dict[str, torch.Tensor], initial_policy: bool) -> torch.Tensor:
        if self.model is not None:
            logps = self._score(self.model, batch)
            if sharding_engine(self.accelerator) == "fsdp2":
                reshard(self.model)
            return logps
        if hasattr(self.policy, "disable_adapter"):
            reference = self.policy.disable_adapter()
        elif initial_policy:
            reference = nullcontext()
        else:
            raise ValueError(
                "This batch has no precomputed `ref_logps` and the trainer keeps no reference model "
                "(precompute_ref_logps=True): pass datasets to the trainer's constructor so their reference "
                "log-probs are computed before training."
            )
        with eval_mode(self.policy), reference:
            return self._score(self.policy, batch)

    def precompute(
        self,
        dataset: Dataset | None,
        *,
        collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        batch_size: int,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> Dataset | None:
        """``dataset`` with a ``ref_logps`` column (one float per row), read from the disk cache under
        ``cache_dir`` (None: no cache) when every process finds it there, else computed (each process
        scores its share, ``compute``) and cached."""
        if dataset is None or "ref_logps" in dataset.column_names:
            return dataset
        accelerator = self.accelerator
        path = cache_path(cache_dir, self.module or self.policy, dataset) if cache_dir is not None else None
        values = load(path, dataset) if path else None
        # Agreed by every process: the scoring is collective (sharded models, the gathering of shares),
        # and a process on another node may not see the cache file that the main process wrote.
        found = torch.tensor(float(values is not None), device=accelerator.device)
        if accelerator.reduce(found, reduction="sum").item() == accelerator.num_processes:
            logger.info("reference log-probs of %d groups read from %s", len(values), path)
            return dataset.add_column("ref_logps", values)
        values = self.compute(dataset, collator=collator, batch_size=batch_size, progress=progress)
        bad = sum(not math.isfinite(x) for row in values for x in row)
        if bad:
            raise FloatingPointError(
                f"{bad} reference log-probs are not finite ({self.kind} scores NaN or infinity): check "
                "the reference model's weights"
            )
        if path and accelerator.is_main_process:
            save(path, values)
        return dataset.add_column("ref_logps", values)

    def compute(
        self,
        dataset: Dataset,
        *,
        collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        batch_size: int,
        progress: bool = True,
    ) -> list[list[float]]:
        """Score every group of ``dataset`` with the reference (the initial policy when there is no other).

        Each process scores a contiguous ``1 / num_processes`` share and the shares are gathered, in order,
        to every process. The shares are padded to equal sizes (the last group repeated, its values then
        dropped), so that every process runs the same number of batches: under FSDP2 and ZeRO-3 each batch
        is a collective."""
        accelerator = self.accelerator
        n, world = len(dataset), accelerator.num_processes
        share = math.ceil(n / world)
        start = accelerator.process_index * share
        rows = [min(i, n - 1) for i in range(start, start + share)]
        loader = DataLoader(dataset.select(rows) if world > 1 else dataset, batch_size=batch_size,
                            collate_fn=collator, shuffle=False)  # fmt: skip
        values: list[list[float]] = []
        quiet = not progress or not accelerator.is_local_main_process
        with progress_bar(len(loader), "reference log-probs", "batch", not quiet) as bar:
            for batch in loader:
                batch = to_device(batch, accelerator.device)
                logps = self.logps(batch, initial_policy=True).cpu()
                sizes = torch.bincount(batch["group_index"].cpu()).tolist()
                values.extend(part.tolist() for part in logps.split(sizes))
                bar.update(1)
        if world > 1:
            values = gather_object(values)[:n]
        return values

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights into the reference model (online training's ``ref_sync_steps``),
        shard by shard under FSDP2 and ZeRO-3 (``grouppo.engines.copy_weights``)."""
        if self.model is None:
            raise ValueError("this reference has no model of its own to re-sync (PEFT or precomputed)")
        copy_weights(policy, self.module)

    @property
    def module(self) -> torch.nn.Module | None:
        """The reference model out of its engine wrapper (a DeepSpeed engine's module, ...)."""
        return None if self.model is None else self.accelerator.unwrap_model(self.model)
