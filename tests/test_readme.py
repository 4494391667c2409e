"""The README and docs/ as a new user meets them: every Python block runs as pasted, every command
line names a tool and options that exist, every relative link and anchor resolves."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "docs")) for f in files
              if f.endswith(".md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(path: str, language: str) -> list[str]:
    with open(path) as f:
        return [body for lang, body in FENCE.findall(f.read()) if lang == language]


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("index", range(len(_blocks(README, "python"))))
def test_readme_python_block_runs_as_pasted(index, tmp_path):
    code = _blocks(README, "python")[index]
    # a fresh interpreter, as a user pasting the block would have; the repo root is the working dir
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README python block {index} failed:\n{code}\n{result.stderr[-3000:]}"


def _tool_lines(path: str):
    for block in _blocks(path, "bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python tools/"):
                yield line


def _tool_help(tool: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, tool), "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{tool} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def test_readme_command_lines_use_tools_and_options_that_exist():
    lines = list(_tool_lines(README))
    assert lines, "the README shows no tool command line"
    helps: dict[str, str] = {}
    for line in lines:
        words = shlex.split(line)
        tool = words[1]
        assert os.path.isfile(os.path.join(ROOT, tool)), f"README runs {tool}, which does not exist"
        if tool not in helps:
            helps[tool] = _tool_help(tool)
        for word in words[2:]:
            if word.startswith("--"):
                option = word.split("=")[0]
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[tool]), \
                    f"README: {line!r} uses {option}, which {tool} --help does not list"
            elif word.startswith("configs/"):
                assert os.path.isfile(os.path.join(ROOT, word)), f"README: {line!r} names a missing config {word}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path) as f:
        text = FENCE.sub("", f.read())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=_rel)
def test_links_and_anchors_resolve(page):
    with open(page) as f:
        text = FENCE.sub("", f.read())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(resolved), f"{_rel(page)} links to {target}, which does not exist"
        if anchor and resolved.endswith(".md"):
            assert anchor in _anchors(resolved), f"{_rel(page)} links to {target}: no such heading"


def test_no_document_refers_outside_the_repository():
    # the project explains itself: no pointer to a spec or style guide that only its authors have
    pattern = re.compile(r"\bSPEC\b|SPEC\.md|STYLE\.md|\.\./shared")
    offenders = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("work_dirs", "data", "build", "__pycache__")]
        for name in files:
            if name.endswith((".py", ".md", ".c", ".h", ".toml", ".cfg", ".sh")) or name == "Makefile":
                path = os.path.join(d, name)
                if path == os.path.abspath(__file__):
                    continue
                with open(path, errors="replace") as f:
                    for n, line in enumerate(f, 1):
                        if pattern.search(line):
                            offenders.append(f"{_rel(path)}:{n}")
    assert not offenders, f"references to documents outside the repository: {offenders}"


def test_readme_is_an_entry_page():
    with open(README) as f:
        assert len(f.read().splitlines()) <= 250, "README.md grew past 250 lines: move details to docs/"


def test_docs_weight_table_is_the_code():
    """docs/detectors.md's default box-loss weights table says what default_box_loss_weight returns,
    for every name the detectors accept, each name in one row."""
    from detectors.options import BOX_LOSSES, default_box_loss_weight

    with open(os.path.join(ROOT, "docs", "detectors.md")) as f:
        text = f.read()
    table = text[text.index("| box_loss | RetinaNet | Faster R-CNN RoI head | RPN |"):].split("\n\n")[0]
    seen = []
    for row in table.splitlines()[2:]:
        names, retinanet, roi, rpn = (c.strip() for c in row.strip("|").split("|"))
        for name in (n.strip() for n in names.split(",")):
            seen.append(name)
            assert [default_box_loss_weight(h, name) for h in ("retinanet", "roi", "rpn")] == \
                [float(retinanet), float(roi), float(rpn)], f"docs/detectors.md: weights of {name}"
    assert sorted(seen) == sorted(BOX_LOSSES), "docs/detectors.md's weight table must list every box loss once"
