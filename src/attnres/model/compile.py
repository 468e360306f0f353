"""``torch.compile`` of the model: the one place that checks it can run and says how it is called.

Training (``--train.compile=true``, :mod:`attnres.train.engine`) compiles the model's forward;
generation (``generate(..., compile=True)``, ``attnres sample --compile``) compiles the decode step
only (:mod:`attnres.model.generate`). Both use inductor, the default backend, and keep the depth
reads on the native/Triton kernels: those are custom ops that stay in the graph as nodes
(:mod:`attnres.ops.native`, :mod:`attnres.ops.triton.autograd`).

Inductor generates C++ for CPU tensors, so compiling on CPU needs the C++ compiler it looks for
(``torch._inductor.config.cpp.cxx``: ``$CXX`` or ``g++``); :func:`check_compile_supported` says so
before the first graph, instead of a traceback from inside inductor.

Recompilations: a compiled function's graphs are cached per code object, at most
``torch._dynamo.config.recompile_limit`` (8) of them; past that, dynamo silently runs it eagerly. One
model in a process needs two (training, and evaluation without gradients); a benchmark holding many
models raises the limit (:func:`allow_graphs`).
"""

from __future__ import annotations

import shutil
import sys

import torch


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on this machine (found on ``PATH``), or ``None``."""
    from torch._inductor import config

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    for name in candidates:
        if name and shutil.which(name):
            return name
    return None


def check_compile_supported(device: torch.device | str) -> None:
    """Raise a :class:`ValueError` naming the fix when ``torch.compile`` cannot run on ``device``.

    A ``ValueError``, so the CLI prints it as one line (the machine's setup, not a bug).

    CPU tensors need a C++ compiler (inductor compiles C++ kernels); CUDA tensors need Triton.
    """
    device = torch.device(device)
    if device.type == "cpu" and cpp_compiler() is None:
        from torch._inductor import config

        wanted = (
            " or ".join(c for c in config.cpp.cxx if c)
            if isinstance(config.cpp.cxx, tuple)
            else config.cpp.cxx
        )
        install = "xcode-select --install" if sys.platform == "darwin" else "apt-get install g++"
        raise ValueError(
            f"compile=true needs a C++ compiler on CPU (torch.compile's inductor backend builds C++ kernels) "
            f"and none was found on PATH (looked for {wanted}); install one ({install}) or point $CXX at "
            "it, or run without compile"
        )
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ValueError(
                "compile=true on CUDA needs Triton (inductor generates Triton kernels): "
                "pip install 'attnres[gpu]', or run without compile"
            )


def allow_graphs(n: int) -> None:
    """Let a compiled function hold at least ``n`` graphs before dynamo falls back to eager for it."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, n)
