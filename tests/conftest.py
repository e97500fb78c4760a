"""Shared fixtures: tiny model folders built offline (cached per session), and an in-process CLI runner."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, **kw) -> Path of a saved tiny model folder; identical arguments share one folder.

    Tests must not modify the folder; copy it first if they need to.
    """
    from abliterate.demo.tiny_models import save_tiny_model_folder

    cache: dict = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = save_tiny_model_folder(folder, arch=arch, **kw)
        return cache[key]

    return make


@pytest.fixture
def run_cli(capsys):
    """run_cli(main, [args]) -> (exit_code, stdout, stderr) for a command's main(argv)."""

    def run(main, args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
