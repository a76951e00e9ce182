"""What makes a run safe to stop, resume and keep in a shared folder.

* **One run per output_dir**: ``RunLock`` holds ``output_dir/.grouppo.lock`` (the holder's pid, host and
  start time) for the run; a second run into the same folder is refused with the holder named. A lock
  left by a dead process on this host is taken over, with a warning.
* **Resume continues the same run**: each checkpoint records what defines the run (``run_record``: the
  trainer, model, reference, a digest of the training data, the objective and its hyper-parameters,
  the rewards) in ``grouppo_run.json``; resuming from it with anything of that changed is refused with
  the fields that differ (``changed_fields``), unless the user asks for it (``resume_with_changes``).
* **Complete checkpoints only**: a checkpoint is marked complete (``grouppo_run.json``, written after
  transformers has written everything else) when its save ends, so a checkpoint cut short by a kill or a
  full disk is never resumed from; ``latest_complete_checkpoint`` finds the newest complete one.
* **Stopping**: ``StopOnSignal`` turns SIGINT and SIGTERM into "save a checkpoint at the end of this step,
  then stop" (all processes agree on the step); a second signal stops at once.
* **A quiet resume**: ``tied_weights_resume`` drops transformers' "missing keys" warning when the only
  keys missing from a checkpoint are weights tied to another (an LM head tied to the embedding is saved
  once, and tied again after loading): the warning would say something is lost when nothing is.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

LOCK_FILE = ".grouppo.lock"
RUN_FILE = "grouppo_run.json"


class RunLockedError(RuntimeError):
    """Another live run holds the output_dir."""


class RunChangedError(ValueError):
    """A resumed run differs from the run that wrote the checkpoint."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; ``signum`` and ``checkpoint`` say which."""

    def __init__(self, message: str, signum: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


# ----------------------------------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True


class RunLock:
    """``output_dir/.grouppo.lock`` for as long as a run writes there (re-entrant within one process)."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    self.held = True  # this process already holds it (a second train() call)
                    return
                if (
                    holder.get("host") == me["host"]
                    and isinstance(holder.get("pid"), int)
                    and _alive(holder["pid"])
                ):
                    raise RunLockedError(
                        f"output_dir {str(self.path.parent)!r} is in use by another run: pid {holder['pid']} "
                        f"on {holder['host']}, started {holder.get('started', '?')}; wait for it to finish "
                        "or choose another output_dir"
                    ) from None
                if holder.get("host") not in (None, me["host"]):
                    raise RunLockedError(
                        f"output_dir {str(self.path.parent)!r} is in use by a run on another host "
                        f"({holder['host']}, pid {holder.get('pid')}, started {holder.get('started', '?')}); "
                        f"if that run is over, remove {self.path}"
                    ) from None
                logger.warning(
                    "%s was left by a run that is no longer alive (%s); taking it over", self.path, holder
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return

    def _holder(self) -> dict[str, Any]:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


# ------------------------------------------------------------------------------------- what a run is
def digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (data records, token ids)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: saved -> current"`` for every field that differs between two run records."""
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def is_complete(checkpoint: str | os.PathLike[str]) -> bool:
    """A checkpoint whose save ended (grouppo marks it when transformers is done writing)."""
    return (Path(checkpoint) / RUN_FILE).is_file() and (Path(checkpoint) / "trainer_state.json").is_file()


def latest_complete_checkpoint(output_dir: str | os.PathLike[str]) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` and the incomplete ones newer than it."""
    folder = Path(output_dir)
    found = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else []:
        step = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    skipped = []
    for _, path in sorted(found, reverse=True):
        if is_complete(path):
            return str(path), skipped
        skipped.append(str(path))
    return None, skipped


class MarkCheckpoint(TrainerCallback):
    """Completes each checkpoint once transformers has saved it: ``extras(folder)`` (every process: what
    a trainer saves beside transformers' files), then the run record (the mark of a complete checkpoint,
    and what a resumed run is compared with; set ``record`` before training)."""

    def __init__(self, extras: Any = None) -> None:
        self.extras = extras
        self.record: dict[str, Any] = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.extras is not None:
            self.extras(folder)
        if args.should_save:
            tmp = folder / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps({**self.record, "step": state.global_step}, indent=1), encoding="utf-8")
            tmp.replace(folder / RUN_FILE)


def check_same_run(checkpoint: str, record: Mapping[str, Any], allow: bool) -> None:
    """RunChangedError (or, with ``allow``, a warning) when ``record`` differs from the checkpoint's."""
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        raise RunChangedError(
            f"{checkpoint} is not a complete grouppo checkpoint (no {RUN_FILE}: its save was cut short, or "
            "another program wrote it); resume from a complete one (--resume_from_checkpoint true finds it)"
        )
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.pop("step", None)
    changes = changed_fields(saved, record)
    if not changes:
        return
    message = f"resuming from {checkpoint}, but the run differs from the one that wrote it: " + "; ".join(
        changes
    )
    if not allow:
        raise RunChangedError(
            message + ". Resume the same run, start a new one in another output_dir, or set "
            "resume_with_changes=True (--resume_with_changes true) to continue with the changes"
        )
    logger.warning("%s (continuing: resume_with_changes)", message)


def tied_names(model: Any) -> set[str]:
    """Names of ``model``'s parameters that share their storage with an earlier-named one (tied weights)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = (param.data_ptr(), tuple(param.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


class _TiedKeysOnly(logging.Filter):
    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith(self.PREFIX):
            return True
        try:
            missing = ast.literal_eval(message[len(self.PREFIX) :].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(missing, list) and missing and set(missing) <= self.tied)


@contextmanager
def tied_weights_resume(model: Any) -> Iterator[None]:
    """While resuming ``model``: transformers' missing-keys warning is dropped when only tied weights are
    missing (see the module docstring); any other missing key is still warned about."""
    tied = tied_names(model)
    log = logging.getLogger("transformers.trainer")
    quiet = _TiedKeysOnly(tied)
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


# ----------------------------------------------------------------------------------------------- signals
class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM: save a checkpoint at the end of the current step, then stop; a second signal
    stops at once (KeyboardInterrupt). Under several processes the step is agreed by all of them (each
    process must receive the signal: a launcher forwards it, or every rank is signalled)."""

    def __init__(self, agree: Any = None) -> None:
        self.signum: int | None = None
        self.agree = agree  # flag -> the largest flag of all processes (None: one process)
        self.stopped_at: int | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, for the duration of a ``train()`` call (main thread only; elsewhere, none)."""
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals as they are
            yield
            return
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                       "(send it again to stop at once)", signal.Signals(signum).name)  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        flag = self.signum or 0
        if self.agree is not None:
            flag = int(self.agree(flag))
        if flag:
            self.signum = self.signum or flag
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
