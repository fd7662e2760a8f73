"""README.md is a tutorial that runs.

- Every ```python block runs as written, each on its own: a fresh namespace, the repository root as
  the working directory, in README order. A block that raises fails with its README line number.
- ```bash blocks are not run (they install packages or run jobs of minutes, which CI runs anyway),
  but every ``python -m <module>`` they mention must name a module that exists, and every path into
  the repository they mention must exist. The same goes for the inline code of the prose and for
  the other code blocks (the layout), so renaming a module, script or config breaks this test.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
import traceback
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README has (at least) the ops, tckernels.nn and tckernels.models examples.
MIN_PYTHON_BLOCKS = 3

# Top-level folders of the repository: a mention such as `training/configs/tiny.yaml` is a path to check.
REPO_DIRS = ("bench", "csrc", "scripts", "tckernels", "tests", "training")
_PATH = re.compile(r"(?<![\w./-])(?:%s)/[\w./-]*" % "|".join(REPO_DIRS))
_PYTHON_M = re.compile(r"(?<![\w./-])python3?\s+-m\s+([\w.]+)")
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")
_INLINE = re.compile(r"`([^`\n]+)`")


class Block(NamedTuple):
    lang: str  # the fence's language ("" for none)
    line: int  # 1-based line number of the block's first code line
    code: str


def code_blocks(markdown: str) -> List[Block]:
    """The fenced code blocks of ``markdown``, in order."""
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not _CLOSE.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: code block never closed")
        blocks.append(Block(m.group(2), i + 2, textwrap.dedent("\n".join(lines[i + 1 : j]))))
        i = j + 1
    return blocks


def prose(markdown: str) -> str:
    """``markdown`` without its fenced code blocks."""
    out, inside = [], False
    for line in markdown.splitlines():
        if (_CLOSE if inside else _FENCE).match(line):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def run_python_block(block: Block, filename: str = "README.md") -> None:
    """Run ``block`` in a fresh namespace; on an exception, raise an AssertionError naming the
    block's line in ``filename``. The code is compiled at its own lines of ``filename``, so the
    traceback points at the README line that raised."""
    source = "\n" * (block.line - 1) + block.code + "\n"
    try:
        code = compile(source, filename, "exec")
        exec(code, {"__name__": "__main__"})
    except BaseException as e:  # noqa: BLE001 - any failure of the block is the block's failure
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        raise AssertionError(
            f"{filename} line {block.line}: the python block starting there raised "
            f"{type(e).__name__}: {e}\n\n{tb}"
        ) from None


def mentioned_modules(text: str) -> List[str]:
    """The modules named by ``python -m <module>`` in ``text``."""
    return _PYTHON_M.findall(text)


def mentioned_paths(text: str) -> List[str]:
    """The paths into the repository (starting with one of REPO_DIRS) named in ``text``."""
    return [p.rstrip(".") for p in _PATH.findall(text)]


def reference_problems(markdown: str, root: Path = ROOT) -> List[str]:
    """What the non-python code of ``markdown`` names that does not exist: modules of
    ``python -m`` and repository paths, in the bash and other non-python blocks and in the
    prose's inline code."""
    texts = [(b.line, b.code) for b in code_blocks(markdown) if b.lang != "python"]
    texts.append((None, "\n".join(_INLINE.findall(prose(markdown)))))
    problems = []
    for line, text in texts:
        where = f"the block at line {line}" if line else "the prose"
        for module in mentioned_modules(text):
            if importlib.util.find_spec(module) is None:
                problems.append(f"{where}: `python -m {module}`: no module {module!r}")
        for path in mentioned_paths(text):
            if not (root / path).exists():
                problems.append(f"{where}: {path}: no such file or folder")
    return problems


# ------------------------------------------------------------------------------------------------
# README.md itself
# ------------------------------------------------------------------------------------------------

_README_BLOCKS = code_blocks(README.read_text(encoding="utf-8"))
_PYTHON_BLOCKS = [b for b in _README_BLOCKS if b.lang == "python"]


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))  # `from training... import` works as it does from the root


def test_readme_has_python_blocks():
    assert len(_PYTHON_BLOCKS) >= MIN_PYTHON_BLOCKS, (
        f"README.md has {len(_PYTHON_BLOCKS)} ```python blocks; expected at least {MIN_PYTHON_BLOCKS}"
    )


@pytest.mark.parametrize("block", _PYTHON_BLOCKS, ids=[f"line{b.line}" for b in _PYTHON_BLOCKS])
def test_readme_python_block_runs(block, at_root):
    run_python_block(block, str(README))


def test_readme_commands_and_paths_exist(at_root):
    assert any(b.lang == "bash" for b in _README_BLOCKS), "README.md has no ```bash block"
    problems = reference_problems(README.read_text(encoding="utf-8"))
    assert not problems, "README.md names things that do not exist:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# the checks catch what they should (fake README text)
# ------------------------------------------------------------------------------------------------

FAKE = """# Fake

Some prose.

```python
x = 1
```

More prose.

```python
import math

y = math.sqrt(undefined_name)
```

```bash
python -m pytest -q
```
"""


def test_blocks_are_found_with_their_lines():
    blocks = code_blocks(FAKE)
    assert [(b.lang, b.line) for b in blocks] == [("python", 6), ("python", 12), ("bash", 18)]
    assert blocks[1].code == "import math\n\ny = math.sqrt(undefined_name)"


def test_a_failing_block_fails_with_its_line():
    good, bad = [b for b in code_blocks(FAKE) if b.lang == "python"]
    run_python_block(good, "FAKE.md")
    with pytest.raises(AssertionError, match=r"FAKE\.md line 12: .*NameError: name 'undefined_name'") as e:
        run_python_block(bad, "FAKE.md")
    assert 'File "FAKE.md", line 14' in str(e.value)  # the traceback names the line that raised


def test_each_block_gets_a_fresh_namespace():
    blocks = code_blocks("```python\nleft_over = 1\n```\n\n```python\nleft_over\n```\n")
    run_python_block(blocks[0])
    with pytest.raises(AssertionError, match="line 6: .*NameError"):
        run_python_block(blocks[1])


def test_unclosed_block_is_an_error():
    with pytest.raises(ValueError, match="line 1: code block never closed"):
        code_blocks("```python\nx = 1\n")


def test_missing_modules_and_paths_are_caught(at_root):
    fake = (
        "Run `python -m training.no_such_module` or `python scripts/no_such_script.py`.\n\n"
        "```bash\npython -m pytest tests/no_such_test.py       # see training/configs/tiny.yaml\n"
        "python3 -m not_a_module_anywhere\n```\n"
    )
    problems = reference_problems(fake)
    assert problems == [
        "the block at line 4: `python -m not_a_module_anywhere`: no module 'not_a_module_anywhere'",
        "the block at line 4: tests/no_such_test.py: no such file or folder",
        "the prose: `python -m training.no_such_module`: no module 'training.no_such_module'",
        "the prose: scripts/no_such_script.py: no such file or folder",
    ]
    assert reference_problems("```bash\npython -m training.train\nbash scripts/gpu_kit.sh --plan\n```\n") == []

# README's benchmark tables are generated from bench/results/*.json by bench.report; that they are
# current is tests/test_bench_report.py's check.
