"""Trial edits as forward hooks, for weights a trial cannot edit in place.

bitsandbytes 4/8-bit weights (`--quant`) are packed integers and GPT-OSS experts kept in MXFP4 on a GPU are packed
blocks (after loading, Triton tensors that are not even parameters): neither can take `edits.edit_tensor`. For
the conventional method the edit of such a module is linear in its output or input, so a hook gives exactly the
edited module's result without touching the weight:

- a writer W (output in hidden space) edited to W' = W - s u (u . W) and its bias b to b - s_b u (u . b):
  W'x + b' = y - u (s (u . y) + (s_b - s) (u . b)) with y = Wx + b, the module's own output;
- a reader G (router; input in hidden space) edited to G' = G - s (G r) r^T: G'x = G(x - s r (r . x)).

u is the plan's direction (through the post-sublayer norm's gain where the architecture has one, as
edits.through_norm gives it), computed in float32 on the output's device. A direction set U [k, H] (orthonormal
rows) is the same formula with u (u . y) read as U^T (U y): y - U^T (s (U y) + (s_b - s) (U b)). The norm-preserving method
rescales every weight column by its own norm, which no hook on the output can reproduce: a trial of that method
on a hooked module is refused with one line (the search then searches the conventional method only).

What the hook gives is the quantized model with each layer's output projected, not quantize(edited weights): the
folder sharded_ablate writes holds edited float weights, so the trial is as close to that folder as the quantized
model is to the float one. On float weights (`find_hook_sites(..., everything=True)`, the tests' check) the two
agree to float32 rounding.

MXFP4 experts: transformers' Mxfp4GptOssMLP calls its experts' `forward_routed` directly (and may swap in a hub
kernel's forward), so the hook sits on the MLP module (its output[0] is the experts' routed sum) rather than on
the experts. Every routed expert's bias is added after its routing weight, so there the bias can only follow its
writer's scale exactly; a plan that scales them apart is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abliterate.cli import UserError

QUANTIZED_WEIGHT_TYPES = ("Params4bit", "Int8Params")  # bitsandbytes' parameter classes


@dataclass
class HookSite:
    """One module whose edit is a hook: what it computes and which parameters the hook stands for."""

    module_name: str  # the module the hook is registered on
    where: str  # "output" (a writer's result is projected) or "input" (a reader's input is)
    weight_role: object  # architectures.TensorRole of the weight, on its dense shape
    bias_role: object = None  # the writer's bias the hook covers, else None
    bias_name: str | None = None
    routed_bias: bool = False  # the bias is added per routed expert (only its writer's scale can be exact)
    why: str = ""  # shown in messages: "bitsandbytes Params4bit weight", "MXFP4 experts kept quantized", ...
    owned: set = field(default_factory=set)  # parameter names never edited in place

    def describe(self) -> str:
        return f"{self.module_name} ({self.why})"


def is_quantized_weight(p) -> bool:
    return type(p).__name__ in QUANTIZED_WEIGHT_TYPES


def find_hook_sites(model, classify, everything: bool = False) -> list[HookSite]:
    """The modules of `model` whose edits must be hooks. `classify(name, shape)` is architectures.classify bound to
    the model. `everything`: also every float writer and router (not the embeddings: tied to the output head, their
    in-place edit changes the head too, which a hook would not): the check that hooks equal in-place edits."""
    sites: list[HookSite] = []
    params = dict(model.named_parameters())
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.startswith("Mxfp4") and kind.endswith("Experts"):
            sites.append(_mxfp4_experts_site(name, module, params, classify))
            continue
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and is_quantized_weight(weight):
            shape = (int(module.out_features), int(module.in_features))
            site = _linear_site(name, module, shape, classify, f"bitsandbytes {type(weight).__name__} weight")
            if site is not None:
                sites.append(site)
        elif everything:
            site = _float_site(name, module, classify)
            if site is not None:
                sites.append(site)
    return sites


def quantized_parameter_names(model) -> set[str]:
    """Names of every bitsandbytes-quantized parameter (edited through a hook or not edited at all)."""
    return {n for n, p in model.named_parameters() if is_quantized_weight(p)}


def _role(classify, key: str, shape: tuple[int, ...]):
    try:
        return classify(key, shape)
    except ValueError as exc:
        raise UserError(f"model parameter {key}: {exc}") from None


def _linear_site(name, module, shape, classify, why) -> HookSite | None:
    role = _role(classify, f"{name}.weight", shape)
    if role is None:
        return None
    if role.group == "embeddings":
        raise UserError(f"model parameter {name}.weight: quantized embeddings cannot be edited by a trial; "
                        "load the model without --quant")
    if role.kind not in ("writes", "reads"):
        raise UserError(f"model parameter {name}.weight holds {role.kind} weights a hook cannot edit")
    site = HookSite(name, "input" if role.kind == "reads" else "output", role, why=why, owned={f"{name}.weight"})
    bias = module._parameters.get("bias")
    if bias is not None and role.kind == "writes":
        bias_role = _role(classify, f"{name}.bias", tuple(bias.shape))
        if bias_role is not None:
            site.bias_role, site.bias_name = bias_role, f"{name}.bias"
            site.owned.add(site.bias_name)
    return site


def _float_site(name, module, classify) -> HookSite | None:
    """A float module with one edited writer or reader parameter of its own (nn.Linear, fused experts, a router)."""
    own = {n: p for n, p in module._parameters.items() if p is not None} if hasattr(module, "_parameters") else {}
    roles = {}
    for pname, p in own.items():
        role = _role(classify, f"{name}.{pname}", tuple(p.shape))
        if role is not None and role.group != "embeddings":
            roles[pname] = role
    weights = [(n, r) for n, r in roles.items() if r.kind in ("writes", "reads")]
    if len(weights) != 1:
        return None
    pname, role = weights[0]
    site = HookSite(name, "input" if role.kind == "reads" else "output", role, why="hooked on request",
                    owned={f"{name}.{pname}"})
    for bname, brole in roles.items():
        if brole.kind == "bias":
            site.bias_role, site.bias_name = brole, f"{name}.{bname}"
            site.routed_bias = own[bname].dim() == 2  # [E, H]: one bias per expert, added after routing
            site.owned.add(site.bias_name)
    return site


def _mxfp4_experts_site(name, module, params, classify) -> HookSite:
    E, inter, hidden = int(module.num_experts), int(module.intermediate_size), int(module.hidden_size)
    role = _role(classify, f"{name}.down_proj", (E, inter, hidden))  # the dequantized layout's role
    if role is None or role.kind != "writes":
        raise UserError(f"{name}: MXFP4 experts of a model type whose expert writers are not in the table")
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    owned = {n for n in params if n.startswith(name + ".")}
    site = HookSite(parent, "output", role, why="MXFP4 experts kept quantized", owned=owned)
    bias_name = f"{name}.down_proj_bias"
    if bias_name in params:
        bias_role = _role(classify, bias_name, tuple(params[bias_name].shape))
        if bias_role is not None:
            site.bias_role, site.bias_name, site.routed_bias = bias_role, bias_name, True
    return site


class ProjectOutput:
    """Forward hook: y -> y - u (s (u . y) + c) on the module's output (output[0] when it is a tuple), in float32."""

    def __init__(self, u: torch.Tensor, scale: float, offset: torch.Tensor | float = 0.0):
        # u: one unit direction [H], or a direction set [k, H] (orthonormal rows; offset then [k] or 0)
        self.u, self.scale, self.offset = u.to(torch.float32), float(scale), offset
        self._on: dict = {}

    def _direction(self, device):
        if device not in self._on:
            off = self.offset.to(device) if isinstance(self.offset, torch.Tensor) else self.offset
            self._on[device] = (self.u.to(device), off)
        return self._on[device]

    def project(self, y: torch.Tensor) -> torch.Tensor:
        u, off = self._direction(y.device)
        y32 = y.to(torch.float32)
        if u.dim() == 2:  # a set: y - U^T (s (U y) + c)
            coeff = (y32 @ u.T).mul_(self.scale).add_(off)
            return (y32 - coeff @ u).to(y.dtype)
        coeff = (y32 @ u).mul_(self.scale).add_(off)
        return torch.addcmul(y32, coeff.unsqueeze(-1), u, value=-1.0).to(y.dtype)

    def __call__(self, module, args, output):
        if isinstance(output, tuple):
            return (self.project(output[0]),) + tuple(output[1:])
        return self.project(output)


class ProjectInput(ProjectOutput):
    """Forward pre-hook: the first positional argument (or `hidden_states`) x -> x - s r (r . x)."""

    def __call__(self, module, args, kwargs):
        if args:
            return (self.project(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, dict(kwargs, hidden_states=self.project(kwargs["hidden_states"]))
        raise RuntimeError(f"{type(module).__name__}: no input to project (no positional argument or hidden_states)")


def register(module, site: HookSite, u: torch.Tensor, scale: float, bias_scale: float, bias):
    """Register the hook that edits `site` for one trial; returns the handle (remove() undoes it)."""
    if site.where == "input":
        return module.register_forward_pre_hook(ProjectInput(u, scale), with_kwargs=True)
    offset = 0.0
    if bias is not None and bias_scale != scale:
        u32 = u.to(bias.device, torch.float32)
        offset = (bias_scale - scale) * (bias.detach().to(torch.float32) @ (u32.T if u32.dim() == 2 else u32))
    return module.register_forward_hook(ProjectOutput(u, scale, offset))
