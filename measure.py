#!/usr/bin/env python3
"""Thin wrapper: see `python -m abliterate measure --help`."""
import sys

from abliterate.commands.measure import main

if __name__ == "__main__":
    sys.exit(main())
