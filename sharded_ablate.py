#!/usr/bin/env python3
"""Thin wrapper: see `python -m abliterate ablate --help`."""
import sys

from abliterate.commands.ablate import main

if __name__ == "__main__":
    sys.exit(main())
