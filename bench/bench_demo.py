"""Time the offline demo end to end and per stage (target: under 5 minutes on 2 CPU cores).

    python bench/bench_demo.py [--quick] [--arch gpt_oss|llama] [--workdir DIR] [--threads 2]

Runs the demo twice in one work folder: first with --retrain (the full cost a new user pays), then again (the
trained organism is reused). Prints stage times, the total, the refusal figures, and the machine's core count
and load average (other processes on the machine slow every stage; the load shows how busy it was).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smaller test-suite variant")
    p.add_argument("--arch", choices=("gpt_oss", "llama"), default="gpt_oss")
    p.add_argument("--workdir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2, help="torch threads outside training (training fixes its own)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    import torch

    from abliterate.demo.workflow import format_report, run_demo, summary_dict

    torch.set_num_threads(args.threads)
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-demo-")
        workdir = tmp.name
    runs = {}
    for label, retrain in (("fresh (train + workflow)", True), ("rerun (reuse organism)", False)):
        t = time.perf_counter()
        result = run_demo(workdir, arch=args.arch, retrain=retrain, quick=args.quick, progress=True)
        wall = time.perf_counter() - t
        runs[label] = {"wall_s": round(wall, 2), **summary_dict(result)}
        print(format_report(result))
    print("\n== bench_demo", "(quick)" if args.quick else "", f"arch={args.arch}")
    print(f"cores available: {os.cpu_count()}, torch threads: {args.threads}, "
          f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for label, r in runs.items():
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in r["timings_s"].items())
        print(f"{label:<26} wall {r['wall_s']:7.1f}s   [{stages}]")
    fresh = runs["fresh (train + workflow)"]["wall_s"]
    print(f"fresh run vs the 300 s target: {fresh / 300:.2f}x ({'under' if fresh < 300 else 'OVER'} 5 minutes)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
