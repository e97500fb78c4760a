#!/usr/bin/env python3
"""Thin wrapper: see `python -m abliterate search --help`."""
from abliterate.startup import exit_process
from abliterate.commands.search import main

if __name__ == "__main__":
    exit_process(main())
