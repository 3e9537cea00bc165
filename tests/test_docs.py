"""Every command and snippet in README.md and docs/*.md that needs only what the repository ships runs as written.

Rules (the docs follow them; ``test_every_skipped_block_says_why`` holds them to it):
- Fenced ``bash`` / ``sh`` / ``python`` blocks run; other fences (``text``, none) are not commands.
- A block is skipped when it names ``path/to/`` (weights or data the reader brings: SD 1.5, SDXL, LoRA files) or
  when the line before it is ``<!-- docs-test: skip (reason) -->`` (hours of training, several hosts, the whole
  test suite).
- Shell blocks run with ``bash -e`` at the root of a fresh copy of the repository (its tracked and untracked,
  not ignored files) in a new virtualenv, so ``pip install -e .`` installs that copy. The virtualenv sees this
  environment's packages (``--system-site-packages``) and builds without isolation (``PIP_NO_BUILD_ISOLATION=0``),
  so nothing is downloaded; measuring a real fresh install is docs/benchmarks.md's business.
- Python blocks run with that virtualenv's Python in an empty folder outside the copy: they must find the shipped
  model by package path (``sdjax.shapes64.MODEL_DIR``), never by a path relative to a checkout.
- The blocks of one page run in order in the same folders, as a reader follows the page.

The run is ``slow`` (about 10 minutes on a 2-core CPU: the `:tiny` trainings dominate); the rules themselves are
checked in the default suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"bash": "shell", "sh": "shell", "python": "python"}
SKIP_MARK = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+)\) -->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```$", re.M | re.S)


@dataclass
class Block:
    page: str
    line: int
    kind: str  # "shell" or "python"
    code: str
    skip: str | None  # why it does not run, or None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The runnable fenced blocks of ``page`` in order, each with its skip reason (or None)."""
    text = (ROOT / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        kind = RUN_LANGUAGES.get(m["lang"])
        if kind is None:
            continue
        indent = len(m["indent"])
        code = "".join(line[indent:] if line.strip() else "\n" for line in m["body"].splitlines(keepends=True))
        before = [line.strip() for line in text[: m.start()].splitlines() if line.strip()]
        mark = SKIP_MARK.fullmatch(before[-1]) if before else None
        skip = mark["reason"] if mark else ("needs files the reader brings (path/to/)" if "path/to/" in code else None)
        found.append(Block(page, text[: m.start()].count("\n") + 1, kind, code, skip))
    return found


# ------------------------------------------------------------------------------------------------ the rules


def test_the_front_page_first_command_and_quickstart_run():
    readme = blocks("README.md")
    assert readme[0].kind == "shell" and readme[0].code.startswith("pip install -e . && python sample.py")
    quickstart = next(b for b in readme if b.kind == "python")
    assert "sdjax.shapes64 import MODEL_DIR" in quickstart.code and "save_png" in quickstart.code
    assert readme[0].skip is None and quickstart.skip is None


def test_every_skipped_block_says_why():
    every = [b for page in PAGES for b in blocks(page)]
    assert len(every) > 10
    for block in every:
        assert block.skip is None or block.skip.strip(), block
        # A block with hour-long commands must carry a reason, not run by accident.
        long = re.search(r"--config=configs/\w+\.py --workdir", block.code) and ":tiny" not in block.code
        assert not long or block.skip, f"{block} trains a full config; mark it <!-- docs-test: skip (...) -->"


# ------------------------------------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A copy of the repository, a new virtualenv with it installed editable, and an empty folder elsewhere."""
    base = tmp_path_factory.mktemp("docs")
    clone, venv, elsewhere = base / "sdjax", base / "venv", base / "elsewhere"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the repository's files to copy")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SDJAX_NO_COMPILE_CACHE")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        JAX_PLATFORMS="cpu",
        PIP_NO_BUILD_ISOLATION="0",  # pip's spelling of --no-build-isolation: build with the installed setuptools
        SDJAX_CACHE_DIR=str(base / "cache"),
        TFDS_DATA_DIR=str(base / "tensorflow_datasets"),  # the shapes64 data the :tiny runs draw
    )
    return {"clone": clone, "elsewhere": elsewhere, "python": str(venv / "bin" / "python"), "env": env}


def _run(block: Block, fresh: dict) -> subprocess.CompletedProcess:
    if block.kind == "shell":
        argv, cwd = ["bash", "-e", "-o", "pipefail", "-c", block.code], fresh["clone"]
    else:
        argv, cwd = [fresh["python"], "-c", block.code], fresh["elsewhere"]
    return subprocess.run(argv, cwd=cwd, env=fresh["env"], capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page, fresh):
    ran, skipped = [], []
    for block in blocks(page):
        if block.skip:
            skipped.append(f"{block} ({block.skip})")
            continue
        out = _run(block, fresh)
        assert out.returncode == 0, f"{block} failed:\n{block.code}\n--- stderr\n{out.stderr[-3000:]}"
        ran.append(str(block))
    if page == "README.md":  # the first command's image, the quickstart's PNG, the :tiny run's model
        assert (fresh["clone"] / "out" / "0000.png").is_file()
        assert (fresh["elsewhere"] / "circle.png").is_file()
    print(f"{page}: ran {ran or 'nothing'}; skipped {skipped or 'nothing'}")
