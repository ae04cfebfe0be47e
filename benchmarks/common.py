"""Shared benchmark helpers: arguments, threads, timing with alternation, paired ratios, RSS, machine, markdown.

Every comparison runs both sides in one process, alternating them round by round (the order rotates each round),
so slow drift from other work on the machine hits both sides alike; results are reported as per-round ratios
(min / median / max), never as one side's absolute time alone.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers print progress bars; tqdm reads this when first imported
DEFAULT_MODEL = "SmolLM2-135M-Instruct (default model, fp32, CPU)"
# Package folders as mapped in pyproject.toml ([tool.setuptools.package-dir]).
SUBPACKAGES = {"steering.hooks": "hooks", "steering.vectors": "vectors", "steering.experiments": "experiments"}


# ---- imports without an install (bare GPU machines) ------------------------------------------------------------
class _RepoLayout(importlib.abc.MetaPathFinder):
    """Finds ``steering.hooks`` etc. in the repository folders, as the editable install would."""

    def find_spec(self, name, path, target=None):
        folder = SUBPACKAGES.get(name)
        if folder is None or not (REPO / folder / "__init__.py").exists():
            return None
        init = REPO / folder / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(REPO / folder)])


def ensure_steering_importable() -> None:
    """Make ``import steering`` work from a plain checkout (no ``pip install -e .``)."""
    if importlib.util.find_spec("steering") is not None and importlib.util.find_spec("steering.hooks") is not None:
        return
    sys.path.insert(0, str(REPO))
    sys.meta_path.insert(0, _RepoLayout())


# ---- arguments and threads ---------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run (~1 minute): fewer tokens, pairs and repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 5, quick 3)")
    p.add_argument("--threads", default="auto", help="torch threads: a number, or 'auto' (see choose_threads)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown section to this file")
    return p


def choose_threads(spec: str = "auto") -> tuple[int, str]:
    """Torch intra-op threads and why. ``auto``: torch's default on an idle machine, else 1.

    On a small machine shared with other jobs, OpenMP threads spin-wait on busy cores and a 2-thread run can be
    several times slower than a 1-thread run (measured here: 5-10x at a load average of 5 on 2 cores).
    """
    import torch

    if spec != "auto":
        return int(spec), "set by --threads"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < 1.0:
        return torch.get_num_threads(), f"auto: idle machine (load average {load:.1f})"
    return 1, f"auto: load average {load:.1f} on {cores} cores, so 1 thread to avoid OpenMP oversubscription"


def setup(args: argparse.Namespace) -> dict:
    """Apply ``--threads``; return the machine description for this run."""
    import torch

    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    args.repeats = args.repeats or (3 if args.quick else 5)
    return machine(why)


# ---- machine -----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads_note: str = "") -> dict:
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "threads_note": threads_note,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load"] = round(os.getloadavg()[0], 1)
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = f", load average {info['load']} at start" if "load" in info else ""
    threads = f"{info['threads']} torch threads" + (f" ({info['threads_note']})" if info.get("threads_note") else "")
    return (
        f"{info['cpu']}, {info['cores']} cores, {threads}{gpu}{load}; Python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}"
    )


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# ---- memory ------------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss`` is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Current resident set size in MB (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


class PeakWatch:
    """Peak RSS over a stretch of code, in MB: the kernel's high-water mark reset at the start (Linux
    ``/proc/self/clear_refs`` = 5, then ``VmHWM``), else a 2 ms sampling thread (other systems)."""

    def __enter__(self) -> PeakWatch:
        self.before = rss_mb()
        self.peak = self.before
        self._thread = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._kernel = True
        except OSError:
            import threading

            self._kernel = False
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        if self._kernel:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.before


# ---- timing ------------------------------------------------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes (CUDA work included)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def alternate(
    sides: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of each side, ``repeats`` calls each, one call per side per round, the order rotating every
    round; ``warmup`` untimed rounds come first. A side is a zero-argument callable, timed whole.

    ``cpu``, if given, receives this process's CPU seconds per call (``time.process_time``): with one torch thread
    on a machine shared with other jobs it measures the work done, which waiting for a busy core does not inflate.
    """
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    if cpu is not None:
        cpu.update({name: [] for name in names})
    for _ in range(warmup):
        for name in names:
            sides[name]()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            sides[name]()
            _sync()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu[name].append(time.process_time() - start_cpu)
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


def speed_ratios(ours: Sequence[float], other: Sequence[float]) -> list[float]:
    """Per-round throughput ratio ours / other for the same work: ``other_time / ours_time``."""
    return [o / u for u, o in zip(ours, other)]


