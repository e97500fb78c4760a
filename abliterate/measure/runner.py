"""Capture the residual stream at the last prompt tokens, layer by layer, with forward hooks.

One forward pass per batch through the decoder stack (no `generate`, no language-model head, no
`output_hidden_states` tuple; the only KV cache is that of the chat-template prefix all prompts share, run once,
see prefix_cache): a pre-hook on decoder layer 0 takes its input (the embedding output, index 0) and a
forward hook on every decoder layer takes its output (index k+1 for layer k). Each hook keeps only the last P
positions of each row (`CaptureOptions.positions`, the chat template's tokens after the user message; see
abliterate.measure.positions): the batch's last P columns when prompts are left-padded, each row's own last P
tokens when the shared-prefix cache runs them right-padded. The shared prefix is cut short enough that every
prompt keeps at least P tokens of its own in the batch, so the P positions are always real tokens. The last index
is therefore the last layer's output *before* the final norm (see measurements.LAYER_CONVENTION).

Statistics, per class (harmful / harmless):
  - float64 running sums of the activations (exact means, whatever the batch order),
  - float64 running sums of squared norms,
  - a per-prompt buffer of the activations, float32 on CPU, [P, L+1, N, H]: each prompt's projection on its
    index's final unit direction needs the direction, which is known only after both classes are done, and the
    file keeps the buffer in a compact dtype (--keep-activations). The buffer is the one thing that grows with the
    number of prompts; --verbose prints its size (e.g. gpt-oss-20b, 5 positions x 25 indices x 2880 x 4 bytes =
    1.44 MB per prompt). Past SPILL_BYTES (both classes
    together) it lives in a memory-mapped temporary file instead of RAM, deleted when the run ends, so RAM use
    stays flat however many prompts are measured.
Prompts are sorted by token length (longest first, so a CUDA out-of-memory shows up on the first batch) to cut
padding; results are stored back in the caller's prompt order.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from abliterate.cli import UserError
from abliterate.prompting import input_device
from abliterate.measure.hooks import LastTokenHooks
from abliterate.measure.layers import find_decoder_layers, find_final_norm, text_config
from abliterate.measure.measurement_file import Measurements
from abliterate.measure.statistics import ClassStats, finish_measurements

SPILL_BYTES = 2 * 2**30  # per-prompt buffers larger than this (both classes) go to a memory-mapped temp file


@dataclass
class CaptureOptions:
    batch_size: int = 32
    clip: float | None = None
    projected: bool = False
    verbose: bool = False
    progress: bool = True
    prefix_cache: bool = True  # run the prompts' shared chat-template prefix once (abliterate.measure.prefix_cache)
    positions: int = 1  # the last P token positions captured (measure.positions.default_positions)
    keep_activations: str = "auto"  # dtype the file keeps the per-prompt activations in (statistics.KEEP_CHOICES)


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_type) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _memory_note() -> str:
    if torch.cuda.is_available():
        return f"cuda peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"cpu peak RSS {rss / 2**20:.2f} GiB"


class Runner:
    """Runs batches through the text model with the hooks attached; halves the batch on out-of-memory."""

    def __init__(self, model, pad_token_id: int, options: CaptureOptions):
        self.model = model
        self.text_model, self.layers = find_decoder_layers(model)
        self.pad_id = pad_token_id
        self.options = options
        self.batch_size = options.batch_size
        self.device = input_device(model)  # the embedding's (its hook's, when a device map offloads it)
        self.oom_said = False
        self.tokens_seen = 0
        self.padded_tokens = 0  # token positions run through the model, padding and the shared prefix included
        self.prefix = None  # a prefix_cache.SharedPrefix while it is in use
        self.prefix_checked = False
        self.final_norm = find_final_norm(self.text_model)
        self.final_sums: dict[str, torch.Tensor] = {}  # class -> float64 [P, H] sum of the final norm's outputs

    @property
    def num_indices(self) -> int:
        return len(self.layers) + 1

    def use_shared_prefix(self, token_ids: list[list[int]]) -> None:
        """Run the prefix every prompt shares once and continue it for each batch (see prefix_cache)."""
        from abliterate.measure import prefix_cache

        # every prompt keeps its last P tokens out of the cached prefix: they are the positions the hooks take
        n = min(prefix_cache.shared_prefix_length(token_ids), min(len(x) for x in token_ids) - self.options.positions)
        if n < prefix_cache.MIN_PREFIX:
            return
        try:
            self.prefix = prefix_cache.SharedPrefix(self.text_model, token_ids[0][:n], self.device)
        except Exception as exc:  # a model whose cache cannot be built this way: measure without it
            if _is_oom(exc):
                raise
            prefix_cache.note(f"the shared {n}-token prompt prefix could not be cached ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); measuring without it")
            return
        self.padded_tokens += n
        if self.options.verbose:
            print(f"shared prompt prefix: {n} tokens, run once and reused as a KV cache", file=sys.stderr)

    def _forward(self, hooks: LastTokenHooks, batch: list[list[int]]) -> torch.Tensor:
        if self.prefix is None:
            return self._forward_plain(hooks, batch)
        from abliterate.measure import prefix_cache

        n = self.prefix.length
        kwargs, last = self.prefix.inputs([x[n:] for x in batch], self.pad_id)
        hooks.rows = last.to(self.device)
        try:
            with torch.inference_mode():
                self.text_model(**kwargs)
        except Exception as exc:
            if _is_oom(exc) or self.prefix_checked:
                raise
            # The first batch tells whether this model takes a cache this way at all (custom code may not).
            hooks.slices, hooks.rows = [None] * len(hooks.slices), None
            prefix_cache.note(f"continuing the cached prompt prefix failed ({type(exc).__name__}); measuring "
                              "without it")
            self.prefix = None
            return self._forward_plain(hooks, batch)
        finally:
            hooks.rows = None
        acts = hooks.collect()
        final = hooks.last_final  # the check below runs two rows again: this batch's final-norm states stay
        self.tokens_seen += sum(len(x) for x in batch)
        self.padded_tokens += len(batch) * max(len(x) - n for x in batch)
        if not self.prefix_checked:
            # Two prompts of the first batch also run the plain way: the cached prefix must give the same
            # activations. (Two, not the batch: the plain pass of a whole batch would set the peak memory.)
            rows = min(len(batch), prefix_cache.CHECK_ROWS)
            plain = self._forward_plain(hooks, batch[:rows], count=False)
            ok, err = prefix_cache.agrees(acts[:, :rows], plain, self.text_model.dtype)
            self.prefix_checked = True
            if not ok:
                prefix_cache.note(f"with the shared prompt prefix cached, activations differ from the plain pass "
                                  f"(relative error {err:.1e}); measuring without the cache")
                self.prefix = None
                return self._forward_plain(hooks, batch, count=False)
            hooks.last_final = final
        return acts

    def _forward_plain(self, hooks: LastTokenHooks, batch: list[list[int]], count: bool = True) -> torch.Tensor:
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[r, width - len(x):] = 1
        # positions count real tokens only, as generate() does, so padding cannot shift them
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.inference_mode():
            self.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), use_cache=False)
        if count:
            self.tokens_seen += int(mask.sum())
            self.padded_tokens += ids.numel()
        return hooks.collect()

    def run(self, token_ids: list[list[int]], stats: ClassStats, desc: str) -> None:
        from tqdm import tqdm

        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        bar = tqdm(total=len(order), desc=desc, unit="prompt", file=sys.stderr, disable=not self.options.progress,
                   dynamic_ncols=True)
        start = 0
        with LastTokenHooks(self.layers, self.options.positions, self.final_norm) as hooks, bar:  # closing the bar first keeps an error on its own line
            while start < len(order):
                rows = order[start:start + self.batch_size]
                t0 = time.perf_counter()
                try:
                    acts = self._forward(hooks, [token_ids[i] for i in rows])
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    hooks.slices = [None] * len(hooks.slices)
                    _free_device_memory()
                    self._shrink()
                    continue
                _check_finite(acts, desc)
                stats.add(acts, rows)
                if hooks.last_final is not None:
                    total = hooks.last_final.sum(0)
                    self.final_sums[desc] = self.final_sums[desc] + total if desc in self.final_sums else total
                if self.options.verbose:
                    width = max(len(token_ids[i]) for i in rows)
                    tqdm.write(f"  {desc} batch [{len(rows)} x {width} tokens] -> acts {tuple(acts.shape)}, "
                               f"{(time.perf_counter() - t0) * 1000:.0f} ms, {_memory_note()}", file=sys.stderr)
                start += len(rows)
                bar.update(len(rows))

    def _shrink(self) -> None:
        if self.batch_size == 1:
            raise UserError("out of memory even at batch size 1; load the model smaller with --quant-measure 4bit "
                            "(or 8bit), a lower --dtype, --max-length, or spread it over more devices (--device-map)")
        self.batch_size = max(1, self.batch_size // 2)
        if not self.oom_said:
            print(f"note: out of memory; halving the batch size (now {self.batch_size}) and continuing",
                  file=sys.stderr)
            self.oom_said = True


def _check_finite(acts: torch.Tensor, desc: str) -> None:
    bad = ~torch.isfinite(acts).flatten(1).all(dim=1)
    if bad.any():
        k = int(bad.nonzero()[0])
        where = "the embedding output" if k == 0 else f"the output of decoder layer {k - 1}"
        raise UserError(
            f"NaN or inf activations at measurement index {k} ({where}) on {desc} prompts; the weights of that "
            "layer are broken or the dtype overflows: try --dtype float32 (or bfloat16 instead of float16)"
        )


def measure_directions(model, tokenizer, harmful_ids: list[list[int]], harmless_ids: list[list[int]],
                       options: CaptureOptions) -> tuple[Measurements, dict]:
    """Run both prompt classes and return the Measurements (metadata: capture facts only) and run info."""
    runner = Runner(model, tokenizer.pad_token_id, options)
    hidden = int(text_config(model).hidden_size)
    n_total = len(harmful_ids) + len(harmless_ids)
    p = options.positions
    shortest = min(len(x) for x in list(harmful_ids) + list(harmless_ids))
    if not 1 <= p <= shortest:
        raise UserError(f"--positions {p}: must be between 1 and the shortest rendered prompt's length ({shortest} "
                        "tokens)")
    buffer_bytes = 4 * p * runner.num_indices * n_total * hidden
    with contextlib.ExitStack() as stack:
        spill = None
        if buffer_bytes > SPILL_BYTES:
            spill = stack.enter_context(tempfile.TemporaryDirectory(prefix="abliterate-acts-"))
        where = f"memory-mapped in {spill} (deleted at the end)" if spill else "in RAM"
        if spill or options.verbose:
            print(f"per-prompt activation buffer: {p} positions x {runner.num_indices} indices x {n_total} prompts x "
                  f"{hidden} float32 "
                  f"= {buffer_bytes / 2**20:.1f} MiB, {where}", file=sys.stderr)
        if options.verbose:
            print(f"decoder layers: {len(runner.layers)} (run by {type(runner.text_model).__name__})",
                  file=sys.stderr)
        harmful = ClassStats(runner.num_indices, hidden, len(harmful_ids), options.clip,
                             os.path.join(spill, "harmful.f32") if spill else None, p)
        harmless = ClassStats(runner.num_indices, hidden, len(harmless_ids), options.clip,
                              os.path.join(spill, "harmless.f32") if spill else None, p)
        t0 = time.perf_counter()
        if options.prefix_cache:
            runner.use_shared_prefix(list(harmful_ids) + list(harmless_ids))
        runner.run(harmful_ids, harmful, "harmful")
        runner.run(harmless_ids, harmless, "harmless")
        seconds = time.perf_counter() - t0
        m = finish_measurements(harmful, harmless, options.projected, options.clip, options.keep_activations)
        if {"harmful", "harmless"} <= set(runner.final_sums):
            m.harmful_final_norm = runner.final_sums["harmful"] / len(harmful_ids)
            m.harmless_final_norm = runner.final_sums["harmless"] / len(harmless_ids)
        del harmful.buffer, harmless.buffer  # release the mapping before the folder goes
    m.metadata.update({"num_layers": len(runner.layers), "batch_size": options.batch_size})
    info = {
        "seconds": seconds,
        "final_batch_size": runner.batch_size,
        "tokens": runner.tokens_seen,
        "padded_tokens": runner.padded_tokens,
        "shared_prefix": runner.prefix.length if runner.prefix is not None else 0,
        "buffer_bytes": buffer_bytes,
    }
    return m, info
