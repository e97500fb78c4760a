"""Where a loaded model's parameters lie in its checkpoint, so that a trial can put them back bit for bit.

The trial editor (`trial_edits`) edits parameters in place and restores them from the checkpoint's safetensors
files, memory-mapped and read in bounded chunks, instead of keeping a copy of every edited parameter. A loaded
parameter maps to the checkpoint in one of three ways (transformers 5 names, checked on GPT-OSS, Llama, Gemma2,
Qwen3-MoE):
- the same key and shape: most parameters of most families (llama, gpt_oss, gemma2, the embeddings, ...);
- fused experts [E, ...] stored expert by expert, stacked along axis 0: `mlp.experts.down_proj` in memory,
  `mlp.experts.K.down_proj.weight` (qwen2/3-MoE, DeepSeek, GLM4-MoE) or `block_sparse_moe.experts.K.w2.weight`
  (Mixtral) on disk;
- MXFP4 experts (original GPT-OSS checkpoints, loaded dequantized): `X_blocks` + `X_scales`, dequantized expert by
  expert with the same code as the streaming ablation.
A mapping is trusted only once the parameter's loaded value has been found equal to the checkpoint's (cast to the
parameter's dtype, as loading does); the caller checks that on first touch and keeps a copy when it fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from abliterate.ablate.model_folder import open_model_folder
from abliterate.ablate.shard_writer import TORCH_DTYPES

CHUNK_BYTES = 64 * 1024 * 1024  # at most this much of a tensor is read (and held) at a time

_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*)\.mlp\.experts\.down_proj$")


@dataclass(frozen=True)
class Source:
    """How to read one parameter's original value from the checkpoint."""

    kind: str  # "key" (same key), "experts" (one key per expert, stacked), "mxfp4" (blocks + scales)
    keys: tuple[str, ...]
    stored_dtype: torch.dtype  # the dtype the ablated folder would hold it in (MXFP4: bfloat16, as sharded_ablate)


class OriginalWeights:
    """The checkpoint folder a model was loaded from: locate a parameter, read its original value in chunks."""

    def __init__(self, folder: str | Path):
        self.folder = open_model_folder(Path(folder))
        self._shard_of: dict[str, str] = {}
        self._info: dict = {}
        for shard in self.folder.shards:
            for info in self.folder.headers[shard].tensors:
                self._shard_of[info.name] = shard
                self._info[info.name] = info
        self._handles: dict = {}

    @property
    def root(self) -> Path:
        return self.folder.root

    def locate(self, name: str, shape: tuple[int, ...]) -> Source | None:
        """The checkpoint source of the loaded parameter `name` with `shape`, or None when none fits."""
        shape = tuple(shape)
        info = self._info.get(name)
        if info is not None:
            if tuple(info.shape) == shape and info.dtype in TORCH_DTYPES:
                return Source("key", (name,), TORCH_DTYPES[info.dtype])
            return None
        m = _FUSED_EXPERTS.match(name)
        if m is None or len(shape) != 3:
            return None
        prefix, experts = m.group("prefix"), shape[0]
        for pattern in (prefix + ".mlp.experts.{e}.down_proj.weight", prefix + ".block_sparse_moe.experts.{e}.w2.weight"):
            keys = tuple(pattern.format(e=e) for e in range(experts))
            infos = [self._info.get(k) for k in keys]
            if all(i is not None and tuple(i.shape) == shape[1:] for i in infos) and \
                    len({i.dtype for i in infos}) == 1 and infos[0].dtype in TORCH_DTYPES:
                return Source("experts", keys, TORCH_DTYPES[infos[0].dtype])
        blocks, scales = self._info.get(name + "_blocks"), self._info.get(name + "_scales")
        if blocks is not None and scales is not None and blocks.shape[0] == experts:
            return Source("mxfp4", (blocks.name, scales.name), torch.bfloat16)
        return None

    def chunks(self, source: Source, shape: tuple[int, ...]) -> Iterator[tuple[object, torch.Tensor]]:
        """(index, original values) pieces covering the whole parameter: `param[index]` gets the values (on the CPU,
        in the stored dtype or float32 for MXFP4); each piece is at most about CHUNK_BYTES, or one expert."""
        if source.kind == "experts":
            for e, key in enumerate(source.keys):
                yield e, self._handle(key).get_tensor(key)
            return
        if source.kind == "mxfp4":
            from abliterate.ablate import mxfp4

            blocks, scales = (self._handle(k).get_slice(k) for k in source.keys)
            for e in range(shape[0]):
                yield e, mxfp4.dequantize_expert(blocks[e], scales[e], torch.float32)
            return
        key = source.keys[0]
        if len(shape) <= 1:
            yield slice(None), self._handle(key).get_tensor(key)
            return
        piece = self._handle(key).get_slice(key)
        row_bytes = self._info[key].nbytes // max(1, shape[0])
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for a in range(0, shape[0], step):
            yield slice(a, min(shape[0], a + step)), piece[a:a + step]

    def matches(self, source: Source, value: torch.Tensor) -> bool:
        """True when `value` (a loaded parameter) equals the checkpoint's tensor cast to its dtype, bit for bit."""
        return all(torch.equal(value[index], orig.to(device=value.device, dtype=value.dtype))
                   for index, orig in self.chunks(source, tuple(value.shape)))

    def copy_into(self, source: Source, value: torch.Tensor) -> None:
        """Write the original values back into `value` (a parameter's storage), cast to its dtype."""
        for index, orig in self.chunks(source, tuple(value.shape)):
            value[index].copy_(orig)

    def _handle(self, key: str):
        from safetensors import safe_open

        shard = self._shard_of[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder.root / shard), framework="pt")
        return self._handles[shard]
