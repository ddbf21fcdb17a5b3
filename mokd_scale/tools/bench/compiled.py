"""What regions compiled with train.compile launch, for `mokd-bench ops`.

Inductor's generated code for a compiled region (forward or backward graph) calls two kinds of
kernels: its own generated kernels (on the CPU, C++ functions named `cpp_fused_<ops>_<n>`; on a
GPU, Triton kernels), called directly from Python and never seen by torch's dispatcher, and
library kernels (matmuls, convolutions, attention: `extern_kernels.mm(..., out=buf)`), which go
through the dispatcher like any eager operator. The operator counter sees the second kind; this
module makes the first kind visible too: while `kernels_reported()` is active, every generated
kernel that inductor loads is wrapped so that each call reports a `GeneratedKernel` to the
listener set with `listen()`.

Rule that makes eager and compiled counts comparable: one generated kernel call is one launching
operator (on a GPU it is one Triton launch, as one eager elementwise operator is one CUDA launch),
a library kernel is counted as its operator is in eager. Allocations inside a compiled region
(inductor's `empty_strided_cpu`) and its tensor reinterpretations bypass the dispatcher and are
not counted: they launch nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable

GENERATED_PREFIX = "cpp_"  # inductor's C++ (CPU) kernels: cpp_fused_<aten ops>_<index>
INDEX_SUFFIX = re.compile(r"_\d+$")

_listener: list[Callable[["GeneratedKernel"], None]] = []


@dataclasses.dataclass(frozen=True)
class GeneratedKernel:
    """A kernel inductor generated, named by the aten operators it fuses (index dropped, so that
    the same fusion in several graphs counts under one name)."""
    name: str

    @property
    def namespace(self) -> str:
        return "inductor"


@contextlib.contextmanager
def listen(callback: Callable[[GeneratedKernel], None]):
    """Calls of generated kernels go to `callback` while active (kernels loaded under
    kernels_reported(); others are not seen)."""
    _listener.append(callback)
    try:
        yield
    finally:
        _listener.pop()


@contextlib.contextmanager
def kernels_reported():
    """Wrap every generated kernel loaded while active (i.e. compiled, or loaded from inductor's
    cache, in this window) so that its calls reach the innermost `listen` callback."""
    from torch._inductor.async_compile import AsyncCompile

    original = AsyncCompile.wait

    def wait(self, scope: dict) -> None:  # each generated module calls this once its kernels are loaded
        original(self, scope)
        for name, kernel in list(scope.items()):
            if name.startswith(GENERATED_PREFIX) and callable(kernel):
                scope[name] = reporting(kernel, GeneratedKernel(INDEX_SUFFIX.sub("", name)))

    AsyncCompile.wait = wait
    try:
        yield
    finally:
        AsyncCompile.wait = original


def reporting(kernel: Callable, key: GeneratedKernel) -> Callable:
    def call(*args):
        if _listener:
            _listener[-1](key)
        return kernel(*args)
    return call