@dataclass
class Spread:
    low: float
    mid: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(min(values), statistics.median(values), max(values))

    def cells(self, digits: int = 3) -> list[str]:
        return [f"{self.low:.{digits}f}", f"{self.mid:.{digits}f}", f"{self.high:.{digits}f}"]


def verdict(ratio: Spread, goal: float) -> str:
    """Met / not met on the median, with a hint when the spread straddles the goal."""
    if ratio.mid >= goal:
        return f"met (>= {goal})"
    if ratio.high >= goal:
        return f"not met on the median (>= {goal}); within the spread"
    return f"not met (>= {goal})"


# ---- markdown ----------------------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One comparison's part of BENCHMARKS.md."""

    title: str
    command: str
    model: str = DEFAULT_MODEL
    sizes: str = ""
    machine: dict | None = None
    headers: Sequence[str] = ()
    rows: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = ""  # "", "pending: ...", "skipped: ...", "failed: ..."
    headline: str = ""  # one line for the summary table of BENCHMARKS.md
    peak_rss: float | None = None
    seconds: float | None = None

    def markdown(self) -> str:
        out = [f"## {self.title}", "", f"- command: `{self.command}`"]
        if self.machine:
            out.append(f"- machine: {machine_line(self.machine)}")
        out.append(f"- model: {self.model}")
        if self.sizes:
            out.append(f"- sizes: {self.sizes}")
        if self.peak_rss is not None:
            out.append(f"- peak RSS of the benchmark process: {self.peak_rss:,.0f} MB")
        if self.seconds is not None:
            out.append(f"- wall time: {self.seconds:.0f} s")
        if self.status:
            out += ["", f"**{self.status}**"]
        if self.rows:
            out += ["", table(self.headers, self.rows)]
        if self.notes:
            out += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def command_line(script: str, args: argparse.Namespace | None = None, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run (what BENCHMARKS.md shows): this script's arguments minus ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *kept])


def emit(section: Section, args: argparse.Namespace, started: float) -> None:
    """Print the section; write it to ``--out`` too (run.py collects it from there)."""
    section.seconds = time.perf_counter() - started
    if section.peak_rss is None and not section.status:
        section.peak_rss = peak_rss_mb()
    text = section.markdown()
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text)
        summary = {
            "title": section.title,
            "status": section.status,
            "headline": section.headline,
            "seconds": section.seconds,
        }
        args.out.with_suffix(".json").write_text(json.dumps(summary))


def emit_sections(title: str, sections: Sequence[Section], args: argparse.Namespace, started: float, headline: str):
    """``emit`` for a script with several sections: printed together, written together to ``--out``."""
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    for section in sections:
        if section.peak_rss is None and not section.status:
            section.peak_rss = peak
    text = "\n".join(section.markdown() for section in sections)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text)
        statuses = {section.status for section in sections}
        status = statuses.pop() if len(statuses) == 1 else ""
        summary = {"title": title, "status": status, "headline": headline, "seconds": seconds}
        args.out.with_suffix(".json").write_text(json.dumps(summary))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_unit(d: int, seed: int):
    """A fixed random unit vector [d] (float32, CPU) for a seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


# ---- peer libraries ----------------------------------------------------------------------------------------------
def load_steering_vectors():
    """steering-vectors as (module, None), or (None, why it is unavailable). Its package imports scikit-learn."""
    import importlib

    try:
        return importlib.import_module("steering_vectors"), None
    except ImportError as exc:
        return None, f"steering-vectors not importable ({exc}); `make bench` installs it (it needs scikit-learn)"


def load_repeng():
    """repeng as (module, None), or (None, why it is unavailable).

    repeng 0.4.0 pins numpy<2, and its annotations name ``np.float_`` (removed in NumPy 2), so importing it fails
    on NumPy 2: alias ``np.float_`` to ``np.float64`` (what NumPy 1 meant by it). Nothing else is patched.
    """
    import importlib

    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64
    try:
        return importlib.import_module("repeng"), None
    except ImportError as exc:
        return None, f"repeng not importable ({exc}); `make bench` installs it (it needs scikit-learn)"


def add_from(block, delta, start: int):
    """The plain forward hook a peer-library user writes: add ``delta`` [d] to ``block``'s output from token
    ``start`` on (what steering-vectors' ``apply(min_token_index=start)`` does). Returns the hook handle."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, start:] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return block.register_forward_hook(hook)


# The Llama-3-8B shape the GPU benchmarks build with random weights (throughput does not depend on trained weights).
LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
)
