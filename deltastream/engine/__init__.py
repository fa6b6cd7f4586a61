"""Running plans: the Dask graph, atomic outputs and interrupts, progress."""

from .atomic import atomic_output, handle_signals, partial_path
from .graph import RunOptions, default_workers, run_reduce, run_tasks
from .progress import Progress

__all__ = ["Progress", "RunOptions", "atomic_output", "default_workers", "handle_signals",
           "partial_path", "run_reduce", "run_tasks"]
