"""Prompt sets: user files (.txt/.json/.jsonl/.csv/.parquet) and hub datasets (files), the bundled harmful and
harmless sets with their fixed train/test split (bundled)."""
