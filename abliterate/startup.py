"""Import torch on a background thread while a command does work that needs no tensor library.

`import torch` costs about a second on a CPU machine, most of it Python bytecode and shared-library loading.
The ablation spends its first second reading headers and copying untouched tensors with kernel copies, which
release the GIL, so the two overlap (abliterate.ablate.job). The main thread's own `import torch` later simply waits
for this one (Python's per-module import lock) and raises the import error itself if there was one.
"""

from __future__ import annotations

import gc
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
            import torch  # noqa: F401
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
