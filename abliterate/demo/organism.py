"""The demo's model organism: a tiny GPT-OSS chat model that learns to refuse harmful requests, trained on CPU.

Real chat models learn refusal after instruction tuning. The organism is trained the same way, in two phases on
the TRAIN split of the bundled prompts (the test split stays held out for evaluation):
  1. instruction tuning: every prompt, harmful or not, gets a helpful answer that echoes its topic;
  2. refusal tuning: harmful prompts get a refusal, harmless prompts keep getting helpful answers.
The loss is on the assistant's tokens only. For gpt_oss the chat template's generation prompt opens the harmony
final channel (`<|start|>assistant<|channel|>final<|message|>`, then the answer and `<|return|>`), so the GPT-OSS
parsing path is the real one and the last prompt token, where measure.py reads the residual stream, is the
position where the model decides between answering and refusing.

Training is deterministic: seeded, deterministic algorithms, a fixed thread count. The result is saved as a
normal sharded model folder (with an index), tokenizer and chat template, plus `organism.json` recording the
configuration and a fingerprint of configuration + training data + recipe version, so a later run can tell
whether a folder is the model it would train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Iterator, Sequence

from abliterate.demo.organism_text import helpful_answer, refusal

# Bump when the training recipe changes in a way the config does not show; it invalidates reused models.
RECIPE_VERSION = 3
RECORD_NAME = "organism.json"


@dataclasses.dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines the trained model (with the prompts and RECIPE_VERSION)."""

    arch: str = "gpt_oss"          # gpt_oss (MoE, router, sinks, harmony format) or llama (dense)
    hidden: int = 64
    layers: int = 4
    experts: int = 4               # gpt_oss only; 2 active per token
    vocab_size: int = 1024
    instruct_steps: int = 150      # phase 1: helpful answers to every prompt
    refusal_steps: int = 600       # phase 2: refuse harmful, stay helpful on harmless
    batch_size: int = 32
    lr: float = 3e-3
    refusal_lr: float = 3e-3        # peak learning rate of phase 2
    refusal_anchor: float = 0.0     # phase 2 penalty on squared distance from the phase-1 weights
    harmless_share: float = 0.65    # phase 2: share of harmless prompts per batch (the rest are harmful)
    decision_weight: float = 10.0   # loss weight of the first answer token (answer or refuse), see _answer_loss
    seed: int = 0
    threads: int = 2               # fixed so that results do not depend on the machine's core count
    max_shard_size: str = "400KB"  # small on purpose: the demo exercises sharded checkpoints

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEMO = OrganismConfig()
QUICK = OrganismConfig(hidden=48, layers=3, instruct_steps=60, refusal_steps=300)


# The organism learns from the bundled sets as they were when it was first shipped: the train split of their
# first lines. Prompts appended to the sets since (issue 19: direct, imperative requests and tasks) reach measure,
# search and evaluate but not the organism's training, so the shipped organism keeps its fingerprint and the demo
# its model; retraining on the grown sets would change every figure the demo prints. New prompts are appended,
# never inserted, so these prefixes stay fixed (tests/test_demo_shipped.py checks the shipped fingerprint).
ORGANISM_SET_LINES = {"harmful": 476, "harmless": 474}


def organism_prompts() -> tuple[list[str], list[str]]:
    """The organism's training prompts: (harmful, harmless), the train split of each set's first lines."""
    from abliterate.prompts.bundled import bundled_records, split_of

    harmful, harmless = ([r["text"] for r in bundled_records(kind)[:ORGANISM_SET_LINES[kind]]
                          if split_of(r["text"]) == "train"] for kind in ("harmful", "harmless"))
    return harmful, harmless


def fingerprint(config: OrganismConfig, harmful: Sequence[str], harmless: Sequence[str]) -> str:
    """SHA-256 of the recipe version, the configuration and the training prompts."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": RECIPE_VERSION, "config": config.to_dict()}, sort_keys=True).encode())
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        h.update(f"\n#{kind}:{len(prompts)}\n".encode())
        for p in prompts:
            h.update(p.encode("utf-8") + b"\x00")
    return h.hexdigest()


def is_current(folder: str | os.PathLike, config: OrganismConfig, harmful: Sequence[str],
               harmless: Sequence[str]) -> bool:
    """True when `folder` holds a complete organism trained with exactly this config and these prompts."""
    folder = Path(folder)
    record = folder / RECORD_NAME
    if not record.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return saved.get("fingerprint") == fingerprint(config, harmful, harmless)


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count for the block; the caller's settings are restored."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _answer_suffix(tokenizer, answer: str) -> str:
    """The assistant's part of the conversation after the generation prompt, end token included."""
    # The gpt_oss organism's generation prompt already opens the final channel (tiny.HARMONY_FINAL_TEMPLATE).
    return f"{answer}{tokenizer.eos_token}"


def _prompt_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def _tokenizer_corpus(harmful: Sequence[str], harmless: Sequence[str], arch: str) -> list[str]:
    """Rendered conversations with helpful answers and refusals, so template words become single tokens."""
    rng = random.Random(1234)
    style_open = "<|start|>user<|message|>" if arch == "gpt_oss" else "<|user|>"
    texts = []
    for p in list(harmful) + list(harmless):
        texts.append(f"{style_open}{p}<|end|><|start|>assistant<|channel|>final<|message|>"
                     f"{helpful_answer(p, rng)}<|return|>")
        texts.append(refusal(p, rng))
    return texts


