"""Every shell command the README and docs/*.md show runs as written.

Each fenced shell block (```bash) is preceded by a marker comment that says what it is:

* ``<!-- runnable -->``: run offline, as written, from a fresh directory that holds the repository's bundled
  ``models/``, ``conf/``, ``scripts/``, ``test/`` and ``finetune_lora.py``;
* ``<!-- runnable: network -->``: the same, with the published-checkpoint bucket and the CELLxGENE API
  replaced by a local HTTP server (``TRANSCRIPTFORMER_ARTIFACTS_URL``, ``TRANSCRIPTFORMER_CELLXGENE_API``)
  that serves the reference checkpoint as ``tf_sapiens.tar.gz`` and a one-dataset catalogue;
* ``<!-- example: why -->``: not run (placeholder paths, GPUs, hours of training); the reason is required.

A fenced Python block (```python) preceded by ``<!-- runnable -->`` runs too, with ``python`` in the same directory;
an unmarked one is not run.

The blocks of one document run in order in one directory, so a later block may use an earlier one's output; and
every page runs in one directory in reading order (README first, then the pages as README links them), as a user
goes through them, so that no quick start collides with an earlier page's output.
Making the venv, ``pip install`` and ``pytest`` are left out: ``.ci/run`` runs them on a fresh clone. A
``transcriptformer ...`` command (optionally after ``NAME=value`` assignments) runs in this process through
:func:`transcriptformer.cli.main`, with the same exit code, output and files as the installed command; every
other command (``python ...``, ``taskset ...``, pipes and redirections) runs in ``bash``.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from local_http_server import LocalServer, unused_port_url
from test_cellxgene import add_dataset, serve_catalogue
from test_download import checkpoint_archive
from transcriptformer.cli import main
from transcriptformer.hub.artifacts import ARTIFACTS, BASE_URL_ENV
from transcriptformer.hub.cache import CACHE_ENV
from transcriptformer.hub.cellxgene import API_URL_ENV

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BUNDLED = ["models", "conf", "scripts", "test", "finetune_lora.py"]
SHELL_FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
PYTHON_FENCE = re.compile(r"^```python\s*$")
MARKER = re.compile(r"^<!-- (runnable|runnable: network|example: \S.*) -->$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_SYNTAX = set("|&;<>$`(){}")
# What .ci/run does on a fresh clone itself, left out of the documented scripts: the venv, installs and the tests.
CI_STEPS = (
    "python3 -m venv",
    "source .venv/bin/activate",
    "pip install",
    "pytest",
)  # a command with any of these runs in bash
# Documents whose runnable blocks take over 20 s on two CPU cores (train, evaluate, perturb, annotate).
SLOW = {"training.md", "evaluation.md", "perturb.md", "annotate.md"}


@dataclass
class ShellBlock:
    document: Path
    line: int  # of the opening fence, 1-based
    marker: str | None
    script: str
    language: str = "shell"  # or "python"

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def code_blocks(document: Path) -> list[ShellBlock]:
    """The fenced shell and Python blocks of ``document``, each with the marker comment on the line before it."""
    lines = document.read_text().splitlines()
    blocks, start, language = [], None, None
    for number, line in enumerate(lines):
        if start is None and (SHELL_FENCE.match(line.strip()) or PYTHON_FENCE.match(line.strip())):
            start, language = number, "python" if PYTHON_FENCE.match(line.strip()) else "shell"
        elif start is not None and line.strip() == "```":
            before = lines[start - 1].strip() if start else ""
            marker = MARKER.match(before)
            script = "\n".join(lines[start + 1 : number])
            blocks.append(ShellBlock(document, start + 1, marker.group(1) if marker else None, script, language))
            start = None
    return blocks


def shell_blocks(document: Path) -> list[ShellBlock]:
    """The fenced shell blocks of ``document`` (every one needs a marker)."""
    return [block for block in code_blocks(document) if block.language == "shell"]


def without_ci_steps(script: str) -> str:
    """``script`` less the steps of :data:`CI_STEPS`; of ``pip install X && cmd``, ``cmd`` is kept."""
    kept = []
    for line in script.splitlines():
        commands = [c for c in line.split(" && ") if not c.lstrip().startswith(CI_STEPS)]
        kept.append(" && ".join(commands))
    return "\n".join(kept)


def shell_commands(script: str) -> list[str]:
    """The commands of ``script``, one per logical line: continued lines and multi-line quotes joined."""
    commands, pending = [], ""
    for line in script.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        commands.append(pending)
        pending = ""
    return commands + [pending] if pending else commands


def in_process_command(command: str) -> tuple[dict[str, str], list[str]] | None:
    """``(environment, argv)`` of a ``[NAME=value ...] transcriptformer ARGS`` command; ``None`` for any other."""
    if SHELL_SYNTAX & set(command):
        return None
    words = shlex.split(command.replace("\\\n", ""), comments=True)  # bash drops a backslash-newline
    assignments = list(itertools.takewhile(ASSIGNMENT.match, words))
    words = words[len(assignments) :]
    if not words or words[0] != "transcriptformer":
        return None
    return dict(assignment.split("=", 1) for assignment in assignments), words[1:]


def runnable_documents() -> list[pytest.param]:
    params = []
    for document in DOCUMENTS:
        if any(b.marker and b.marker.startswith("runnable") for b in shell_blocks(document)):
            marks = [pytest.mark.slow] if document.name in SLOW else []
            params.append(pytest.param(document, id=document.name, marks=marks))
    return params


def test_every_shell_block_says_whether_it_runs():
    unmarked = [b.where for d in DOCUMENTS for b in shell_blocks(d) if b.marker is None]
    assert not unmarked, f"shell blocks without a <!-- runnable --> or <!-- example: why --> marker: {unmarked}"
    assert runnable_documents(), "no runnable block found: the marker syntax changed?"


@pytest.fixture
def published_mirror():
    """A local server standing in for the checkpoint bucket and the CELLxGENE API."""
    with LocalServer() as server:
        server.add(f"/{ARTIFACTS['tf-sapiens'].archive}", checkpoint_archive())
        lung = (ROOT / "test" / "data" / "human_symbols_16cells.h5ad").read_bytes()
        serve_catalogue(server, [add_dataset(server, "lung-1", lung, tissue="lung")])
        yield server


@dataclass
class InProcess:
    """A ``[NAME=value ...] transcriptformer ARGV`` command, run through :func:`main` with ``environ`` set."""

    environ: dict[str, str]
    argv: list[str]


def steps(script: str) -> list[str | InProcess]:
    """The commands of ``script`` in order: each ``transcriptformer`` command, and between them bash scripts."""
    result: list[str | InProcess] = []
    for command in shell_commands(script):
        parsed = in_process_command(command)
        if parsed is not None:
            result.append(InProcess(*parsed))
        elif result and isinstance(result[-1], str):
            result[-1] += command
        else:
            result.append(command)
    return result


def run_in_bash(script: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{script}"], cwd=cwd, env=env, capture_output=True, text=True
    )
    return result.returncode, result.stdout + result.stderr


def run_in_process(command: InProcess, monkeypatch, capfd) -> tuple[int, str]:
    with monkeypatch.context() as scoped:
        for name, value in command.environ.items():
            scoped.setenv(name, value)
        try:
            code = main(command.argv)
        except SystemExit as exit_:  # --help, --version and usage errors exit through argparse
            code = exit_.code
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def test_commands_are_split_as_bash_reads_them():
    script = 'a \\\n  --b\npython -c "\nimport x\n"\n# note\nOMP_NUM_THREADS=2 transcriptformer doctor  # 2 threads\n'
    assert in_process_command("transcriptformer doctor \\\n  --skip-flex\n") == ({}, ["doctor", "--skip-flex"])
    assert steps(script) == [
        'a \\\n  --b\npython -c "\nimport x\n"\n# note\n',
        InProcess({"OMP_NUM_THREADS": "2"}, ["doctor"]),
    ]
    assert in_process_command('transcriptformer download-data --assay "10x 3\' v3"') == (
        {},
        ["download-data", "--assay", "10x 3' v3"],
    )
    for command in ("taskset -c 0 transcriptformer doctor", "transcriptformer doctor | head", "python -c 1", "# x"):
        assert in_process_command(command) is None, command


def reading_order() -> list[Path]:
    """README.md, then the pages of docs/ in the order README links them first, then the others."""
    linked = re.findall(r"\(docs/([\w-]+\.md)", (ROOT / "README.md").read_text())
    pages = [ROOT / "docs" / name for name in dict.fromkeys(linked)]
    return [ROOT / "README.md", *pages, *(d for d in DOCUMENTS[1:] if d not in pages)]


def run_document(document: Path, folder: Path, mirror: LocalServer, monkeypatch, capfd) -> None:
    """Run the runnable blocks of ``document`` in order in ``folder`` (which holds the bundled files)."""
    bin_dir = str(Path(sys.executable).parent)  # this environment's python and transcriptformer come first
    for block in code_blocks(document):  # a Python block runs when it is marked runnable
        if not (block.marker or "").startswith("runnable"):
            continue
        # Offline blocks get an address where nothing listens: they may not fetch anything.
        server = mirror.base_url if block.marker == "runnable: network" else unused_port_url()
        monkeypatch.setenv(BASE_URL_ENV, server)
        monkeypatch.setenv(API_URL_ENV, server)
        env = os.environ | {"PATH": bin_dir + os.pathsep + os.environ["PATH"]}
        script = f"python - <<'SNIPPET'\n{block.script}\nSNIPPET\n" if block.language == "python" else block.script
        for step in steps(without_ci_steps(script)):
            if isinstance(step, InProcess):
                code, output = run_in_process(step, monkeypatch, capfd)
            else:
                code, output = run_in_bash(step, folder, env)
            assert code == 0, f"{block.where} failed:\n{block.script}\n{output[-3000:]}"
            assert "Traceback" not in output, f"{block.where} printed a traceback:\n{output[-3000:]}"


def user_folder(folder: Path, monkeypatch) -> Path:
    """``folder`` as a fresh clone's working folder: the bundled files, a cache of its own, the working folder."""
    for name in BUNDLED:
        (folder / name).symlink_to(ROOT / name)
    monkeypatch.setenv(CACHE_ENV, str(folder / ".cache"))  # published names never touch the user's cache
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("document", runnable_documents())
def test_documented_commands_run_as_written(document, tmp_path, published_mirror, monkeypatch, capfd):
    run_document(document, user_folder(tmp_path, monkeypatch), published_mirror, monkeypatch, capfd)


def test_the_reading_order_starts_with_the_readme_and_holds_every_page():
    order = reading_order()
    assert order[0] == ROOT / "README.md" and order[1] == ROOT / "docs" / "training.md"  # the first link
    assert sorted(order) == sorted(DOCUMENTS)


@pytest.mark.slow  # every page, the slow ones included (minutes)
def test_all_pages_run_in_one_folder_in_reading_order(tmp_path, published_mirror, monkeypatch, capfd):
    """As a user would: README, then each page, in one folder, so that a page's outputs meet the next page's."""
    folder = user_folder(tmp_path, monkeypatch)
    for document in reading_order():
        run_document(document, folder, published_mirror, monkeypatch, capfd)
