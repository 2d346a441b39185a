"""Exact-key memoisation of module forwards (:class:`ForwardCache`).

Q-Sched's coefficients act inside the scheduler step, after the denoiser call, so in a calibration the first
step's denoiser output and the text embeddings are the same for every candidate schedule. The cache keys a
forward on an exact hash of its inputs (tensor bytes, shapes, dtypes and every other argument), so a hit returns
the bit-identical output and anything it cannot hash is simply not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import torch

from qsched.errors import QSchedError

__all__ = ["ForwardCache", "input_key"]


class _Uncacheable(Exception):
    pass


def _hash_into(h: "hashlib._Hash", obj: Any) -> None:
    """Feed an exact, type-tagged description of ``obj`` (tensors by bytes, shape, dtype) into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            flat = t.contiguous().reshape(-1)
            if flat.device.type != "cpu":
                flat = flat.cpu()
            h.update(flat.view(torch.uint8).numpy().tobytes())
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"P{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.shape}{obj.dtype}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}[".encode())
        for v in obj:
            _hash_into(h, v)
        h.update(b"]")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}{{".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _hash_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, torch.dtype | torch.device):
        h.update(f"X{obj};".encode())
    else:
        raise _Uncacheable(type(obj).__name__)


def input_key(args: tuple, kwargs: dict) -> str:
    """Exact key of a forward's inputs: a BLAKE2 hash of every tensor's bytes, shape and dtype, and the kwargs."""
    h = hashlib.blake2b(digest_size=20)
    _hash_into(h, list(args))
    _hash_into(h, dict(kwargs))
    return h.hexdigest()


def _clone(obj: Any) -> Any:
    """Deep-copy the tensors of a forward output (tuples, lists, dicts, diffusers/transformers outputs)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_clone(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, dict):
        items = {k: _clone(v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:
            return type(obj)(**items)  # diffusers BaseOutput / transformers ModelOutput dataclasses
        except TypeError:
            out = type(obj)()
            out.update(items)
            return out
    return obj


class ForwardCache:
    """Memoise a module's forward on an exact key of its inputs (bounded, with a protected segment).

    Entries that were hit at least once (the first denoising step, the text embeddings: inputs identical for
    every candidate) are kept; entries never hit are evicted first, least recently used, so later steps
    (whose inputs change with the coefficients) cannot push the useful entries out. Outputs are cloned on
    the way in and out, so callers that modify them in place cannot corrupt the cache.

    ``evals`` counts forwards actually executed, ``hits`` those served from the cache.
    """

    def __init__(self, max_entries: int = 64, name: str = "module", enabled: bool = True):
        if max_entries < 1:
            raise QSchedError("max_entries must be >= 1")
        self.max_entries = int(max_entries)
        self.name = name
        self.enabled = enabled
        self.entries: OrderedDict[str, list] = OrderedDict()  # key -> [output, hits]
        self.evals = 0
        self.hits = 0
        self.uncacheable = 0

    def __len__(self) -> int:
        return len(self.entries)

    def call(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run ``forward(*args, **kwargs)`` or return the cached output for identical inputs."""
        if not self.enabled:  # counting only
            self.evals += 1
            return forward(*args, **kwargs)
        try:
            key = input_key(args, kwargs)
        except _Uncacheable:
            self.uncacheable += 1
            self.evals += 1
            return forward(*args, **kwargs)
        entry = self.entries.get(key)
        if entry is not None:
            entry[1] += 1
            self.entries.move_to_end(key)
            self.hits += 1
            return _clone(entry[0])
        out = forward(*args, **kwargs)
        self.evals += 1
        self._insert(key, _clone(out))
        return out

    def _insert(self, key: str, out: Any) -> None:
        while len(self.entries) >= self.max_entries:
            victim = next((k for k, e in self.entries.items() if e[1] == 0), None)
            if victim is None:
                victim = next(iter(self.entries))
            del self.entries[victim]
        self.entries[key] = [out, 0]

    @contextlib.contextmanager
    def attach(self, module: torch.nn.Module) -> Iterator["ForwardCache"]:
        """Route ``module``'s forward through the cache inside the ``with`` block (restored afterwards)."""
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        inner = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.call(inner, args, kwargs)

        forward.__wrapped__ = inner  # keeps inspect.signature(module.forward) truthful
        module.forward = forward
        try:
            yield self
        finally:
            if had:
                module.forward = previous
            else:
                del module.forward
