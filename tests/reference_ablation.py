"""An in-memory reference abliteration of a whole state dict (simple, non-streaming; tests compare against it).

Classifies every on-disk key with `architectures.classify` and edits it with `edits.edit_tensor`. The streaming
rewriter (ablate.job) must produce the same tensors; this module is the plain statement of what they should be.
"""

from __future__ import annotations

import torch

from abliterate.ablate.architectures import ROLE_GROUPS, TensorRole, classify
from abliterate.ablate.edits import edit_tensor, through_norm


def plan_edits(
    state_dict: dict[str, torch.Tensor],
    model_type: str,
    hidden_size: int,
    layers: set[int] | None,
    roles: set[str],
    embeddings: bool = False,
) -> dict[str, TensorRole]:
    """key -> role for every tensor that would be edited (decoder layers in `layers`, None = all)."""
    unknown = set(roles) - set(ROLE_GROUPS)
    if unknown:
        raise ValueError(f"unknown role group(s) {sorted(unknown)}; known: {list(ROLE_GROUPS)}")
    chosen: dict[str, TensorRole] = {}
    for key, tensor in state_dict.items():
        role = classify(key, tuple(tensor.shape), model_type, hidden_size)
        if role is None or role.group not in roles:
            continue
        if role.layer is None:
            if embeddings:
                chosen[key] = role
        elif layers is None or role.layer in layers:
            chosen[key] = role
    return chosen


def ablate_state_dict(
    state_dict: dict[str, torch.Tensor],
    model_type: str,
    hidden_size: int,
    directions: dict[int, torch.Tensor],
    scales: dict[int, float],
    roles: set[str],
    method: str = "conventional",
    embeddings_r: torch.Tensor | None = None,
    embeddings_scale: float = 1.0,
    role_scales: dict[int, dict[str, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """A new state dict (on-disk keys) with every classified tensor of the planned layers edited.

    directions: decoder layer -> unit r (float64 or float32), or a direction set [k, H] with orthonormal rows
    (removed at once: v <- v - s U^T (U v)); scales: decoder layer -> s (missing = 1.0).
    roles: the enabled ROLE_GROUPS; the embedding table is edited along `embeddings_r` only when "embeddings"
    is in roles and embeddings_r is given. role_scales: decoder layer -> {group: multiplier} (a plan entry's
    `scales`): a tensor's s is multiplied by the entry for its writer's group (a bias takes the group of the writer
    it belongs to, TensorRole.scale_group). Writers followed by a post-sublayer norm are edited along
    unit(gain * r) (see architectures module notes). MXFP4 blocks are refused: dequantize them first.
    Raises ValueError when a planned layer gets no edited tensor.
    """
    want_embeddings = "embeddings" in roles and embeddings_r is not None
    chosen = plan_edits(state_dict, model_type, hidden_size, set(directions), roles, want_embeddings)
    edited_layers = {role.layer for role in chosen.values()}
    missing = sorted(set(directions) - edited_layers)
    if missing:
        raise ValueError(f"no tensor to edit for layer(s) {missing} with roles {sorted(roles)} ({model_type})")
    out = dict(state_dict)
    for key, role in chosen.items():
        if role.layer is None:
            r, s = embeddings_r, embeddings_scale
        else:
            r, s = directions[role.layer], scales.get(role.layer, 1.0)
            s *= (role_scales or {}).get(role.layer, {}).get(role.scale_group, 1.0)
        if role.post_norm is not None:
            if role.post_norm not in state_dict:
                raise ValueError(f"{key}: its post-sublayer norm {role.post_norm} is not in the state dict")
            r = through_norm(r, state_dict[role.post_norm], role.post_norm_offset)
        out[key] = edit_tensor(state_dict[key], role, r, s, method)
    return out


def _remove_span(out: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """out - s U^T (U out) in float32 (u: one direction [H] or a set [k, H])."""
    x = out.float()
    uu = u.to(device=x.device, dtype=torch.float32)
    uu = uu.unsqueeze(0) if uu.dim() == 1 else uu
    return (x - s * (x @ uu.T) @ uu).to(out.dtype)


def add_removal_hooks(model, directions: dict, scales: dict, emb=None, emb_scale: float = 1.0) -> list:
    """Inference-time ablation, the property the weight edits must reproduce: the span of each layer's direction
    (set) removed, scaled, from every writer's output (embedding, attention output with its bias, the whole MLP
    or MoE block) while the model runs. Returns the hook handles."""

    def hook_for(u, s):
        def hook(mod, inp, out):
            if isinstance(out, tuple):
                return (_remove_span(out[0], u, s),) + tuple(out[1:])
            return _remove_span(out, u, s)

        return hook

    handles = []
    if emb is not None:
        handles.append(model.model.embed_tokens.register_forward_hook(hook_for(emb, emb_scale)))
    offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0  # Gemma's norms multiply by 1 + weight
    for i, layer in enumerate(model.model.layers):
        if i in directions:
            for writer, norm in _writers(layer):
                u = directions[i] if norm is None else _through_gain(directions[i], norm.weight, offset)
                handles.append(writer.register_forward_hook(hook_for(u, scales.get(i, 1.0))))
    return handles


def _writers(layer) -> tuple:
    """(writer, the RMSNorm between it and the residual or None): the attention output projection and the MLP. In
    post-norm families (Gemma2/3, OLMo2) post_attention_layernorm and post_feedforward_layernorm follow them (in
    Llama-like families post_attention_layernorm is the MLP's input norm instead)."""
    if hasattr(layer, "post_feedforward_layernorm"):
        return (layer.self_attn.o_proj, layer.post_attention_layernorm), (layer.mlp, layer.post_feedforward_layernorm)
    return (layer.self_attn.o_proj, None), (layer.mlp, None)


def _through_gain(u: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.Tensor:
    """The span a writer followed by an RMSNorm with gain g must lose so that the norm's output loses span(u):
    span(g * u_i), orthonormalised in float64 (one direction: unit(g * u)). Written here from the definition,
    independently of the package's own helper. Removing it is not a hook on the norm's output removing u: the norm
    rescales what is left, so only the component along u is guaranteed gone (test_equivalence checks both)."""
    g = weight.detach().double() + offset
    rows = (u.double().reshape(-1, g.numel()) * g)
    q, _ = torch.linalg.qr(rows.T)
    return q.T[0] if u.dim() == 1 else q.T


def residual_states(model, ids) -> list[torch.Tensor]:
    """Embedding output and every decoder layer's output (all positions, float64), via hooks: the residual states
    the edits must leave without the removed direction."""
    states: list[torch.Tensor] = []

    def hook(mod, inp, out):
        states.append((out[0] if isinstance(out, tuple) else out).detach().double())

    handles = [model.model.embed_tokens.register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return states
