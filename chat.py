#!/usr/bin/env python3
"""Thin wrapper: see `python -m abliterate chat --help`."""
import sys

from abliterate.commands.chat import main

if __name__ == "__main__":
    sys.exit(main())
