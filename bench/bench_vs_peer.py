"""The peer (Heretic) and us on the same model, prompts, answer length, dtype and trial budget, both results judged
by our evaluate on the held-out test split.

    python bench/bench_vs_peer.py --model smol-refuses --trials 30 --work vs-peer \
        [--heretic-python /path/to/venv/bin/python] [--skip-peer] [--skip-ours]

Not a test and never in CI. The peer runs in its own virtual environment, never a dependency of ours: create it with
`python -m venv heretic-venv && heretic-venv/bin/pip install torch==2.13.0 heretic-llm==1.4.0` and pass its python.
Both tools get the prompt files beside the model (`search_harmful.txt` / `search_harmless.txt`, written by
bench/make_refusing_model.py), their first --prompts lines each, for their directions and their trials, float32, `--max-new-tokens` answer tokens, and
`--trials` trials (the peer's random start-up share scaled from its default 60 of 200). The peer is driven through
its own menus (its notebook mode reads numbered choices from stdin): from its Pareto trials it keeps the one our
search's pick rule takes (under --kl-max, the lowest KL of those refusing at most --refusal-target, else the
fewest refusals), merges its LoRA and saves the model. A rerun in the same --work reuses the peer's study (its
checkpoint) and only picks, saves and judges again.
Ours: measure -> search -> sharded_ablate. Then `evaluate` judges each saved model against the base on the test
split, and the table prints refusal and KL for both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from abliterate.search.study import REFUSAL_TARGET, TrialRecord, pick  # noqa: E402


def run(cmd: list[str], log: Path, **kw) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, **kw)
    return time.perf_counter() - t


def prompt_files(args, work: Path) -> tuple[Path, Path]:
    """The first --prompts lines of the prompt files beside the model, written into work/ for both tools."""
    model = Path(args.model).resolve()
    out = []
    for kind in ("harmful", "harmless"):
        lines = [x for x in (model / f"search_{kind}.txt").read_text().splitlines() if x.strip()][:args.prompts]
        path = work / f"{kind}{args.prompts}.txt"
        path.write_text("\n".join(lines) + "\n")
        out.append(path.resolve())
    return out[0], out[1]


def peer(args, work: Path) -> tuple[Path, float]:
    """Run the peer's study and save its chosen trial's merged model to work/peer-model."""
    model = Path(args.model).resolve()
    cwd = work / "peer-run"
    cwd.mkdir(parents=True, exist_ok=True)
    out = work / "peer-model"
    if out.exists():  # a rerun saves the pick again: never judge an earlier run's model
        shutil.rmtree(out)
    harmful, harmless = prompt_files(args, work)
    startup = max(1, round(args.trials * 60 / 200))
    (cwd / "config.toml").write_text(f"""
