"""Native CPU kernels of the depth reads, compiled from ``csrc/depth_attend.cpp`` on first use.

Two families, each a custom op (below):

* training (``attnres::native_attend`` and its backward): :func:`attnres.ops.fused.depth_attend`
  runs them for CPU tensors; they read each source once per read instead of the ~15 passes of the
  PyTorch-ops path (see the C++ file's header);
* inference, without gradients (:func:`stack_phase1`, :func:`stack_merge`, :func:`stack_norm`,
  :func:`stack_accumulate`, :func:`stack_push`): :mod:`attnres.ops.stacked` runs them for prefill,
  decoding and evaluation: phase 1 in one pass over a stack of the completed blocks, each read in
  one pass per token fused with the RMSNorm that consumes it, and each new partial sum with its
  statistic in one pass. Plain library calls, eager only (see the section below for why).

Building needs a C++ compiler and ``ninja`` (a dependency of this package); it takes about half a
minute, once per environment and kernel version, and says so on stderr. Without a compiler the reads
fall back to PyTorch ops, with one warning saying why; ``ATTNRES_KERNELS=torch`` (or
:func:`attnres.ops.dispatch.use_kernels`) chooses the PyTorch ops on purpose.

Cache: the library is built under ``$ATTNRES_CACHE/native`` (default ``~/.cache/attnres/native``) in
a folder per source content and toolchain (torch version and install path, Python headers, compiler,
``ninja``, flags: everything ``ninja`` would rebuild for), so every checkout of the same kernel in the
same environment shares one build, and two environments never rebuild each other's.

Lock: builders of one folder take turns on an OS lock, ``<folder>/attnres.lock`` (``flock``; it holds
the holder's PID). The OS drops it when its holder dies, so a killed build cannot leave it behind. A
waiting process says which PID it waits for, and gives up after ``ATTNRES_BUILD_TIMEOUT`` seconds
(default 600) with the usual warning and fallback. Inside, torch keeps its own lock file
(``<folder>/lock``) that it waits on forever; under our lock no other attnres build can hold it, so
one found there was left by a killed build and is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from attnres.ops.precision import no_autocast

try:
    import fcntl
except ImportError:  # Windows: no flock, so builds rely on torch's lock file alone (as before)
    fcntl = None  # type: ignore[assignment]

_SOURCE = Path(__file__).parent / "csrc" / "depth_attend.cpp"
BUILD_MESSAGE = "attnres: building the native depth-read kernel (about 30 s, once)..."
_module: ModuleType | None = None
_failed = False


def cpu_kernels() -> ModuleType | None:
    """The compiled kernel module (built on the first call), or ``None`` when it cannot be built."""
    global _module, _failed
    if _failed:
        return None
    if _module is None:
        try:
            _module = _build()
        except Exception as err:  # noqa: BLE001 - any build failure means: use the PyTorch-ops path
            _failed = True
            # A compiler's error ends with its gist; the lines before are the whole build log.
            why = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            warnings.warn(
                f"attnres: could not build the native CPU depth-read kernel ({type(err).__name__}: {why}); "
                "depth reads use PyTorch ops instead (correct, slower). Set ATTNRES_KERNELS=torch to "
                "silence this.",
                stacklevel=2,
            )
            return None
    return _module


# Vector instructions by the CPU's capability as PyTorch detects it. Each level builds under its own
# name, so a cache directory shared by different machines never hands one another's binary.
_ARCH_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}


def _target() -> tuple[str, dict[str, list[str]]]:
    """The extension's name and compile/link flags for this CPU."""
    level = torch.backends.cpu.get_cpu_capability()
    flags = {"extra_cflags": ["-O3", "-fopenmp", *_ARCH_FLAGS.get(level, [])], "extra_ldflags": ["-fopenmp"]}
    return f"attnres_depth_attend_{level.lower()}", flags


