"""Running plans: the Dask graph, atomic outputs and interrupts, the resume journal, progress."""

from .atomic import atomic_output, handle_signals, job_output, partial_path, sync_tree
from .graph import RunOptions, default_workers, run_reduce, run_tasks
from .journal import Journal, inputs_fingerprint
from .progress import Progress

__all__ = ["Journal", "Progress", "RunOptions", "inputs_fingerprint", "atomic_output", "default_workers", "job_output",
           "handle_signals", "partial_path", "run_reduce", "run_tasks", "sync_tree"]
