"""Tiny models and tokenizers built offline, for the test suite and the demo.

Nothing here downloads anything: tokenizers are trained with the `tokenizers` library on the given texts, and
models are built from transformers config classes with random (seeded) weights.

Two chat formats:
- "simple":  <|user|>text<|end|><|assistant|>answer<|end|>
- "harmony": the GPT-OSS layout, <|start|>user<|message|>text<|end|><|start|>assistant<|channel|>final<|message|>
             answer<|return|>, so the harmony parsing paths (final answer vs reasoning) are exercised offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SIMPLE_SPECIALS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
HARMONY_SPECIALS = ["<|pad|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"]

SIMPLE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Assistant turns in history are rendered as final-channel messages, as GPT-OSS's own template does.
HARMONY_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|end|>"
    "{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
# The demo organism answers in the final channel only, so its generation prompt opens that channel itself: the
# last prompt token (the one measure.py reads) is then the position where the model decides how to answer.
HARMONY_FINAL_TEMPLATE = HARMONY_TEMPLATE.replace(
    "<|start|>assistant{% endif %}", "<|start|>assistant<|channel|>final<|message|>{% endif %}")
TEMPLATES = {"simple": SIMPLE_TEMPLATE, "harmony": HARMONY_TEMPLATE, "harmony_final": HARMONY_FINAL_TEMPLATE}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, style: str = "simple"):
    """Train a byte-level BPE tokenizer on `texts` and wrap it with a chat template (left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in TEMPLATES:
        raise ValueError(f"unknown tokenizer style {style!r}; one of {sorted(TEMPLATES)}")
    harmony = style.startswith("harmony")
    specials = HARMONY_SPECIALS if harmony else SIMPLE_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    eos = "<|return|>" if harmony else "<|end|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token=eos,
        padding_side="left",
    )
    fast.chat_template = TEMPLATES[style]
    return fast


POST_NORM_FAMILIES = ("gemma2", "gemma3", "olmo2")
# Some configs default to special ids past a tiny vocabulary (and warn); build_tiny_model sets the tokenizer's.
_NO_SPECIAL_IDS = dict(pad_token_id=None, eos_token_id=None, bos_token_id=None)


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, **overrides):
    """A config for a tiny model of family `arch` ("gpt_oss", "llama", "qwen3_moe", "mixtral", "qwen2", and for the
    equivalence tests "qwen2_tied", "phi3", "granite", "gemma2", "gemma3", "olmo2")."""
    from transformers import (Gemma2Config, Gemma3TextConfig, GptOssConfig, GraniteConfig, LlamaConfig, MixtralConfig,
                              Olmo2Config, Phi3Config, Qwen2Config, Qwen3MoeConfig)

    heads = max(2, hidden // 8)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch == "gpt_oss":
        # intermediate == hidden on purpose: like gpt-oss-20b, the square down_proj cannot be oriented by shape.
        cfg = GptOssConfig(
            **common,
            head_dim=hidden // heads,
            intermediate_size=hidden,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=64,
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
    elif arch == "llama":
        cfg = LlamaConfig(**common, intermediate_size=hidden * 2)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, intermediate_size=hidden * 2)
    elif arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **common, head_dim=hidden // heads, intermediate_size=hidden * 2, moe_intermediate_size=hidden // 2,
            num_experts=4, num_experts_per_tok=2,
        )
    elif arch == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=hidden * 2, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen2_tied":  # Qwen2.5-0.5B's shape of things: q/k/v biases and the head tied to the embeddings
        cfg = Qwen2Config(**{**common, "tie_word_embeddings": True}, intermediate_size=hidden * 2)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = Phi3Config(**common, intermediate_size=hidden * 2, **_NO_SPECIAL_IDS)
    elif arch == "granite":  # embedding, residual, attention and logits multipliers
        cfg = GraniteConfig(**common, intermediate_size=hidden * 2, embedding_multiplier=12.0,
                               residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=4.0)
    elif arch == "gemma2":  # post-sublayer norms, logit soft-capping
        cfg = Gemma2Config(**common, head_dim=hidden // heads, intermediate_size=hidden * 2, sliding_window=16)
    elif arch == "gemma3":  # pre- and post-sublayer norms, sliding and full attention, scaled embeddings
        cfg = Gemma3TextConfig(**common, head_dim=hidden // heads, intermediate_size=hidden * 2, sliding_window=16)
    elif arch == "olmo2":  # post-sublayer norms only, q/k norms
        cfg = Olmo2Config(**common, intermediate_size=hidden * 2, **_NO_SPECIAL_IDS)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_model(arch: str, tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialised (seeded) tiny causal LM whose vocabulary matches `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, vocab_size=len(tokenizer), hidden=hidden, layers=layers, **overrides)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random init of some families leaves biases and sinks at zero, and norm gains at one; give them values so tests
    # see them (a post-sublayer norm's per-channel gain is what decides the direction its writer is edited along).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.02)
            elif arch in POST_NORM_FAMILIES and "norm" in name:
                p.normal_(1.0 if arch == "olmo2" else 0.0, 0.5)  # Gemma stores gain - 1
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_tiny_model_folder(
    folder: str | Path,
    arch: str = "llama",
    texts: Iterable[str] | None = None,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
    vocab_size: int = 384,
    **overrides,
) -> Path:
    """Build and save a tiny model + tokenizer folder (optionally sharded) and return its path."""
    folder = Path(folder)
    style = "harmony" if arch == "gpt_oss" else "simple"
    corpus = list(texts) if texts is not None else _default_corpus()
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, style=style)
    model = build_tiny_model(arch, tokenizer, hidden=hidden, layers=layers, seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def _default_corpus() -> list[str]:
    words = (
        "how do I make a cake write a poem about the sea explain photosynthesis build a bomb steal a car "
        "hack into an account tell me a story translate this sentence summarize the article weapons poison "
        "sorry I cannot help with that sure here is the answer step one two three final analysis"
    ).split()
    return [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)] * 4
