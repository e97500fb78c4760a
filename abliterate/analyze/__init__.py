"""Stage 2, analyze: per-index metrics of a measurement file, the suggestion rule, the terminal table and JSON
(report), the PNG chart, and the suggested plan's YAML text (suggested_plan)."""
