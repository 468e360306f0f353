"""Building the native kernel: no lock can make it hang, and environments never share or fight over a build.

Builds run in subprocesses with timeouts, so a regression to a lock that waits forever fails here
instead of hanging the suite. Each uses its own ``ATTNRES_CACHE`` under ``tmp_path``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.utils.cpp_extension

from attnres.ops import native

_LOAD = "from attnres.ops.native import cpu_kernels; print('loaded' if cpu_kernels() else 'fell back')"
_SRC = str(Path(native.__file__).parents[2])  # this checkout's attnres, whatever is installed


def _env(cache: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "ATTNRES_CACHE": str(cache), **extra}


def _load(cache: Path, timeout: float, **extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``cpu_kernels()`` in a fresh process; fails the test (instead of hanging it) past ``timeout``."""
    start = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-c", _LOAD], env=_env(cache, **extra), capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr
        pytest.fail(f"cpu_kernels() still waiting after {timeout:g} s (stderr: {stderr!r})")
    return run, time.monotonic() - start


def test_cache_key_separates_environments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two virtualenvs with the same torch version, or PATH with and without a venv's ninja, differ in
    what ninja rebuilds for, so they get different folders instead of recompiling each other's."""
    _, flags = native._target()
    toolchain = native._toolchain(flags)
    assert toolchain["torch_path"] == str(Path(torch.__file__).absolute().parent)
    key = native._cache_key(b"kernel", toolchain)
    assert key.startswith(f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-")
    assert native._cache_key(b"kernel", dict(toolchain)) == key, "the key is deterministic"
    assert native._cache_key(b"kernel v2", toolchain) != key
    others = {
        "torch_path": "/elsewhere/.venv/lib/python3.11/site-packages/torch",
        "python_include": "/elsewhere/include/python3.11",
        "cxx": "clang++=/usr/bin/clang++",
        "ninja": "/elsewhere/.venv/bin/ninja",
        "flags": '{"extra_cflags": ["-O2"]}',
    }
    for field, other in others.items():
        assert native._cache_key(b"kernel", {**toolchain, field: other}) != key, field

    fake = tmp_path / "bin" / "ninja"  # the ninja that PATH finds is the one that counts
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert native._toolchain(flags)["ninja"] == os.path.realpath(fake)


def test_stale_torch_lock_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under our lock, torch's lock file can only be a killed build's: it goes before torch sees it
    (torch would wait on it forever). No compiler runs here: torch's ``load`` is replaced."""
    monkeypatch.setenv("ATTNRES_CACHE", str(tmp_path))
    name, flags = native._target()
    build_dir = native._build_dir(flags)
    build_dir.mkdir(parents=True)
    (build_dir / f"{name}.so").touch()
    (build_dir / "lock").touch()
    seen: list[bool] = []

    def load(**kwargs: object) -> ModuleType:
        seen.append((build_dir / "lock").exists())
        assert kwargs["build_directory"] == str(build_dir)
        return ModuleType(name)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    assert native._build().__name__ == name
    assert seen == [False], "torch's stale lock file was still there when load() ran"
    err = capsys.readouterr().err
    assert "left by a killed build" in err and native.BUILD_MESSAGE in err


def test_waiter_names_the_holder_times_out_and_falls_back(tmp_path: Path) -> None:
    """A live process holding the build lock: the waiter says whom it waits for, gives up after
    ATTNRES_BUILD_TIMEOUT with a warning saying how to fix it, and reads use PyTorch ops. Once the
    holder is killed, the lock is free at once (the OS drops it: it cannot go stale)."""
    hold = (
        "from attnres.ops import native; import time\n"
        "d = native._build_dir(native._target()[1]); d.mkdir(parents=True)\n"
        "with native._build_lock(d):\n"
        "    print(d, flush=True); time.sleep(300)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], env=_env(tmp_path), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        build_dir = Path(holder.stdout.readline().strip())
        assert (build_dir / "attnres.lock").read_text().strip() == str(holder.pid)
        run, seconds = _load(tmp_path, timeout=120, ATTNRES_BUILD_TIMEOUT="2")
        assert run.stdout.strip() == "fell back", run.stderr
        assert native.BUILD_MESSAGE in run.stderr
        assert f"waiting for process {holder.pid}, which holds {build_dir / 'attnres.lock'}" in run.stderr
        assert "could not build the native CPU depth-read kernel (TimeoutError: waited 2 s" in run.stderr
        assert f"kill {holder.pid}" in run.stderr
        assert seconds < 60, f"took {seconds:.0f} s"
    finally:
        holder.kill()
        holder.wait()

    fd = os.open(build_dir / "attnres.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
    finally:
        os.close(fd)


@pytest.mark.slow  # one compile, ~40 s on 2 cores
def test_killed_build_does_not_hang_the_next(tmp_path: Path) -> None:
    """A build killed mid-compile leaves torch's lock file behind; the next run used to wait on it
    forever at 0% CPU with no output. It has to build and load, saying so."""
    build = subprocess.Popen(
        [sys.executable, "-c", _LOAD], env=_env(tmp_path), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("native/*/lock")):  # torch's: it is compiling now
            assert build.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
    finally:
        os.killpg(build.pid, signal.SIGKILL)  # the build with its ninja and compiler, like an OOM kill
        build.wait()
    assert list(tmp_path.glob("native/*/lock")), "the kill left no lock file: nothing is tested"

    run, seconds = _load(tmp_path, timeout=240)
    assert run.stdout.strip() == "loaded", run.stderr
    assert native.BUILD_MESSAGE in run.stderr
    assert not list(tmp_path.glob("native/*/lock"))
    print(f"recovered from the killed build in {seconds:.1f} s (a full build)")
