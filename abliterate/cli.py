"""What every command shares: the user-error type, exit codes, and safe output paths.

Exit codes (DESIGN.md section 6): 0 success, 2 bad input (one line naming the problem and the fix),
1 internal failure (a traceback, because that is a bug for us to fix).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2


class UserError(Exception):
    """A mistake in what the user gave us. The message is one line: what is wrong and how to fix it."""


def run_command(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's main, turning UserError into one line on stderr and exit code 2."""
    _skip_collection_at_exit()
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; nothing partial was left behind", file=sys.stderr)
        return 130
    return EXIT_OK if code is None else int(code)


_exit_hook_registered = False


def _skip_collection_at_exit() -> None:
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
    after the final collection that `_skip_collection_at_exit` already avoids). Every file a command writes is
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


def check_new_output_file(path: str | os.PathLike, force: bool = False, flag: str = "--output") -> Path:
    """Validate a file we are about to create: its folder exists and is writable, and it is new unless forced."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{flag} {out}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {out}: folder {parent} is not writable; choose another path")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name")
    if out.exists() and not force:
        raise UserError(f"{flag} {out} already exists; pass --force to overwrite it")
    return out


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block finishes.

    An interrupted or failed write leaves no file at `path` (and removes the temporary one), so a partial
    result never looks complete.
    """
    out = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
