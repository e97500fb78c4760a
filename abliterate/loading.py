"""Load a model and its tokenizer from a local folder or a hub id, with the options every command shares.

User mistakes (missing folder, no config.json, unknown hub id, no chat template) become one-line UserErrors.
Nothing here runs code from the model folder unless the user passes --trust-remote-code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abliterate.cli import UserError, first_line
from abliterate.naming import resolve_model_location

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The kernel transformers names for flash attention with GPT-OSS's attention sinks (FA3 with sinks, kernels hub).
SINKS_KERNEL = "kernels-community/vllm-flash-attn3"
SINKS_MODEL_TYPES = ("gpt_oss",)


def add_model_arguments(parser: argparse.ArgumentParser, quant_flag: str = "--quant") -> None:
    """The loading flags shared by measure, chat and evaluate."""
    g = parser.add_argument_group("model loading")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype (default: auto = as stored in the checkpoint; float32 on CPU for half types)")
    g.add_argument("--device", default=None,
                   help="put the whole model on this device (cpu, cuda, cuda:1, mps); overrides --device-map")
    g.add_argument("--device-map", default=None,
                   help="accelerate device map (default: 'auto' over all GPUs when CUDA is present, else CPU/MPS)")
    g.add_argument(quant_flag, dest="quant", choices=("4bit", "8bit"), default=None,
                   help="load with bitsandbytes 4-bit or 8-bit quantization (needs CUDA; ignored with a message otherwise)")
    g.add_argument("--flash-attn", action="store_true",
                   help="use a flash-attention kernel when one can run: on a CUDA GPU, flash_attention_2 (flash-attn "
                        "or kernels package); for GPT-OSS, whose attention sinks need it, "
                        f"{SINKS_KERNEL} (kernels package, Ampere or newer). Elsewhere one note names the "
                        "attention used instead (eager for GPT-OSS and on CPU) and the run goes on")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (off by default: nothing we read executes)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file to use when the tokenizer has none")


def is_gguf(model: str) -> bool:
    return str(model).lower().endswith(".gguf")


def resolve_model(model: str) -> str:
    """Check a model argument: an existing folder with config.json, a GGUF file transformers loads correctly, or
    something shaped like a hub id."""
    if is_gguf(model):
        return check_gguf_model(model)
    location = resolve_model_location(model, f"--model {model}")
    if Path(location).is_dir() and not (Path(location) / "config.json").is_file():
        raise UserError(f"--model {model}: folder has no config.json; give a Hugging Face model folder")
    return location


# GGUF architectures whose transformers (5.x) mapping leaves weights unloaded: GPT-OSS's experts, expert biases and
# attention sinks are not mapped and would stay random.
GGUF_UNSUPPORTED = ("gpt-oss",)


def check_gguf_model(model: str, flag: str = "--model") -> str:
    """A GGUF file for transformers' GGUF loader (it dequantizes into a normal model): one that exists, is not
    split (the loader reads one file) and whose architecture it maps correctly."""
    from abliterate.ablate.gguf_file import read_part, split_parts

    path = Path(model).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {model}: no such GGUF file; fix the path")
    if len(split_parts(path)) > 1:
        raise UserError(f"{flag} {model}: transformers loads a single GGUF file, not a split set; merge it with "
                        "llama.cpp's `llama-gguf-split --merge` or use the HF checkpoint")
    arch = read_part(path).fields.get("general.architecture")
    if arch in GGUF_UNSUPPORTED:
        raise UserError(f"{flag} {model}: transformers does not load {arch} GGUF files correctly (experts and "
                        "attention sinks are not mapped and would stay random); measure the original checkpoint "
                        "(same model, same hidden space) and point the plan's model: at this GGUF")
    return str(path)


def pretrained_args(model: str) -> tuple[str, dict]:
    """from_pretrained's location and extra keywords: a GGUF file loads as (its folder, gguf_file=its name)."""
    if is_gguf(model):
        p = Path(model)
        return str(p.parent), {"gguf_file": p.name}
    return model, {}


def read_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    where, extra = pretrained_args(model)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UserError(f"--model {model}: cannot load its config ({first}); check the id or path") from None


def load_tokenizer(model: str, trust_remote_code: bool = False, chat_template: str | None = None,
                   require_chat_template: bool = True):
    """Tokenizer with left padding (the last prompt token is then at position -1 for every row)."""
    from transformers import AutoTokenizer

    where, extra = pretrained_args(model)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UserError(f"--model {model}: cannot load its tokenizer ({first})") from None
    if chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise UserError(f"--chat-template {chat_template}: no such file; give a Jinja template file")
        tok.chat_template = path.read_text(encoding="utf-8")
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise UserError(
            f"--model {model}: the tokenizer has no chat template; pass --chat-template FILE.jinja "
            "(a base model without one is not a chat model)"
        )
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def default_device_map(device: str | None, device_map: str | None):
    import torch

    if device:
        return {"": device}
    if device_map:
        return device_map
    if torch.cuda.is_available():
        return "auto"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return {"": "mps"}
    return {"": "cpu"}


def quantization_method(config) -> str | None:
    """The checkpoint's own quantization ("mxfp4", "gguf", ...) from its config, or None."""
    qcfg = getattr(config, "quantization_config", None)
    return qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)


