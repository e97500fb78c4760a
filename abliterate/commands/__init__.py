"""One thin module per command: parse arguments, call the workflow modules, print a summary.

Each exposes `main(argv=None) -> int` returning the exit code (0 ok, 2 bad input, 1 internal failure).
"""
