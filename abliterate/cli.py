"""What every command shares: the user-error type, exit codes, and safe output paths.

Exit codes (DESIGN.md section 6): 0 success, 2 bad input (one line naming the problem and the fix),
1 internal failure (a traceback, because that is a bug for us to fix).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from abliterate.startup import skip_collection_at_exit

EXIT_OK = 0
EXIT_INTERNAL = 1  # what an uncaught exception gives: a traceback, our bug
EXIT_BAD_INPUT = 2


class UserError(Exception):
    """A mistake in what the user gave us. The message is one line: what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_minimums(checks) -> None:
    """UserError "FLAG VALUE: must be at least LOW" for the first (flag, value, low) whose value is below its
    low (None: the flag was not given)."""
    for flag, value, low in checks:
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")


def run_command(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's main, turning UserError into one line on stderr and exit code 2."""
    skip_collection_at_exit()
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; nothing partial was left behind", file=sys.stderr)
        return 130
    return EXIT_OK if code is None else int(code)


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