def _toolchain(flags: dict[str, list[str]]) -> dict[str, str]:
    """What goes into torch's ``build.ninja`` and ``ninja``'s own logs besides the source.

    A change in any of these makes ``ninja`` recompile (its log keeps each command line's hash; a
    ``ninja`` of another version discards the log), so each gets its own cache folder instead.
    """
    cxx = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")  # as torch picks it
    scheme = "nt" if sys.platform == "win32" else "posix_prefix"  # as torch finds Python.h

    def resolved(program: str) -> str:
        found = shutil.which(program)  # via PATH, as torch's subprocess finds it
        return os.path.realpath(found) if found else ""

    return {
        "torch": torch.__version__,
        "torch_path": str(Path(torch.__file__).absolute().parent),  # include and library paths
        "python_include": sysconfig.get_path("include", scheme=scheme),
        "cxx": f"{cxx}={resolved(cxx)}",
        "ninja": resolved("ninja"),
        "flags": json.dumps(flags, sort_keys=True),
    }


def _cache_key(source: bytes, toolchain: dict[str, str]) -> str:
    """The cache folder's name: readable versions first, then a hash of the source and toolchain."""
    digest = hashlib.sha256(source)
    digest.update(json.dumps(toolchain, sort_keys=True).encode())
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{toolchain['torch']}-py{py}-{digest.hexdigest()[:12]}"


