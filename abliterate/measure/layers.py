"""Find the decoder-layer stack of a causal LM (and the module that runs it), whatever its architecture.

Generic, not per-model: the ModuleList whose length is the text config's num_hidden_layers, named like a layer
stack, outside any vision/audio tower (abliterate.naming.NOT_LANGUAGE lists the words that mark those) and outside
stacks that are not the decoder (multi-token-prediction heads, encoders).
"""

from __future__ import annotations

import torch

from abliterate.cli import UserError
from abliterate.naming import outside_language_model

# Stacks of the right length that are still not the decoder: multi-token-prediction heads, encoder stacks.
_NOT_DECODER = ("mtp", "encoder")


def text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def find_decoder_layers(model):
    """(text_model, layers): the decoder-layer ModuleList of a causal LM and the module that owns and runs it.

    Found generically: the ModuleList whose length is the text config's num_hidden_layers, preferring the
    usual names (model.layers, model.language_model.layers, transformer.h, ...) and skipping vision/audio towers.
    """
    n = getattr(text_config(model), "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("layers", "h", "blocks", "layer"):
            continue
        if outside_language_model(name) or any(w in part for part in name.split(".") for w in _NOT_DECODER):
            continue
        if n is not None and len(module) != n:
            continue
        found.append(name)
    if not found:
        raise UserError(
            f"cannot find the decoder layers of this {type(model).__name__} (no ModuleList of {n} layers named "
            "layers/h/blocks); this architecture is not supported yet"
        )
    name = min(found, key=lambda s: (s.count("."), s))  # the outermost text stack
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner, model.get_submodule(name)


FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def find_final_norm(text_model):
    """The text model's final norm (what the head reads comes out of it), or None when it has none by a usual name."""
    for name in FINAL_NORM_NAMES:
        module = getattr(text_model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None