def text_config(config):
    """The language model's config object: multimodal configs nest it (transformers' get_text_config); the config
    itself when that gives nothing with a hidden_size."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    return text if hasattr(text, "hidden_size") else config


def load_model(model: str, dtype: str = "auto", device: str | None = None, device_map: str | None = None,
               quant: str | None = None, flash_attn: bool = False, trust_remote_code: bool = False,
               verbose: bool = False):
    """Load a causal LM for inference (eval mode, no grad needed)."""
    import torch
    from transformers import AutoModelForCausalLM

    if device and device != "cpu":
        from abliterate.ablate.preflight import pick_device

        pick_device(device)  # one line, not torch's traceback, for a device this machine lacks (cuda, cuda:N)
    config = read_config(model, trust_remote_code)
    where, extra = pretrained_args(model)
    dmap = default_device_map(device, device_map)
    on_cpu = isinstance(dmap, dict) and str(dmap.get("", "")).startswith("cpu")
    kwargs: dict = {"trust_remote_code": trust_remote_code, "device_map": dmap, **extra}

    if dtype == "auto":
        # Half types are slow and lossy on most CPUs; compute in float32 there.
        kwargs["dtype"] = torch.float32 if on_cpu else "auto"
    else:
        kwargs["dtype"] = getattr(torch, dtype)

    model_type = getattr(config, "model_type", "")
    attn, note = attention_implementation(model_type, on_cpu, flash_attn)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if attn is not None:
        kwargs["attn_implementation"] = attn

    qmethod = quantization_method(config)
    if quant:
        if not torch.cuda.is_available():
            print(f"note: --quant {quant} skipped: bitsandbytes quantization needs a CUDA GPU; loading unquantized",
                  file=sys.stderr)
        elif qmethod is not None:
            print(f"note: --quant {quant} skipped: the checkpoint is already quantized ({qmethod})", file=sys.stderr)
        else:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
                if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
            )
    if str(qmethod) == "mxfp4" and "quantization_config" not in kwargs and (on_cpu or not torch.cuda.is_available()):
        # Original GPT-OSS checkpoints: without GPU kernels, dequantize the MXFP4 experts to bf16 on load.
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)

    try:
        try:
            lm = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            if attn is None or attn in _PLAIN:
                raise
            # The flash kernel was chosen but would not load (no hub access for a kernel, a build for another
            # GPU...): the flag must never stop the run.
            fallback = _plain_attention(model_type, on_cpu)
            print(f"note: --flash-attn: {attn} did not load ({first_line(exc)[:160]}); using "
                  f"{fallback or 'the default (sdpa)'} attention instead", file=sys.stderr)
            kwargs.pop("attn_implementation")
            if fallback:
                kwargs["attn_implementation"] = fallback
            lm = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"--model {model}: cannot load the model ({first_line(exc)})") from None
    lm.eval()
    if verbose:
        print(f"loaded {model}: {model_type}, dtype {next(lm.parameters()).dtype}, device map {dmap}", file=sys.stderr)
    return lm


_PLAIN = ("eager", "sdpa")




def _plain_attention(model_type: str, on_cpu: bool) -> str | None:
    """The attention used without flash kernels: eager for GPT-OSS (sdpa cannot add its sinks) and on CPU (exact),
    else None (transformers' default, sdpa)."""
    return "eager" if model_type in SINKS_MODEL_TYPES or on_cpu else None


def attention_implementation(model_type: str, on_cpu: bool, flash_attn: bool) -> tuple[str | None, str | None]:
    """(attn_implementation for from_pretrained or None for the default, a note for the user or None).

    With --flash-attn a flash kernel is chosen only where one can run; otherwise the note says which attention is
    used instead, and why, and the run goes on (a flag copied from a GPU guide must not stop a CPU run)."""
    import importlib.util

    plain = _plain_attention(model_type, on_cpu)
    if not flash_attn:
        return plain, None
    instead = f"using {plain or 'the default (sdpa)'} attention instead"
    import torch

    if on_cpu or not torch.cuda.is_available():
        return plain, f"--flash-attn: no CUDA GPU in use, so no flash-attention kernel can run; {instead}"
    has_kernels = importlib.util.find_spec("kernels") is not None
    if model_type in SINKS_MODEL_TYPES:
        major, minor = torch.cuda.get_device_capability()
        if not has_kernels:
            return plain, (f"--flash-attn: {model_type}'s attention sinks need the {SINKS_KERNEL} kernel, which "
                           f"needs the kernels package (pip install kernels); {instead}")
        if major < 8:
            return plain, (f"--flash-attn: {SINKS_KERNEL} needs an Ampere or newer GPU (this one is "
                           f"sm_{major}{minor}); {instead}")
        return SINKS_KERNEL, None
    if importlib.util.find_spec("flash_attn") is None and not has_kernels:
        return plain, f"--flash-attn: neither the flash-attn nor the kernels package is installed; {instead}"
    return "flash_attention_2", None


def load_from_args(name: str, args, flag: str = "--model"):
    """(model, tokenizer) for a model named on the command line, with the shared loading flags in `args`.

    `flag` is the option the name came from (--model, --base, --compare), so errors point at the right one.
    """
    try:
        path = resolve_model(name)
    except UserError as exc:
        raise UserError(str(exc).replace("--model", flag, 1)) from None
    tok = load_tokenizer(path, trust_remote_code=args.trust_remote_code, chat_template=args.chat_template)
    model = load_model(path, dtype=args.dtype, device=args.device, device_map=args.device_map, quant=args.quant,
                       flash_attn=args.flash_attn, trust_remote_code=args.trust_remote_code)
    return model, tok
