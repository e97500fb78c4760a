"""The chat engine and chat.py: streaming, history, /reset, Ctrl-C, harmony display; driven in-process, through
a pipe and through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abliterate.evaluate.chat_engine import ChatEngine, Sampling
from abliterate.commands import chat as chat_cmd
from abliterate.evaluate.labels import AnswerLabeller
from abliterate.loading import load_model, load_tokenizer  # noqa: F401
from loaded_models import gpt_oss, llama  # noqa: F401  (module-scoped fixtures)

REPO = Path(__file__).resolve().parent.parent
GREEDY = Sampling(temperature=0, max_new_tokens=12)


def scripted_generate(tokenizer, text):
    """A generate() replacement that streams the tokens of `text` one by one (honouring stopping criteria)."""
    script = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(input_ids, streamer=None, stopping_criteria=None, max_new_tokens=100, **kw):
        out = input_ids
        if streamer:
            streamer.put(input_ids)
        for tok in script[:max_new_tokens]:
            out = torch.cat([out, torch.tensor([[tok]])], dim=1)
            if streamer:
                streamer.put(torch.tensor([tok]))
            if stopping_criteria and any(bool(c(out, None).all()) for c in stopping_criteria):
                break
        if streamer:
            streamer.end()
        return out

    return generate


# engine ---------------------------------------------------------------------------------------------------------

def test_answer_streams_in_several_pieces(llama):
    _, model, tok = llama
    engine = ChatEngine(model, tok, sampling=GREEDY)
    pieces = []
    reply = engine.reply("hello", on_text=lambda ch, t: pieces.append((ch, t)))
    assert reply.tokens > 1
    assert engine.last_streamer.calls > 1 and len(pieces) > 1  # text arrived before the end
    assert "".join(t for _, t in pieces) == reply.answer


def test_history_is_kept_and_reset_clears_it(llama):
    _, model, tok = llama
    engine = ChatEngine(model, tok, system="be brief", sampling=GREEDY)
    first = engine.reply("how do I make a cake")
    second_prompt = engine.render("and a poem")
    assert "how do I make a cake" in second_prompt and first.answer.strip() in second_prompt
    assert second_prompt.startswith("<|system|>be brief")
    assert [m["role"] for m in engine.history] == ["user", "assistant"]
    engine.reply("and a poem")
    assert len(engine.history) == 4
    engine.reset()
    assert engine.history == [] and "how do I make a cake" not in engine.render("x")
    engine.set_system(None)
    assert "<|system|>" not in engine.render("x")


def test_greedy_and_seeded_sampling_are_reproducible(llama):
    _, model, tok = llama
    a = ChatEngine(model, tok, sampling=GREEDY).reply("tell me a story").text
    b = ChatEngine(model, tok, sampling=GREEDY).reply("tell me a story").text
    assert a == b
    seeded = Sampling(temperature=1.5, top_p=1.0, max_new_tokens=12, seed=7)
    c = ChatEngine(model, tok, sampling=seeded).reply("tell me a story").text
    d = ChatEngine(model, tok, sampling=seeded).reply("tell me a story").text
    assert c == d


def test_stop_ends_the_answer_early(llama):
    _, model, tok = llama
    engine = ChatEngine(model, tok, sampling=Sampling(temperature=0, max_new_tokens=40))
    full = ChatEngine(model, tok, sampling=Sampling(temperature=0, max_new_tokens=40)).reply("hi")
    reply = engine.reply("hi", on_text=lambda ch, t: engine.stop())
    assert reply.interrupted and reply.tokens < full.tokens
    # the flag is cleared: the next answer runs to its normal end
    assert not engine.reply("hi again").interrupted


def test_sigint_stops_the_answer_not_the_program(llama):
    _, model, tok = llama
    engine = ChatEngine(model, tok, sampling=Sampling(temperature=0, max_new_tokens=40))
    sent = []

    def on_text(ch, t):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    with engine.ctrl_c_stops_answer():
        reply = engine.reply("hi", on_text=on_text)
    assert reply.interrupted and reply.tokens < 40
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_harmony_reply_streams_final_and_keeps_reasoning_apart(gpt_oss):
    _, model, tok = gpt_oss
    engine = ChatEngine(model, tok, sampling=Sampling(temperature=0, max_new_tokens=200))
    assert engine.harmony
    text = ("<|channel|>analysis<|message|>User greets. Reply kindly.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello there, friend<|return|>")
    model.generate = scripted_generate(tok, text)
    try:
        pieces = []
        reply = engine.reply("hi", on_text=lambda ch, t: pieces.append((ch, t)))
    finally:
        del model.generate
    assert reply.parts.reasoning == "User greets. Reply kindly."
    assert reply.answer == "Hello there, friend"
    assert "".join(t for ch, t in pieces if ch == "final") == "Hello there, friend"
    assert len([1 for ch, _ in pieces if ch == "final"]) > 1  # the final answer streamed in pieces
    # history holds the final answer only, rendered as a final-channel message
    assert engine.history[-1] == {"role": "assistant", "content": "Hello there, friend"}
    assert "<|channel|>final<|message|>Hello there, friend<|end|>" in engine.render("next")
    assert "Reply kindly" not in engine.render("next")


def test_printer_hides_reasoning_unless_asked():
    import io

    events = [("analysis", "thinking "), ("analysis", "more"), ("final", "Hi"), ("final", "!")]
    quiet, loud = io.StringIO(), io.StringIO()
    p_quiet, p_loud = chat_cmd._Printer(quiet, False), chat_cmd._Printer(loud, True)
    for ch, t in events:
        p_quiet(ch, t)
        p_loud(ch, t)
    assert quiet.getvalue() == "Hi!"
    assert loud.getvalue() == "[analysis] thinking more\n[answer] Hi!"


# command, in-process --------------------------------------------------------------------------------------------

def test_prompt_mode_answers_and_exits_0(llama, run_cli):
    folder = llama[0]
    code, out, err = run_cli(chat_cmd.main, ["--model", folder, "--prompt", "hello", "--temperature", "0",
                                             "--max-new-tokens", "8"])
    assert code == 0 and out.strip()


def test_compare_answers_with_both_models_labelled(llama, run_cli):
    folder = llama[0]
    code, out, _ = run_cli(chat_cmd.main, ["--model", folder, "--compare", folder, "--prompt", "hello",
                                           "--temperature", "0", "--max-new-tokens", "8"])
    assert code == 0
    lines = out.splitlines()
    i, j = lines.index(f"[model {folder}]"), lines.index(f"[base {folder}]")
    assert i < j
    # same weights, greedy: the two answers are identical
    assert lines[i + 1] == lines[j + 1]
    # each answer is followed by its label, as evaluate's labeller gives it
    labels = [n for n, ln in enumerate(lines) if ln.startswith("(label: ")]
    assert len(labels) == 2 and i < labels[0] < j < labels[1]
    assert lines[labels[0]] == lines[labels[1]]
    assert lines[labels[0]].split(" ")[1] in ("refusal", "answer", "degenerate")


def test_label_line_follows_the_labeller(gpt_oss):
    from abliterate.evaluate.chat_engine import Reply
    from abliterate.harmony import parse_harmony

    final = parse_harmony("<|channel|>final<|message|>I'm sorry, but I can't help with that.")
    assert chat_cmd.label_line(AnswerLabeller(), "build a bomb", Reply("", final, 9)).startswith("(label: refusal - ")
    # no final channel: judged on the reasoning, over its whole length (the decision comes late)
    thinking = parse_harmony("<|channel|>analysis<|message|>The user asks how to build a bomb. They want step by "
                             "step instructions, materials and quantities. We should check the policy on weapons and "
                             "explosives. Instructions that facilitate violent wrongdoing are covered there, and a "
                             "request for a working device is plainly in scope. This is disallowed, so we must refuse.")
    assert len(thinking.reasoning) > 300  # the decision comes after the usual opening window
    assert chat_cmd.label_line(AnswerLabeller(), "build a bomb", Reply("", thinking, 80)).startswith("(label: refusal")
    assert chat_cmd.label_line(AnswerLabeller(), "hi", Reply("", parse_harmony(""), 0)).startswith("(label: degenerate")


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--prompt", "  "], "--prompt"),
    (["--compare", "/nonexistent/base"], "--compare /nonexistent/base"),
])
def test_bad_input_is_one_line_exit_2(llama, run_cli, args, needle):
    base = ["--model", llama[0], "--prompt", "hi", "--max-new-tokens", "2"]
    code, out, err = run_cli(chat_cmd.main, base + args)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0]


# command, as a process ------------------------------------------------------------------------------------------

def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def test_piped_prompts_answer_each_line_and_exit(llama):
    folder = llama[0]
    proc = subprocess.run(
        [sys.executable, "-m", "abliterate", "chat", "--model", str(folder), "--temperature", "0",
         "--max-new-tokens", "6"],
        input="hello\n/reset\n\nhow do I make a cake\n/system be kind\n/exit\nnever answered\n",
        capture_output=True, text=True, env=_env(), timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(conversation cleared)" in proc.stdout and "(system prompt set" in proc.stdout
    assert "answered 2 prompt(s) from standard input" in proc.stderr


def _read_until(fd, needle: bytes, timeout: float = 90.0) -> bytes:
    buf = b""
    end = time.time() + timeout
    while needle not in buf:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_session_through_a_pseudo_terminal(llama):
    folder = llama[0]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "abliterate", "chat", "--model", str(folder), "--temperature", "0",
         "--max-new-tokens", "8"],
        stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=REPO, close_fds=True,
    )
    os.close(slave)
    try:
        banner = _read_until(master, b"you> ")
        assert b"/reset" in banner  # the help line lists the commands
        os.write(master, b"hello\n")
        answer = _read_until(master, b"you> ")
        # what came back after the echoed line is the streamed answer, then the next prompt
        body = answer.split(b"hello", 1)[1].replace(b"\r", b"").strip(b"\n")
        assert body.endswith(b"you> ") and len(body) > len(b"you> ")
        os.write(master, b"/reset\n")
        assert b"(conversation cleared)" in _read_until(master, b"you> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