class _Batcher:
    """Samples training batches for one phase: (prompt, answer) pairs with answers drawn afresh each time."""

    def __init__(self, tokenizer, harmful: Sequence[str], harmless: Sequence[str], refuse: bool,
                 rng: random.Random, harmless_share: float = 0.5):
        self.tokenizer, self.rng = tokenizer, rng
        # Each item: (prompt ids, prompt text, answer kind): harmful prompts get a refusal in phase 2 and a
        # helpful answer in phase 1; harmless prompts always get a helpful answer.
        self.harmful = [(self._ids(_prompt_text(tokenizer, p)), p, "refuse" if refuse else "help") for p in harmful]
        self.harmless = [(self._ids(_prompt_text(tokenizer, p)), p, "help") for p in harmless]
        self.harmless_share = harmless_share

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch(self, size: int):
        import torch

        picks = []
        for _ in range(size):
            pool = self.harmless if self.rng.random() < self.harmless_share else self.harmful
            picks.append(pool[self.rng.randrange(len(pool))])
        answers = [
            _answer_suffix(self.tokenizer,
                           refusal(p, self.rng) if kind == "refuse"
                           else helpful_answer(p, self.rng))
            for _, p, kind in picks
        ]
        answer_ids = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
        rows = [(prompt + ans, len(prompt)) for (prompt, _, _), ans in zip(picks, answer_ids)]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((size, width), pad, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        # Right padding: positions start at 0 as in an unpadded prompt; padded and prompt tokens carry no loss.
        for i, (ids, n_prompt) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[i, : len(ids)] = 1
        return input_ids, mask, labels


def _lr_at(step: int, total: int, peak: float, warmup: int = 20) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _answer_loss(logits, labels, decision_weight: float):
    """Mean next-token cross-entropy over answer tokens, the first answer token weighted `decision_weight`.

    The first answer token is where the model commits to answering or refusing; everything after it follows
    from that choice. Weighting it makes a tiny model learn the decision in a few hundred steps instead of
    spending them on the wording of the answers."""
    import torch

    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    answer = targets != -100
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="none").view_as(targets)
    # The first answer position of each row: an answer token whose predecessor is not one.
    first = answer & ~torch.nn.functional.pad(answer[:, :-1], (1, 0), value=False)
    weights = answer.float() + (decision_weight - 1.0) * first.float()
    return (ce * weights).sum() / weights.sum()


def _train_phase(model, batcher: _Batcher, steps: int, lr: float, config: OrganismConfig, desc: str,
                 progress: bool, anchor=None) -> float:
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        input_ids, mask, labels = batcher.batch(config.batch_size)
        loss = _answer_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels, config.decision_weight)
        if anchor is not None:
            loss = loss + anchor[0] * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), anchor[1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def build_organism(config: OrganismConfig, harmful: Sequence[str], harmless: Sequence[str],
                   progress: bool = True):
    """Train the organism in memory and return (model, tokenizer, final losses per phase)."""
    import torch

    from abliterate.demo.tiny_models import build_tiny_model, build_tokenizer

    if config.arch not in ("gpt_oss", "llama"):
        raise ValueError(f"organism arch must be gpt_oss or llama, got {config.arch!r}")
    if not harmful or not harmless:
        raise ValueError("the organism needs both harmful and harmless training prompts")
    style = "harmony_final" if config.arch == "gpt_oss" else "simple"
    with _deterministic(config.threads):
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        tokenizer = build_tokenizer(_tokenizer_corpus(harmful, harmless, config.arch),
                                    vocab_size=config.vocab_size, style=style)
        overrides = {}
        if config.arch == "gpt_oss":
            # Longer than any training conversation, so sliding-window layers see the whole prompt.
            overrides = dict(num_local_experts=config.experts, sliding_window=256)
        model = build_tiny_model(config.arch, tokenizer, hidden=config.hidden, layers=config.layers,
                                 seed=config.seed, **overrides)
        rng = random.Random(config.seed)
        instruct = _Batcher(tokenizer, harmful, harmless, refuse=False, rng=rng)
        loss1 = _train_phase(model, instruct, config.instruct_steps, config.lr, config, "organism 1/2 instruct", progress)
        refuse = _Batcher(tokenizer, harmful, harmless, refuse=True, rng=rng,
                          harmless_share=config.harmless_share)
        anchor = None
        if config.refusal_anchor > 0:
            anchor = (config.refusal_anchor, [p.detach().clone() for p in model.parameters()])
        loss2 = _train_phase(model, refuse, config.refusal_steps, config.refusal_lr, config,
                             "organism 2/2 refusal", progress, anchor=anchor)
    return model, tokenizer, {"instruct": loss1, "refusal": loss2}


def save_organism(folder: str | os.PathLike, model, tokenizer, config: OrganismConfig, harmful: Sequence[str],
                  harmless: Sequence[str], losses: dict) -> Path:
    """Write the model folder atomically: built beside `folder` under a temporary name, then renamed."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, max_shard_size=config.max_shard_size)
    tokenizer.save_pretrained(tmp)
    record = {
        "what": "abliterate demo model organism (tiny chat model trained to refuse harmful requests)",
        "fingerprint": fingerprint(config, harmful, harmless),
        "recipe_version": RECIPE_VERSION,
        "config": config.to_dict(),
        "train_prompts": {"harmful": len(harmful), "harmless": len(harmless)},
        "final_loss": losses,
    }
    (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def train_organism(folder: str | os.PathLike, config: OrganismConfig, harmful: Sequence[str],
                   harmless: Sequence[str], progress: bool = True) -> Path:
    """Train and save the organism into `folder` (replacing what is there)."""
    model, tokenizer, losses = build_organism(config, harmful, harmless, progress=progress)
    return save_organism(folder, model, tokenizer, config, harmful, harmless, losses)
