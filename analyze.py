#!/usr/bin/env python3
"""Thin wrapper: see `python -m abliterate analyze --help`."""
import sys

from abliterate.commands.analyze import main

if __name__ == "__main__":
    sys.exit(main())
