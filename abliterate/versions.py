"""The versions of the libraries a result depends on, recorded in every file the tool writes.

Read from the installed packages' metadata (importlib.metadata), so asking costs no import of torch. The
constraints file (constraints.txt) pins the versions the test suite and the README's figures come from; a record
whose versions differ from it explains a figure that differs.
"""

from __future__ import annotations

from importlib import metadata

# The libraries whose version can change a number we write (model loading and kernels, file format, the sampler).
RECORDED = ("torch", "transformers", "safetensors", "optuna")


def tool_versions() -> dict[str, str]:
    """{'abliterate': ..., 'torch': ..., 'transformers': ..., 'safetensors': ..., 'optuna': ...}; a library that
    is not installed reads 'not installed'."""
    from abliterate import __version__

    out = {"abliterate": __version__}
    for name in RECORDED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def versions_line() -> str:
    """'abliterate 0.1.0, torch 2.13.0, transformers 5.1.0, ...' for a YAML or text comment."""
    return ", ".join(f"{k} {v}" for k, v in tool_versions().items())
