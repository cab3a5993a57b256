"""One run's folder: ``meta.json`` (config, status, summary), ``log.jsonl`` (one JSON
record per line) and ``checkpoint.pt`` (the last epoch's state), written so that a kill
at any moment leaves something ``--resume`` can use (see :mod:`.files`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import files

__all__ = ["RunFolder"]


class RunFolder:
    """The files of the run in ``path``; only the process that writes calls the writers."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def finding(self, config: dict[str, Any], resume: bool) -> tuple[str, Any]:
        """Create the folder, remove a killed writer's ``*.tmp``, and say what to do:
        ``("start", None)``, ``("resume", None)`` (a checkpoint of this ``config``),
        ``("finished", summary)`` or ``("mismatch", message)`` (``resume`` only).

        Raises:
            ValueError: ``meta.json`` is not a run record.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        files.remove_stale_temporaries(self.path)
        if not resume:
            return "start", None
        if self.meta_path.exists():
            meta = files.read_json(self.meta_path, "run record")
            if not isinstance(meta, dict):
                raise ValueError(f"run record {self.meta_path} is not a JSON object")
            if meta.get("config") != config:
                return "mismatch", (f"{self.path} holds a run with other settings; use "
                                    "another --out or drop --resume")
            if meta.get("status") in ("done", "diverged"):
                return "finished", meta["summary"]
        if self.checkpoint_path.exists():
            return "resume", None
        return "start", None

    def start(self) -> None:
        """An empty log and no checkpoint."""
        self.log_path.write_text("")
        self.checkpoint_path.unlink(missing_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_log_lines(self, count: int) -> None:
        """Cut the log back to its first ``count`` lines (where a checkpoint left it)."""
        records = self.log_path.read_text().splitlines(keepends=True)
        self.log_path.write_text("".join(records[:count]))

    def write_meta(self, meta: dict[str, Any]) -> None:
        files.write_json(self.meta_path, meta)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        files.atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's state (our own file of state_dicts and RNG states, which are
        Python objects: ``weights_only=False``).

        Raises:
            ValueError: it cannot be read (truncated, empty, not a checkpoint), one line.
        """
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated, empty, not a torch file: many kinds
            text = str(e).strip()
            first = text.splitlines()[0][:160] if text else ""
            raise ValueError(f"{self.checkpoint_path} cannot be read ({type(e).__name__}: "
                             f"{first}); delete it to restart this run from the beginning"
                             ) from None
        if not isinstance(state, dict):
            raise ValueError(f"{self.checkpoint_path} is not a natgrad bench checkpoint")
        return state