def _build_dir(flags: dict[str, list[str]]) -> Path:
    """This kernel's cache folder in this environment."""
    root = Path(os.environ.get("ATTNRES_CACHE", "~/.cache/attnres")).expanduser() / "native"
    return root / _cache_key(_SOURCE.read_bytes(), _toolchain(flags))


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    name, flags = _target()
    build_dir = _build_dir(flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    # Compiled from a copy inside the folder: ninja rebuilds when a source *path* changes, so two
    # checkouts of the same kernel would otherwise rebuild each other's library.
    copy = build_dir / _SOURCE.name
    if not copy.exists():
        partial = copy.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(_SOURCE.read_bytes())
        os.replace(partial, copy)  # atomic: a concurrent builder never compiles half a file
    with _build_lock(build_dir) as exclusive:
        baton = build_dir / "lock"
        stale = exclusive and baton.exists()
        if stale:
            # Every attnres builder holds our lock while in load(), so no live one holds torch's:
            # it was left by a killed build, and torch would wait on it forever.
            baton.unlink(missing_ok=True)
            print(f"attnres: removed {baton}, left by a killed build", file=sys.stderr)
        if stale or not (build_dir / f"{name}.so").exists():
            print(BUILD_MESSAGE, file=sys.stderr)
        return load(name=name, sources=[str(copy)], build_directory=str(build_dir), **flags)


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[bool]:
    """Hold ``<build_dir>/attnres.lock`` exclusively; yields whether it could be held at all.

    ``False`` (no ``flock`` on this platform or file system) means: build without it, as torch alone
    would. Waits up to ``ATTNRES_BUILD_TIMEOUT`` seconds, then raises :class:`TimeoutError`.
    """
    path = build_dir / "attnres.lock"
    if fcntl is None:
        yield False
        return
    # Never deleted: removing a flock'd file lets a newcomer lock a fresh file next to the old one.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _acquire(fd, path, float(os.environ.get("ATTNRES_BUILD_TIMEOUT", "600"))):
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            os.ftruncate(fd, 0)  # so a waiter never names a PID that no longer holds it
    finally:
        os.close(fd)  # releases the flock (as the OS does when the process dies)


def _acquire(fd: int, path: Path, timeout: float) -> bool:
    """Take the flock on ``fd``, polling (so that the wait can end); ``False`` if locks are unsupported."""
    assert fcntl is not None
    start = time.monotonic()
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass  # held by another process
        except OSError:  # e.g. a network file system without locks
            return False
        pid = _holder(path)
        holder = f"process {pid}" if pid else "another process"
        if not told:
            told = True
            print(BUILD_MESSAGE, file=sys.stderr)
            print(
                f"attnres: waiting for {holder}, which holds {path} (up to {timeout:g} s, "
                "ATTNRES_BUILD_TIMEOUT)",
                file=sys.stderr,
            )
        if time.monotonic() - start >= timeout:
            raise TimeoutError(
                f"waited {timeout:g} s for {holder} to finish building it (it holds {path}); if that "
                f"is stuck, end it (kill {pid or '<the PID in that file>'}), or set "
                "ATTNRES_BUILD_TIMEOUT to wait longer"
            )
        time.sleep(0.2)


def _holder(path: Path) -> str | None:
    """The PID the holder of the lock at ``path`` wrote into it (``None`` if not written yet)."""
    with contextlib.suppress(OSError):
        pid = path.read_text().strip()
        if pid.isdigit():
            return pid
    return None


# --- the kernels as custom ops --------------------------------------------------------------------
# Every call of the kernels goes through these two ops, eager or compiled: ``torch.compile`` keeps a
# custom op in its graph as one opaque node (``fullgraph=True`` holds), and traces its shapes with the
# fake implementations below, which allocate only and never build the library.


def _loaded() -> ModuleType:
    """The built module; a custom op's real implementation runs only after :func:`cpu_kernels` succeeded."""
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("attnres::native_attend called but the native kernels could not be built")
    return kernels


@torch.library.custom_op("attnres::native_attend", mutates_args=(), device_types="cpu")
def native_attend(
    sources: list[Tensor], rstd: list[Tensor], queries: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel: ``S`` queries ``[S, d]`` against ``N`` contiguous sources ``[M, d]``.

    ``rstd`` are the sources' ``[M]`` statistics and ``queries`` are in the statistics dtype.
    Returns ``outs [S, M, d]``, ``lse [M, S]``, ``α`` and ``v · q`` ``[N, M, S]``, all in the
    statistics dtype.
    """
    outs, lse, alpha, dots = _loaded().forward(sources, rstd, queries)
    return outs, lse, alpha, dots


@native_attend.register_fake
def _(sources: list[Tensor], rstd: list[Tensor], queries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (m, d), n, s = sources[0].shape, len(sources), queries.shape[0]
    return (
        queries.new_empty((s, m, d)),
        queries.new_empty((m, s)),
        queries.new_empty((n, m, s)),
        queries.new_empty((n, m, s)),
    )


@torch.library.custom_op("attnres::native_attend_backward", mutates_args=(), device_types="cpu")
def native_attend_backward(
    sources: list[Tensor],
    rstd: list[Tensor],
    queries: Tensor,
    alpha: Tensor,
    dots: Tensor,
    grads: list[Tensor],
    grad_lse: Tensor,
) -> list[Tensor]:
    """The backward kernel of :func:`native_attend`, given its inputs, ``α``, ``v · q`` and gradients.

    ``grads`` are the ``S`` output gradients ``[M, d]`` and ``grad_lse`` is ``[M, S]``, contiguous in
    the statistics dtype. Returns ``N`` source gradients ``[M, d]`` (source dtype), the query
    gradient ``[S, d]`` and ``N`` rstd gradients ``[M]``.
    """
    return list(_loaded().backward(sources, rstd, queries, alpha, dots, grads, grad_lse))


@native_attend_backward.register_fake
def _(
    sources: list[Tensor], rstd: list[Tensor], queries: Tensor, *_statistics_and_grads: Tensor
) -> list[Tensor]:
    # the gradients' shapes follow the inputs alone (alpha, dots and the gradients are not read)
    return [
        *(torch.empty_like(v) for v in sources),
        torch.empty_like(queries),
        *(queries.new_empty(r.shape) for r in rstd),
    ]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    sources, rstd, queries = inputs
    _, _, alpha, dots = output
    ctx.n_src = len(sources)
    ctx.save_for_backward(queries, alpha, dots, *sources, *rstd)


@no_autocast
def _backward(ctx: Any, g_outs: Tensor, g_lse: Tensor, *_: Tensor) -> tuple[Any, ...]:
    # grads are materialised (zeros for unused outputs); α and v·q are not differentiated through
    queries, alpha, dots, *rest = ctx.saved_tensors
    n = ctx.n_src
    cd = queries.dtype
    result = native_attend_backward(
        rest[:n],
        rest[n:],
        queries,
        alpha,
        dots,
        list(g_outs.to(cd).contiguous().unbind(0)),
        g_lse.to(cd).contiguous(),
    )
    return result[:n], result[n + 1 :], result[n]


native_attend.register_autograd(_backward, setup_context=_setup_context)


# --- no-grad reads over a stack of blocks (attnres.ops.stacked) ------------------------------------
# Plain calls into the library, eager only: attnres.ops.stacked runs them with gradients disabled and
# outside torch.compile. A compiled graph calls a Python custom op through its Python layer (~25 µs a
# call on this project's CPU) and cannot fuse across it: compiled decoding measured Block at 2.09x
# compiled prenorm with these ops as custom ops, against 1.22x with PyTorch ops that inductor fuses
# (benchmarks/results/compile_cpu.md). So under compile the stacked reads stay PyTorch ops.


def stack_phase1(
    values: Tensor, rstd: Tensor, n: int, queries: Tensor, need_lse: bool
) -> tuple[Tensor, Tensor]:
    """Phase 1 of ``S`` queries ``[S, d]`` against the first ``n`` blocks of a stack.

    ``values [C, M, d]``, ``rstd [C, M, 1]`` and ``queries`` are contiguous, in the statistics dtype.
    Returns ``outs [M, S, d]`` and ``lse [M, S]`` (an empty tensor unless ``need_lse``).
    """
    outs, lse = _loaded().stack_phase1(values, rstd, n, queries, need_lse)
    return outs, lse


def stack_merge(
    o: Tensor, lse: Tensor, p: Tensor, p_rstd: Tensor, q: Tensor, weight: Tensor | None, eps: float
) -> Tensor:
    """Phase 2, ``h = o + σ(r_p (p · q) − lse)(p − o)``, then ``rmsnorm(h) · weight`` if ``weight``.

    ``o [M, d]`` (statistics dtype) needs unit stride along ``d`` only, ``lse [M]`` any stride; the
    partial sum ``p [..., d]`` and its ``p_rstd [...]`` are contiguous; ``q [d]`` (statistics dtype);
    ``weight [d]`` is in ``p``'s dtype and ``eps`` is the norm's. Returns ``p``'s shape and dtype.
    """
    return _loaded().stack_merge(o, lse, p, p_rstd, q, weight, eps)


def stack_norm(o: Tensor, like: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """A group's first read ``o [M, d]`` (statistics dtype, unit stride along ``d``) in ``like``'s
    shape ``[..., d]`` and dtype, and ``rmsnorm(o) · weight`` if ``weight`` (``[d]``, that dtype)."""
    return _loaded().stack_norm(o, like, weight, eps)


def stack_accumulate(partial: Tensor | None, out: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``p = partial + out`` (a contiguous copy of ``out`` if ``partial`` is ``None``) and its
    ``rsqrt(mean(p²) + eps)``, in one pass.

    ``out [..., d]`` may be strided; ``partial`` is contiguous, of ``out``'s shape and dtype. Returns
    ``p`` (``out``'s shape) and its statistic ``[...]`` in the statistics dtype.
    """
    p, r = _loaded().stack_accumulate(partial, out, eps)
    return p, r


def stack_push(values: Tensor, rstd: Tensor, slot: int, p: Tensor, r: Tensor) -> None:
    """Write a completed block ``p`` (``M·d`` values, any strides and dtype) and its statistic ``r``
    into row ``slot`` of a stack ``values [C, M, d]``, ``rstd [C, M, 1]``."""
    _loaded().stack_push(values, rstd, slot, p, r)
