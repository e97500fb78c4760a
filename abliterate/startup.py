"""Process-wide start-up and exit tricks, in one place, each with what it buys (CPU, 2 cores, 2 GB ablation).

- `start_torch_import` / `wait_for_torch_import`: import torch on a background thread while the ablation reads
  headers and copies untouched tensors with kernel copies (which release the GIL). `import torch` costs about a
  second here, as long as `cp -r` of a 2 GB checkpoint; overlapping the two is most of why the ablation runs
  within 1.3x of a plain copy. The main thread's own `import torch` later waits for this one (the per-module
  import lock) and raises the import error itself if there was one.
- `prepare_progress_bars`: tqdm's first bar imports `multiprocessing` to create its lock; done before torch's
  background import starts, since any import during it waits behind torch's (a lazy one cost 0.17 s).
- `bound_heap_growth`: glibc's mallopt fixes the mmap threshold so freed edit buffers go back to the OS at once
  (peak RSS stays at one edited slice plus the interpreter instead of creeping up with every tensor).
- `skip_collection_at_exit` (gc.freeze at exit) and `exit_process` (os._exit after the atexit handlers and a
  flush): with torch loaded the final garbage collection and module teardown cost about 0.3 s and 0.1 s of
  every command's wall time and free nothing the OS would not reclaim anyway.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

_thread: threading.Thread | None = None
SWITCH_INTERVAL = 0.0002  # seconds a thread waiting for the GIL lets the importing thread run before taking it


def start_torch_import() -> None:
    """Begin importing torch in a daemon thread (no-op when it is already imported or being imported)."""
    global _thread
    if "torch" in sys.modules or (_thread is not None and _thread.is_alive()):
        return

    def load() -> None:
        # torch creates several hundred thousand objects while importing; collecting them on the way buys
        # nothing (they all stay alive) and costs about 0.1 s.
        gc.disable()
        # The main thread meanwhile reads files and starts kernel copies, each time giving the GIL up and then
        # waiting for it; with the default 5 ms switch interval those waits were a third of its time.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            import torch  # noqa: F401 - the import is the point
        except BaseException:  # noqa: BLE001 - the main thread's own import reports the failure
            pass
        finally:
            sys.setswitchinterval(interval)
            gc.enable()

    _thread = threading.Thread(target=load, name="torch-import", daemon=True)
    _thread.start()


def wait_for_torch_import() -> None:
    """Join the background import (a command must not exit while a thread is half-way through loading torch)."""
    if _thread is not None:
        _thread.join()


def prepare_progress_bars() -> None:
    """Create tqdm's multiprocessing lock now (see the module docstring)."""
    from tqdm import tqdm

    tqdm.get_lock()


def bound_heap_growth() -> None:
    """Serve large allocations with mmap so each freed tensor returns to the OS at once (glibc only).

    glibc raises its mmap threshold after large frees, after which the per-expert float32 buffers come from the
    heap and fragment it; RSS then creeps upward with every tensor. A fixed threshold keeps peak RSS at one
    edited slice plus the interpreter.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


_exit_hook_registered = False


def skip_collection_at_exit() -> None:
    """At interpreter exit, freeze every object instead of letting the final garbage collection walk them.

    With torch imported that walk costs about 0.3 s of every command's wall time and frees nothing the OS would
    not reclaim anyway; atexit runs after the command's files are closed and before that collection.
    """
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(gc.freeze)
        _exit_hook_registered = True


def exit_process(code: int) -> None:
    """End a command-line process with `code`: run the atexit handlers, flush stdout and stderr, then leave with
    os._exit, skipping only the interpreter's teardown of every loaded module (about 0.1 s with torch loaded,
    after the final collection that `skip_collection_at_exit` already avoids). Every file a command writes is
    closed before it returns, and its thread pools are shut down, so nothing is lost.
    For `if __name__ == "__main__"` blocks and the root scripts only: it never returns."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
