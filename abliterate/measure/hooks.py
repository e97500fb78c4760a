"""Forward hooks that keep the residual stream at each row's last P prompt tokens, for every measurement index.

A pre-hook on decoder layer 0 takes its input (the embedding output, index 0) and a forward hook on every decoder
layer takes its output (index k+1 for layer k); each keeps only the last `positions` positions of each row (the
chat template's tokens after the user message), so nothing else of the [B, T, H] activations outlives the batch.
Left-padded batches end every row at the last column; right-padded ones (the shared-prefix cache) say where each
row ends in `rows`.
"""

from __future__ import annotations

import torch

class LastTokenHooks:
    """Context manager: while active, each forward pass fills `self.slices` (L+1 tensors [B, H], on device)."""

    def __init__(self, layers, positions: int = 1, final_norm=None):
        self.layers = layers
        self.positions = positions
        # The text model's final norm: its output (what the head reads) is kept too, as the "index L+1" of a
        # measurement file (measurement_file: harmful_final_norm); the peer takes its last index there.
        self.final_norm = final_norm
        self.final: torch.Tensor | None = None  # [B, P, H] of the running batch
        self.last_final: torch.Tensor | None = None  # CPU float64 [B, P, H] of the last collected batch
        self.slices: list[torch.Tensor | None] = [None] * (len(layers) + 1)
        self.rows: torch.Tensor | None = None  # each row's last-token position (right padding); None: the last
        self._handles = []

    def _keep(self, index: int, hidden: torch.Tensor) -> None:
        self.slices[index] = self._last_positions(hidden)

    def _last_positions(self, hidden: torch.Tensor) -> torch.Tensor:
        p = self.positions
        if self.rows is None:
            # clone: a view would keep the whole [B, T, H] activation alive until the next batch
            return hidden[:, -p:, :].detach().clone()
        rows = self.rows.to(hidden.device)  # layers may sit on different devices (device_map)
        cols = rows.unsqueeze(1) + torch.arange(1 - p, 1, device=hidden.device)  # [B, P]: ..., last - 1, last
        return hidden[torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1), cols].detach()

    def __enter__(self):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            self._keep(0, hidden)

        self._handles.append(self.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for k, layer in enumerate(self.layers):
            def hook(module, args, output, index=k + 1):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                self._keep(index, hidden)

            self._handles.append(layer.register_forward_hook(hook))
        if self.final_norm is not None:
            def final_hook(module, args, output):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                self.final = self._last_positions(hidden)

            self._handles.append(self.final_norm.register_forward_hook(final_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def collect(self) -> torch.Tensor:
        """The last batch's activations as one CPU float64 tensor [L+1, B, P, H] (P: positions -P..-1 in order);
        clears the slots."""
        if any(s is None for s in self.slices):
            missing = [i for i, s in enumerate(self.slices) if s is None]
            raise RuntimeError(f"hooks did not fire for measurement indices {missing}")
        out = torch.stack([s.to("cpu", torch.float64) for s in self.slices])
        self.slices = [None] * len(self.slices)
        self.last_final = None if self.final is None else self.final.to("cpu", torch.float64)
        self.final = None
        return out
