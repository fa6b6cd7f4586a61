"""Where a method's fast paths live: (method class, role, backend, dtype) -> implementation.

Each method's module registers its numba and torch implementations next to its numpy code, one
line each (``register(Dare, "edit", "torch", TORCH_DTYPES)(dare_edit_torch)``). Roles:

* "edit"   - ``fn(method, base_bits, ft_bits, ctx) -> output bits`` (a checkpoint out),
* "encode" - ``fn(method, base_bits, ft_bits, ctx) -> (stored arrays, post partial)``,
* "decode" - ``fn(method, base_bits, stored, ctx) -> output bits``.

Backends: "numpy" is the method's own code, the reference, always there and never registered;
"numba" (fused CPU kernels) serves ``ctx.device`` "cpu"; "torch" serves "cuda..." and
"torch:cpu". A registered implementation runs only where the method instance says it applies to
its parameters (``Method.implements(role, backend)``: 1-bit per-row BitDelta has no torch
encoder, residual levels no torch kernel); otherwise, and for a dtype without one, the numpy
reference runs. Lookup is by the exact class, so a subclass (a merge sparsifier) inherits no
fast path it was not checked against. Tests, benchmarks and docs list kernels from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .base import Method

__all__ = ["ROLES", "BACKENDS", "register", "backend_of", "find", "implementations", "Implementation"]

ROLES = ("edit", "encode", "decode")
BACKENDS = ("numpy", "numba", "torch")
_REGISTRY: dict[tuple[type, str, str, str], Callable] = {}


class Implementation(NamedTuple):
    method: type[Method]
    role: str
    backend: str
    dtypes: tuple[str, ...]
    function: Callable


def register(method: type, role: str, backend: str, dtypes) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``role`` of ``method`` on ``backend`` for these dtype names."""
    if role not in ROLES or backend not in BACKENDS[1:]:
        raise ValueError(f"register: role {role!r} / backend {backend!r} unknown")

    def add(fn: Callable) -> Callable:
        for dtype in dtypes:
            _REGISTRY[(method, role, backend, dtype)] = fn
        return fn
    return add


def backend_of(device: str) -> str:
    """The backend a chunk on this device uses when a fast path applies."""
    return "numba" if device == "cpu" else "torch"


def find(method, role: str, device: str, dtype_name: str) -> Callable | None:
    """The implementation of ``role`` for this method instance, device and dtype, or None (numpy).
    A chunk on a torch device that the method has no torch path for runs on the CPU's kernels."""
    for backend in dict.fromkeys((backend_of(device), "numba")):
        fn = _REGISTRY.get((type(method), role, backend, dtype_name))
        if fn is not None and method.implements(role, backend):
            return fn
    return None


def implementations(backend: str | None = None) -> list[Implementation]:
    """Every registered implementation (of one backend), its dtypes gathered, in registration order."""
    out: dict[tuple, list[str]] = {}
    for (cls, role, be, dtype), fn in _REGISTRY.items():
        if backend is None or be == backend:
            out.setdefault((cls, role, be, fn), []).append(dtype)
    return [Implementation(cls, role, be, tuple(dtypes), fn) for (cls, role, be, fn), dtypes in out.items()]
