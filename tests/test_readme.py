"""The README's snippet runs as written, and the README keeps its two set-up commands first."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_snippet_runs_and_trains():
    (snippet,) = python_blocks(README.read_text())
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    pre = namespace["preconditioner"]
    assert pre.steps == 20
    assert set(pre.factors()) == {"1", "3"}
    assert namespace["loss"].item() < 2.0
