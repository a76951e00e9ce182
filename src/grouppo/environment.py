"""Where a result was produced: the machine and the library versions, recorded beside every result file.

Greedy decoding in bfloat16 (and, more rarely, in float32) can differ between two CPUs of one kind, since
the matrix-product kernels a library picks depend on the instruction set (AMX, AVX-512 BF16, AVX2) and
sum in a different order. A reported number is therefore only reproducible to the digit on a machine
with the same kernels; ``describe_environment`` records what a reader needs to tell whether theirs is.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# CPU flags that decide which matrix-product kernels run (bfloat16 and int8 paths above all).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "trl", "if-verifiable", "grouppo")
# Environment variables that change the kernels or the number of threads.
KERNEL_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "CUBLAS_WORKSPACE_CONFIG",
)


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the model from platform, no flags
        pass
    return {"model": model, "cores": os.cpu_count(), "kernel_flags": [f for f in KERNEL_FLAGS if f in flags]}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def grouppo_version() -> str:
    """The installed grouppo's version (pyproject.toml's, the one source of it)."""
    return _version("grouppo") or "unknown"


def _commit() -> str | None:
    """The git commit of the grouppo checkout, with ``+dirty`` when it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe_environment() -> dict[str, Any]:
    """The CPU (model, cores, kernel-relevant flags), torch's threads and matrix-product backends, the GPU
    if any, the library versions, the kernel environment variables that are set and the grouppo commit."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": _cpu(),
        "torch_threads": torch.get_num_threads(),
        "torch_backends": {
            "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "environment": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
        "grouppo_commit": _commit(),
    }


def hardware_line(env: dict[str, Any]) -> str:
    """One line for a table's caption: CPU model, cores, threads, kernel flags, GPU."""
    cpu = env["cpu"]
    gpu = ", ".join(env.get("gpus") or []) or "no GPU"
    flags = " ".join(cpu.get("kernel_flags") or []) or "none recorded"
    return (
        f"{cpu['model']}, {cpu['cores']} cores, {env['torch_threads']} torch threads, flags {flags}; {gpu}; "
        f"torch {env['libraries'].get('torch')}, transformers {env['libraries'].get('transformers')}"
    )


class LogProgress:
    """A progress report for a log file: one plain line (count, rate, time left) at most every
    ``interval`` seconds and one at the end; no carriage returns or cursor moves, which a redirected
    tqdm bar (nested ones above all) leaves in the file as ``^M`` and ``[A`` escapes."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix, self.shown_as = 0, "", (0, "")
        self.start = self.shown = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.shown >= self.interval:
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def _line(self) -> None:
        self.shown, self.shown_as = time.monotonic(), (self.n, self.postfix)
        elapsed = max(self.shown - self.start, 1e-9)
        rate = self.n / elapsed
        left = f", {(self.total - self.n) / rate:.0f} s left" if rate and self.n < self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.3g} {self.unit}/s, {elapsed:.0f} s"
              f"{left}{extra})", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.n and (self.n, self.postfix) != self.shown_as:  # the end, unless the last line showed it
            self._line()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def interactive() -> bool:
    """Whether progress can be drawn in place: stderr is a terminal, or this is a notebook kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A progress display on stderr: a tqdm bar in a terminal or a notebook, ``LogProgress`` lines when
    stderr is redirected to a file, nothing when not ``enabled``. Both take ``update(n)`` and
    ``set_postfix(**values)`` and work as context managers."""
    from tqdm.auto import tqdm

    if enabled and not interactive():
        return LogProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def quiet_start(log_file: bool | None = None) -> None:
    """Silence the third-party noise of a normal run: DeepSpeed's "Setting accelerator to CPU" warning
    (``DS_ACCELERATOR=cpu`` where torch sees no accelerator: the choice DeepSpeed makes anyway, made
    without the warning; an explicit setting is kept) and, when output goes to a log file (``log_file``;
    default: stderr is not interactive), the Hub libraries' progress bars (loading weights, writing
    shards, mapping datasets), which such a file would keep as carriage-return lines."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if log_file if log_file is not None else not interactive():
        import datasets
        import huggingface_hub.utils
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
