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


def run_block(index: int) -> dict:
    snippet = python_blocks(README.read_text())[index]
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    return namespace


def test_readme_has_two_snippets():
    assert len(python_blocks(README.read_text())) == 2


def test_readme_snippet_runs_and_trains():
    (snippet, _) = python_blocks(README.read_text())
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    pre = namespace["preconditioner"]
    assert pre.steps == 20
    assert set(pre.factors()) == {"1", "3"}
    assert namespace["loss"].item() < 2.0


def test_readme_training_loop_runs_and_trains():
    """AMP with a GradScaler, 4 accumulated micro-batches, an EMA copy, evaluation and a
    checkpoint: 20 counted steps, factors of the whole batch, a loss that fell, an EMA copy
    that never fed the preconditioner, and a checkpoint another preconditioner loads."""
    import torch

    import natgrad

    ns = run_block(1)
    pre, model, ema = ns["preconditioner"], ns["model"], ns["ema"]
    assert pre.steps == 20 and ns["scaler"].get_scale() > 1.0
    assert set(pre.factors()) == {"1", "3"}
    assert ns["loss"].item() * 4 < 2.0  # the last micro-batch's loss (divided by 4)
    assert model.training and 0.0 <= ns["accuracy"].item() <= 1.0
    assert all(not done for done in pre._capture._done.values())
    ema(ns["x"]).sum().backward()  # the EMA copy's passes are never recorded
    assert all(not done for done in pre._capture._done.values())
    fresh = natgrad.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.05))
    fresh.load_state_dict(ns["checkpoint"]["preconditioner"])
    for name, (A, G) in pre.factors().items():
        assert torch.equal(fresh.factors()[name][0], A) and torch.equal(fresh.factors()[name][1], G)
