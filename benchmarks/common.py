"""Shared benchmark plumbing: machine facts, interleaved timing, JSON output, tables."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="results/bench", help="folder for the JSON output")
    parser.add_argument(
        "--allocator", choices=("retain", "system"), default="retain",
        help="retain (default): on glibc, keep freed memory in the process (as jemalloc/tcmalloc, which "
        "PyTorch's CPU tuning guide recommends, do) so every backward does not page-fault its gradients "
        "in again; system: the C library's defaults",
    )
    return parser


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
ALLOCATOR = "system"


def retain_freed_memory() -> str:
    """Stop glibc returning freed memory to the OS (no trimming, no mmap'd chunks). With its
    defaults, the tens of MB of gradients that each backward allocates come back as fresh pages,
    thousands of page faults per step (see ``minor_faults`` in the JSON): a cost of the allocator
    that grows with the number of backward passes, not with the optimizer. Returns what was set."""
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not libc_name or platform.libc_ver()[0] != "glibc":
        return "system (not glibc: left as is)"
    libc = ctypes.CDLL(libc_name)
    if not (libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_MAX, 0)):
        return "system (mallopt refused)"
    return "glibc, freed memory retained (M_TRIM_THRESHOLD=2^31-1, M_MMAP_MAX=0)"


def setup(args) -> torch.device:
    global ALLOCATOR
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "allocator", "system") == "retain":
        ALLOCATOR = retain_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return device


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "allocator": ALLOCATOR,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        # what fp32 matmuls and convolutions run as (TF32 or not) changes the step times
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
                info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        except (AttributeError, RuntimeError):
            pass
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians(
    units: dict[str, Callable[[], int]], rounds: int, warmup: int, device, faults: dict[str, float] | None = None,
    cpu: dict[str, float] | None = None,
) -> dict[str, float]:
    """Run every unit once per round, in rotating order so drift and noise hit all alike; each
    unit returns how many steps it took. A unit with a ``prepare`` attribute has it called,
    untimed, right before each run. Returns the median seconds per step of each unit; with
    ``faults``, fills it with the median minor page faults per step of each unit; with ``cpu``,
    with the median CPU seconds per step of this process (``time.process_time``: on a machine
    shared with other work, what a single-threaded step costs without the waits for a core)."""
    names = list(units)
    samples: dict[str, list[float]] = {n: [] for n in names}
    fault_samples: dict[str, list[float]] = {n: [] for n in names}
    cpu_samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            getattr(units[name], "prepare", lambda: None)()
            sync(device)
            before = minor_faults()
            cpu_start = time.process_time()
            start = time.perf_counter()
            steps = units[name]()
            sync(device)
            if r >= warmup:
                samples[name].append((time.perf_counter() - start) / steps)
                cpu_samples[name].append((time.process_time() - cpu_start) / steps)
                fault_samples[name].append((minor_faults() - before) / steps)
    if faults is not None:
        faults.update({n: statistics.median(s) for n, s in fault_samples.items()})
    if cpu is not None:
        cpu.update({n: statistics.median(s) for n, s in cpu_samples.items()})
    return {n: statistics.median(s) for n, s in samples.items()}


class TensorMemory(TorchDispatchMode):
    """Tensor bytes on ``device`` alive under the mode, relative to its start, and their peak,
    seen op by op: a storage an op creates counts until it is freed, and one that existed before
    (met as an op's input) counts out when it is freed. For devices whose allocator keeps no
    statistics (the CPU); exact for tensors, blind to memory a kernel frees before it returns."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.live = self.peak = 0
        self._watched: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            self._watch(t, created=False)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._watch(t, created=True)
        self.peak = max(self.peak, self.live)
        return out

    def _watch(self, t, created: bool) -> None:
        if not isinstance(t, torch.Tensor) or t.device != self.device:
            return
        storage = t.untyped_storage()  # one Python object per live storage: weakref-able
        key = id(storage)
        if key in self._watched:
            return
        nbytes = storage.nbytes()
        self.live += nbytes if created else 0

        def freed(_, key=key, nbytes=nbytes):
            self._watched.pop(key, None)
            self.live -= nbytes

        self._watched[key] = weakref.ref(storage, freed)


def memory_of(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """``(peak, end)``: the most tensor bytes allocated on ``device`` while ``fn`` ran, and those
    still allocated when it returned, both relative to its start. CUDA: the caching allocator's
    statistics; elsewhere :class:`TensorMemory`."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    with TensorMemory(device) as mem:
        fn()
    return mem.peak, mem.live


def write_json(out_dir: str, name: str, payload: dict) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    file = path / f"{name}.json"
    file.write_text(json.dumps(payload, indent=2))
    return file


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
