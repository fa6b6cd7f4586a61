"""The journal of a job: which tasks finished, with their results, so that ``--resume`` can
continue a run that was killed (``kill -9`` included) instead of starting over.

It lives in the job's partial output folder (``OUT.partial/.journal``), one folder per pass in the
order the job runs them, one small file per finished task, each written under a temporary name and
renamed: a task's record is whole or absent. A task without a record runs again; its output chunk
is simply rewritten. ``plan.json`` fingerprints the job (inputs, method, parameters, chunking): a
partial output made by a different job is never resumed. The journal is removed before the
output is renamed into place.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

from ..errors import ParameterError

__all__ = ["Journal", "journaled", "inputs_fingerprint"]

NAME = ".journal"


class Journal:
    def __init__(self, partial: str, plan: dict[str, Any], resume: bool):
        self.folder = os.path.join(partial, NAME)
        self._seq = 0
        os.makedirs(self.folder, exist_ok=True)
        plan_path = os.path.join(self.folder, "plan.json")
        text = json.dumps(plan, sort_keys=True, default=str)
        if resume and os.path.exists(plan_path):
            with open(plan_path, encoding="utf-8") as f:
                if f.read() != text:
                    raise ParameterError(f"file '{partial}': the partial output was made by a different job "
                                         "(inputs, method, parameters or chunking); run without --resume to "
                                         "start over")
        else:
            with open(plan_path, "w", encoding="utf-8") as f:
                f.write(text)

    def pass_folder(self, name: str) -> str:
        """The folder of the next pass (passes are numbered in the order the job runs them)."""
        self._seq += 1
        folder = os.path.join(self.folder, f"{self._seq:03d}-{name}")
        os.makedirs(folder, exist_ok=True)
        return folder

    @staticmethod
    def record(folder: str, i: int) -> str:
        return os.path.join(folder, f"{i}.pkl")

    @staticmethod
    def load(folder: str, i: int) -> tuple[bool, Any]:
        try:
            with open(Journal.record(folder, i), "rb") as f:
                return True, pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            return False, None


def journaled(fn, path: str, task):
    """Run a task and record its result (the graph node of a journaled task)."""
    result = fn(task)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return result


def inputs_fingerprint(paths) -> list:
    """(path, size, mtime) of each input and of the files at its top level: a changed input
    invalidates a partial output."""
    out = []
    for path in paths:
        path = os.path.abspath(path)
        entries = [path]
        if os.path.isdir(path):
            entries += [os.path.join(path, n) for n in sorted(os.listdir(path))]
        for entry in entries:
            try:
                st = os.stat(entry)
            except OSError:
                continue
            out.append((entry, st.st_size if not os.path.isdir(entry) else 0, st.st_mtime_ns))
    return out
