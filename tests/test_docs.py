"""Every ```python block in README.md and docs/*.md runs, as written, on the CPU.

One test per block, with the id ``file:line`` of its opening fence. The blocks of a page run in order in
one namespace (a later block may use the names of an earlier one) and in one temporary working
directory per page, with one torch thread. A block is skipped only when the line before its fence is
``<!-- no-run: reason -->`` (for GPU, cluster or long-data examples); the reason is the skip message.

A ```console block preceded by ``<!-- run -->`` runs each of its ``$ deepcollapse ...`` lines through
the CLI in the page's directory and expects exit code 0.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(`{3,})(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(no-run|run)\s*(?::\s*(.*?))?\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    kind: str  # "python" or "console"
    code: str
    skip: str | None = None  # the no-run reason

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The runnable blocks of a page: every python block, and console blocks marked ``<!-- run -->``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != fence:
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev.strip())
        code = "\n".join(body) + "\n"
        if lang == "python":
            skip = None
            if marker and marker.group(1) == "no-run":
                skip = marker.group(2) or ""
                assert skip, f"{page.name}:{start + 1}: a no-run marker must give its reason"
            blocks.append(Block(page, start + 1, "python", code, skip))
        elif lang == "console" and marker and marker.group(1) == "run":
            blocks.append(Block(page, start + 1, "console", code))
    return blocks


BLOCKS = [b for page in PAGES for b in parse_blocks(page)]


@dataclass
class PageState:
    workdir: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)  # ids of blocks already run, in order
    failed: str | None = None


_STATE: dict[Path, PageState] = {}


def _run_console(block: Block) -> None:
    from typer.testing import CliRunner

    from deepcollapse.cli import app

    commands = [ln[2:] for ln in block.code.splitlines() if ln.startswith("$ deepcollapse ")]
    assert commands, f"{block.id}: a run-marked console block has no '$ deepcollapse' line"
    for command in commands:
        args = shlex.split(command, comments=True)[1:]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{block.id}: `{command}` exited {result.exit_code}:\n{result.output}"


def _run(block: Block, state: PageState) -> None:
    if block.kind == "python":
        code = compile(block.code, block.id, "exec")
        exec(code, state.namespace)
    else:
        _run_console(block)


@pytest.fixture
def docs_env(tmp_path_factory, monkeypatch):
    """One torch thread, a non-interactive matplotlib backend, and the page's working directory."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cwd = os.getcwd()

    def enter(page: Path) -> PageState:
        if page not in _STATE:
            _STATE[page] = PageState(tmp_path_factory.mktemp(page.stem))
        os.chdir(_STATE[page].workdir)
        return _STATE[page]

    yield enter
    os.chdir(cwd)
    torch.set_num_threads(before)


def test_blocks_found():
    """The parser sees the README's examples (a broken parser must not pass by running nothing)."""
    readme = [b for b in BLOCKS if b.page.name == "README.md" and b.kind == "python"]
    assert len(readme) >= 3
    assert all(b.skip is None for b in readme), "the README's examples must run"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, docs_env):
    if block.skip is not None:
        pytest.skip(f"no-run: {block.skip}")
    state = docs_env(block.page)
    page_blocks = [b for b in BLOCKS if b.page == block.page and b.skip is None]
    for earlier in page_blocks[: page_blocks.index(block)]:  # e.g. when run alone with -k
        if earlier.id not in state.done:
            if state.failed:
                break
            try:
                _run(earlier, state)
            except BaseException:
                state.failed = earlier.id
                raise
            state.done.append(earlier.id)
    if state.failed:
        pytest.fail(f"an earlier block of this page failed: {state.failed}")
    if block.id in state.done:
        return
    try:
        _run(block, state)
    except BaseException:
        state.failed = block.id
        raise
    state.done.append(block.id)


def test_readme_is_a_front_door():
    """README.md stays under 15,000 characters; the rest lives in docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 15_000


def test_readme_links_exist():
    """Every relative link of README.md (docs pages, images) points to a file of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_api_reference_covers_every_module():
    """docs/api.md documents every public module (not the CLI, not private ``_`` modules)."""
    src = ROOT / "src" / "deepcollapse"
    modules = {
        ".".join(("deepcollapse", *p.relative_to(src).with_suffix("").parts))
        for p in src.rglob("*.py")
        if p.name != "__init__.py" and not p.name.startswith("_") and "cli" not in p.relative_to(src).parts
    }
    documented = set(re.findall(r"^::: ([\w.]+)", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), re.M))
    assert modules, "no modules found"
    assert not modules - documented, f"missing from docs/api.md: {sorted(modules - documented)}"
