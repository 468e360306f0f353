"""Native CPU kernels of the fused depth read, compiled from ``csrc/depth_attend.cpp`` on first use.

:class:`attnres.ops.fused._DepthAttend` runs them for CPU tensors: they read each source once per
read instead of the ~15 passes of the PyTorch-ops path (see the C++ file's header). Building needs a
C++ compiler and ``ninja`` (a dependency of this package); it takes about half a minute, once per
machine and kernel version: the library is cached under ``$ATTNRES_CACHE/native`` (default
``~/.cache/attnres/native``) in a folder per torch version, Python version and source content, so
every checkout of the same kernel shares one build. Without a
compiler the read falls back to PyTorch ops, with one warning saying why; ``ATTNRES_KERNELS=torch``
(or :func:`attnres.ops.dispatch.use_kernels`) chooses the PyTorch ops on purpose.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).parent / "csrc" / "depth_attend.cpp"
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
            warnings.warn(
                f"attnres: could not build the native CPU depth-read kernel ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}); depth reads use "
                "PyTorch ops instead (correct, slower). Set ATTNRES_KERNELS=torch to silence this.",
                stacklevel=2,
            )
            return None
    return _module


# Vector instructions by the CPU's capability as PyTorch detects it. Each level builds under its own
# name, so a cache directory shared by different machines never hands one another's binary.
_ARCH_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}


def _build() -> ModuleType:
    import torch
    from torch.utils.cpp_extension import load

    level = torch.backends.cpu.get_cpu_capability()
    name = f"attnres_depth_attend_{level.lower()}"
    source = _SOURCE.read_bytes()
    # Keyed by the source's content, and compiled from a copy inside the key: ninja rebuilds when a
    # source *path* changes, so two checkouts of the same kernel would otherwise rebuild each other's
    # library (and race on it when run side by side).
    build_dir = Path(os.environ.get("ATTNRES_CACHE", "~/.cache/attnres")).expanduser() / "native"
    build_dir = build_dir / (
        f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
        f"-{hashlib.sha256(source).hexdigest()[:12]}"
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    copy = build_dir / _SOURCE.name
    if not copy.exists():
        partial = copy.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(source)
        os.replace(partial, copy)  # atomic: a concurrent builder never compiles half a file
    if not (build_dir / f"{name}.so").exists():
        print("attnres: building the native CPU depth-read kernel (once, about 30 s)...", file=sys.stderr)
    return load(
        name=name,
        sources=[str(copy)],
        extra_cflags=["-O3", "-fopenmp", *_ARCH_FLAGS.get(level, [])],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
    )
