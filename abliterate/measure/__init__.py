"""Stage 1, measure: the hooked forward pass (runner, with layers, hooks, statistics and the shared-prefix KV
cache), the measurement file it writes (measurement_file) and the peer tool's .pt files (peer_pt)."""