dtypes = ["float32"]
device_map = "cpu"
max_response_length = {args.max_new_tokens}
batch_size = 64
n_trials = {args.trials}
n_startup_trials = {startup}
seed = 0
export_strategy = "merge"
[good_prompts]
dataset = "{harmless}"
[bad_prompts]
dataset = "{harmful}"
[good_evaluation_prompts]
dataset = "{harmless}"
[bad_evaluation_prompts]
dataset = "{harmful}"
""")
    env = dict(os.environ, KAGGLE_KERNEL_RUN_TYPE="1", PYTHONUNBUFFERED="1")  # the peer's numbered-menu mode
    log = open(work / "peer.log", "w", buffering=1)  # line-buffered: the log shows where the peer is
    started = time.perf_counter()
    # heretic.main has no __main__ guard: call its main() the way its console script does.
    proc = subprocess.Popen([args.heretic_python, "-c", "import sys; from heretic.main import main; sys.exit(main())",
                             "--model", str(model)], cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf, saved = "", False
    choices: list[tuple[int, str]] = []
    while True:
        ch = proc.stdout.read(1)
        if not ch:
            break
        c = ch.decode("utf-8", "replace")
        log.write(c)
        buf += c
        if c == "\n":
            m = re.match(r"\s*\[(\d+)\] (.*)", buf)
            if m:
                choices.append((int(m.group(1)), m.group(2)))
            buf = ""
            continue
        if buf.endswith("Enter number: "):
            answer = _menu_answer(choices, saved, args.kl_max, args.refusal_target)
            if answer is None:
                break
            if "Save the model" in dict(choices).get(answer, ""):
                saved = True
            choices = []
            proc.stdin.write(f"{answer}\n".encode())
            proc.stdin.flush()
            buf = ""
        elif buf.endswith(": ") and any(w in buf.lower() for w in ("directory", "folder")):  # "Path to the folder:"
            proc.stdin.write(f"{out}\n".encode())
            proc.stdin.flush()
            buf = ""
    proc.kill()
    log.close()
    if not (out / "config.json").exists():
        raise SystemExit(f"the peer saved no model; see {work / 'peer.log'}")
    return out, time.perf_counter() - started


def _menu_answer(choices: list[tuple[int, str]], saved: bool, kl_max: float, refusal_target: float) -> int | None:
    titles = dict(choices)
    if any("Save the model" in t for t in titles.values()):
        if saved:
            return None  # done: leave the peer
        return next(n for n, t in choices if "Save the model" in t)
    if any("results from the previous run" in t for t in titles.values()):  # a rerun: the peer's study is kept
        return next(n for n, t in choices if "results from the previous run" in t)
    trials = []
    for n, t in choices:
        m = re.search(r"Refusals:\s*(\d+)/(\d+), KL divergence: ([\d.]+)", t)
        if m:
            trials.append((int(m.group(1)), float(m.group(3)), n, int(m.group(2))))
    if trials:
        return _our_pick_rule(trials, kl_max, refusal_target)
    if any("Merge" in t for t in titles.values()):
        return next(n for n, t in choices if "Merge" in t)
    return None


def _our_pick_rule(trials: list[tuple[int, float, int, int]], kl_max: float, refusal_target: float) -> int:
    """The menu number our search's own pick rule (abliterate.search.study.pick) takes from the peer's Pareto
    trials, each (refusals, KL, menu number, prompts)."""
    records = [TrialRecord(number, "complete", kl, refusals, refusals, prompts, None, None, {}, None, 0.0)
               for refusals, kl, number, prompts in trials]
    return pick(records, kl_max, refusal_target)[0].number


def ours(args, work: Path) -> tuple[Path, float]:
    model = Path(args.model).resolve()
    py = sys.executable
    meas, plan, out = work / "ours.safetensors", work / "ours.yml", work / "ours-model"
    started = time.perf_counter()
    harmful, harmless = prompt_files(args, work)
    data = ["--data-harmful", str(harmful), "--data-harmless", str(harmless)]
    if not meas.exists():  # a rerun reuses it: the study beside the plan continues only with the same file
        run([py, str(ROOT / "measure.py"), "-m", str(model), "-o", str(meas), "--dtype", "float32", *data],
            work / "measure.log")
    run([py, str(ROOT / "search.py"), "-m", str(model), "--measurements", str(meas), "-o", str(plan),
         "--trials", str(args.trials), "--max-new-tokens", str(args.max_new_tokens), "--dtype", "float32",
         "--kl-max", str(args.kl_max), "--refusal-target", str(args.refusal_target), "--output-model", str(out),
         *data, *args.search_args], work / "search.log")
    if out.exists():
        shutil.rmtree(out)
    run([py, str(ROOT / "sharded_ablate.py"), str(plan)], work / "ablate.log")
    return out, time.perf_counter() - started


def judge(args, model_dir: Path, work: Path, name: str) -> dict:
    out = work / f"eval-{name}.json"
    out.unlink(missing_ok=True)  # the bench's own file from an earlier run: judge this model afresh
    run([sys.executable, "-m", "abliterate", "evaluate", "-m", str(model_dir), "--base", str(args.model),
         "--dtype", "float32", "--max-new-tokens", str(args.eval_tokens), "--json", str(out)], work / f"eval-{name}.log",
        cwd=ROOT)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--prompts", type=int, default=64, help="harmful and harmless prompts each tool gets")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--kl-max", type=float, default=0.1)
    p.add_argument("--refusal-target", type=float, default=REFUSAL_TARGET,
                   help="the pick rule's target for both tools (search.py --refusal-target)")
    p.add_argument("--heretic-python", default="heretic-venv/bin/python")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--search-args", nargs=argparse.REMAINDER, default=[], help="extra flags for search.py")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    if not args.skip_peer:
        model, seconds = peer(args, work)
        rows["peer"] = (judge(args, model, work, "peer"), seconds)
    elif (work / "eval-peer.json").is_file():  # an earlier run's judgement of the peer, shown beside ours
        rows["peer (earlier run)"] = (json.loads((work / "eval-peer.json").read_text()), float("nan"))
    if not args.skip_ours:
        model, seconds = ours(args, work)
        rows["ours"] = (judge(args, model, work, "ours"), seconds)
    for name, (result, seconds) in rows.items():
        print(f"{name}: {seconds:.0f} s; {_summary(result)}")
    return 0


def _summary(result: dict) -> str:
    """Refusal and degenerate rates (counts) and the KLs from evaluate's JSON (its `result` for the model)."""
    model = result.get("result", result)
    parts = []
    for kind in ("harmful", "harmless"):
        r = model.get(kind) or {}
        if r:
            n = r.get("count") or 0
            parts.append(f"{kind} refused {r['refusal_rate']:.1%} ({r['refusals']}/{n}), degenerate "
                         f"{r['degenerate_rate']:.1%}")
    for key in ("kl_base_answered", "answer_kl_base_answered", "kl", "answer_kl"):
        v = model.get(key)
        if isinstance(v, dict) and "mean" in v:
            parts.append(f"{key} {v['mean']:.4f}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
