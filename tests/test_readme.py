"""Every example in README.md runs as written. README.md is read at test time, so a new example is picked up.

What counts as an example, and how it runs:

* fenced ```python blocks: in README order, in one namespace (like a notebook: later blocks use earlier names),
  in a fresh working folder;
* fenced ```bash blocks, one command per line, and the backticked commands in the first column of the "Command
  line" table (`a` / `b` are two commands): `steering ...` runs through ``steering.cli.main``, what the console
  script calls, and must exit 0; `make TARGET ...` is checked with ``make -n`` (the target exists and its recipe
  expands) and not run here, because it builds environments (CI runs check-lock, test, test-vllm and test-latest
  itself, .ci/run);
* ``<!-- readme-test: vllm -->`` on the line before a block: it runs in the vLLM venv (`make test-vllm`), each
  command in its own process with no VLLM_* / OMP_* variables, as in a user's shell (so the backend's CPU engine
  defaults are what runs);
* ``<!-- readme-test: not run: REASON -->`` on the line before a block, or inside a table row: not run. That list
  must stay short (``MAX_NOT_RUN``) and give a reason each; ``test_not_run_examples_are_few_and_say_why`` checks it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_NOT_RUN = 3
MARK = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Example:
    kind: str  # "python" | "bash" | "command" (a table cell)
    text: str
    line: int  # 1-based line in README.md
    mark: str | None  # None, "vllm" or "not run: REASON"


def examples() -> list[Example]:
    """The README's examples in order (see the module docstring)."""
    lines = README.read_text().splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence and fence.group(1) in ("python", "bash"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = lines[i - 1].strip() if i else ""
            mark = MARK.fullmatch(before)
            found.append(Example(fence.group(1), "\n".join(lines[i + 1 : end]), i + 1, mark and mark.group(1)))
            i = end + 1
            continue
        if fence:  # another fenced block (program output): skip to its end
            i = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```")) + 1
            continue
        if lines[i].startswith("| `steering "):
            cell = lines[i].split("|")[1]
            mark = MARK.search(cell)
            for command in re.findall(r"`(steering [^`]+)`", cell):
                found.append(Example("command", command, i + 1, mark and mark.group(1)))
        i += 1
    return found


def commands(example: Example) -> list[list[str]]:
    if example.kind == "command":
        return [shlex.split(example.text)]
    return [argv for line in example.text.splitlines() if (argv := shlex.split(line, comments=True))]


def selected(vllm: bool) -> list[Example]:
    return [e for e in examples() if not (e.mark or "").startswith("not run") and (e.mark == "vllm") == vllm]


def test_the_readme_has_examples_of_every_kind():
    kinds = {e.kind for e in examples()}
    assert kinds == {"python", "bash", "command"}
    for example in examples():
        assert example.mark in (None, "vllm") or example.mark.startswith("not run: "), (example.line, example.mark)
        for argv in commands(example) if example.kind != "python" else []:
            assert argv[0] in ("steering", "make"), f"README.md:{example.line}: no runner for {argv[0]!r}"


def test_not_run_examples_are_few_and_say_why():
    skipped = [e for e in examples() if (e.mark or "").startswith("not run")]
    reasons = [e.mark.removeprefix("not run: ") for e in skipped]
    assert len(skipped) <= MAX_NOT_RUN, [f"README.md:{e.line}: {e.mark}" for e in skipped]
    assert all(len(reason.split()) >= 4 for reason in reasons), reasons


def test_make_commands_exist_as_written():
    for example in examples():
        for argv in commands(example) if example.kind != "python" else []:
            if argv[0] == "make":
                done = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
                assert done.returncode == 0, f"README.md:{example.line}: {' '.join(argv)}: {done.stderr[-500:]}"


def check_quick_example(scope: dict) -> None:
    """The first example says: row 0 unsteered (bit-identical to no steering), row 1 steered."""
    logits, enc, model = scope["logits"], scope["enc"], scope["model"]
    assert logits.shape[0] == 2 and not torch.allclose(logits[0], logits[1])
    with torch.no_grad():
        plain = model.model(**enc.inputs).logits
    assert torch.equal(plain[0], logits[0])


@pytest.mark.slow
def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__readme__"}
    blocks = [e for e in selected(vllm=False) if e.kind == "python"]
    assert blocks
    for block in blocks:
        exec(compile(block.text, f"README.md:{block.line}", "exec"), scope)
        if block is blocks[0]:
            check_quick_example(scope)
    assert (tmp_path / "values.safetensors").exists() and (tmp_path / "reports").is_dir()


@pytest.mark.slow
def test_shell_examples_run(tmp_path, monkeypatch, capsys):
    from steering import cli

    monkeypatch.chdir(tmp_path)
    ran = []
    for example in selected(vllm=False):
        for argv in commands(example) if example.kind != "python" else []:
            if argv[0] == "steering":
                code = cli.main(argv[1:])
                out = capsys.readouterr()
                assert code == 0, f"README.md:{example.line}: {' '.join(argv)}\n{out.out[-2000:]}\n{out.err[-2000:]}"
                ran.append(argv[1])
    assert {"info", "extract", "sweep", "report"} <= set(ran)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_examples_run_as_in_a_users_shell(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OMP_"))}
    script = Path(sys.executable).parent / "steering"
    ran = 0
    for example in selected(vllm=True):
        assert example.kind == "bash", f"README.md:{example.line}: vllm-marked examples are shell commands"
        for argv in commands(example):
            assert argv[0] == "steering", f"README.md:{example.line}: {argv}"
            done = subprocess.run([str(script), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"README.md:{example.line}: {' '.join(argv)}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran
