"""chat.py: talk to a model (an abliterated output folder, or any chat model), streaming token by token.

    chat.py --model out/                       interactive chat (you> prompt; /reset, /system TEXT, /exit)
    chat.py --model out/ --prompt "Hi"         answer one prompt and exit
    printf 'Hi\\nMore\\n' | chat.py --model out/   answer each line of standard input (one conversation) and exit
    chat.py --model out/ --compare base/       every prompt answered by both models, one after the other
"""

from __future__ import annotations

import argparse
import sys

from abliterate.evaluate.chat_engine import ChatEngine, Reply, Sampling
from abliterate.evaluate.labels import AnswerLabeller
from abliterate.cli import UserError, run_command
from abliterate.harmony import FINAL, REASONING
from abliterate.loading import add_model_arguments, load_from_args

HELP_TEXT = "commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone clears it), /exit"


class _Formatter(argparse.HelpFormatter):
    """Wrapped description, epilog kept as written (the examples)."""

    def _fill_text(self, text, width, indent):
        return text if "\n" in text else super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat.py",
        description="Talk to a model, streaming token by token. Multi-turn: the whole conversation goes through "
        "the model's chat template. Ctrl-C stops the current answer, not the program; /exit or Ctrl-D quits. "
        "GPT-OSS (harmony format): only the final answer is shown unless --show-reasoning. Standard input that "
        "is not a terminal is read as one prompt per line, one conversation (the in-chat commands work there).",
        epilog="in-chat " + HELP_TEXT + "\n\nexamples:\n" + __doc__.split("\n\n", 1)[1].rstrip()
        + "\n\ndetails: docs/chat.md",
        formatter_class=_Formatter,
    )
    p.add_argument("-m", "--model", required=True, help="model folder or hub id"
                        ", or a .gguf file (loaded dequantized by transformers; not GPT-OSS: docs/gguf.md)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    p.add_argument("--seed", type=int, default=None, help="random seed: each answer starts from it (reproducible)")
    p.add_argument("--show-reasoning", action="store_true",
                   help="harmony models (GPT-OSS): also show the reasoning (analysis channel)")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--compare", metavar="BASE", default=None,
                   help="also load BASE (e.g. the original model) and answer every prompt with both; each answer "
                   "is followed by its label (refusal / answer / degenerate, the rule evaluate uses)")
    add_model_arguments(p)
    return p


def _check_args(args) -> None:
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give the text to answer")


class _Printer:
    """Writes streamed pieces: the final answer, and the reasoning only when asked (labelled, before the answer)."""

    def __init__(self, out, show_reasoning: bool):
        self.out = out
        self.show_reasoning = show_reasoning
        self.current: object = "unset"

    def __call__(self, channel, text: str) -> None:
        if channel == REASONING or (channel not in (FINAL, None)):
            if not self.show_reasoning:
                return
            if self.current != channel:
                self.out.write(f"[{channel}] ")
        elif self.show_reasoning and self.current not in ("unset", FINAL, None):
            self.out.write("\n[answer] ")
        self.current = channel
        self.out.write(text)
        self.out.flush()


def label_line(labeller: AnswerLabeller, prompt: str, reply: Reply) -> str:
    """'(label: refusal - why)' for an answer, judged as evaluate judges it (GPT-OSS reasoning-only answers over
    their whole length)."""
    on_reasoning = not reply.parts.final_reached and not reply.parts.loose.strip()
    why = labeller.explain(reply.answer.strip(), prompt, whole_text=on_reasoning)
    return f"(label: {why['label']} - {why['reason']})"


def _answer(engine: ChatEngine, prompt: str, label: str | None, show_reasoning: bool,
            labeller: AnswerLabeller | None = None) -> Reply:
    out = sys.stdout
    if label:
        out.write(f"[{label}]\n")
    printer = _Printer(out, show_reasoning)
    with engine.ctrl_c_stops_answer():
        reply = engine.reply(prompt, on_text=printer)
    if reply.interrupted:
        out.write(" [stopped]")
    elif engine.harmony and not reply.parts.final_reached:
        out.write("" if reply.parts.loose.strip() else
                  f"[no final answer within {engine.sampling.max_new_tokens} tokens; raise --max-new-tokens]")
    out.write("\n")
    if labeller is not None and not reply.interrupted:
        out.write(label_line(labeller, prompt, reply) + "\n")
    out.flush()
    return reply


def _handle(line: str, engines: list[tuple[str | None, ChatEngine]], args) -> bool:
    """One line of input: a command or a prompt. Returns False when the chat should end."""
    text = line.strip()
    if not text:
        return True
    if text in ("/exit", "/quit"):
        return False
    if text == "/reset":
        for _, e in engines:
            e.reset()
        print("(conversation cleared)")
        return True
    if text == "/system" or text.startswith("/system "):
        system = text[len("/system"):].strip()
        for _, e in engines:
            e.set_system(system)
            e.reset()
        print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
        return True
    if text in ("/help", "/?"):
        print(HELP_TEXT)
        return True
    if text.startswith("/") and " " not in text:
        print(f"(unknown command {text}; {HELP_TEXT})")
        return True
    labeller = AnswerLabeller() if len(engines) > 1 else None  # --compare: label each model's answer
    for label, engine in engines:
        _answer(engine, text, label, args.show_reasoning, labeller)
    return True


def _interactive(engines, args) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    names = ", ".join(label for label, _ in engines if label) or args.model
    print(f"chatting with {names}; {HELP_TEXT}; Ctrl-C stops an answer", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-C at the prompt does nothing; type /exit or press Ctrl-D to quit)")
            continue
        if not _handle(line, engines, args):
            return


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    model, tok = load_from_args(args.model, args, "--model")
    engines: list[tuple[str | None, ChatEngine]] = [(None, ChatEngine(model, tok, args.system, sampling))]
    if args.compare:
        base, base_tok = load_from_args(args.compare, args, "--compare")
        engines = [(f"model {args.model}", engines[0][1]),
                   (f"base {args.compare}", ChatEngine(base, base_tok, args.system, sampling))]

    if args.prompt is not None:
        _handle(args.prompt, engines, args)
    elif sys.stdin.isatty():
        _interactive(engines, args)
    else:
        answered = 0
        for line in sys.stdin:
            if not _handle(line, engines, args):
                break
            answered += bool(line.strip()) and not line.strip().startswith("/")
        print(f"answered {answered} prompt(s) from standard input", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
