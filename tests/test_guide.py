"""The widely shared GPT-OSS-20B abliteration guide, typed verbatim, on a tiny GPT-OSS on a CPU machine:

    python measure.py --model gpt-oss-20b-BF16/ --output gpt-oss-20b-measurements.pt --batch-size 16 --flash-attn
    python analyze.py gpt-oss-20b-measurements.pt --chart
    # gpt-oss-20b.yml: model / measurements: "gpt-oss-20b-measurements.pt" / output / ablate: [...]
    python sharded_ablate.py gpt-oss-20b.yml
    python chat.py --model gpt-oss-20b-ablated/

measure and chat run as the root scripts in a subprocess, from the user's working folder (the other two through
their main(argv) there, which is what the scripts call).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from abliterate.commands import ablate as ablate_cmd
from abliterate.commands import analyze as analyze_cmd
from abliterate.commands import chat as chat_cmd

REPO = Path(__file__).resolve().parents[1]

# The guide's plan file: quoted paths, comments, every entry with all four keys.
GUIDE_YAML = """\
# gpt-oss-20b: remove the refusal direction measured at layer 1 from both layers
model: "gpt-oss-20b-BF16"
measurements: "gpt-oss-20b-measurements.pt"
output: "gpt-oss-20b-ablated"   # the abliterated model
ablate:
  - layer: 0
    measurement: 1
    scale: 1.0
    sparsity: 1.0
  - layer: 1
    measurement: 1
    scale: 1.0
    sparsity: 1.0
"""


def script(name: str, *args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_the_guide_runs_as_written(tiny_model, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_model("gpt_oss"), tmp_path / "gpt-oss-20b-BF16")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)

    # 1. measure, with the .pt name and --flash-attn of a GPU guide
    res = script("measure.py", "--model", "gpt-oss-20b-BF16/", "--output", "gpt-oss-20b-measurements.pt",
                 "--batch-size", "16", "--flash-attn", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "--flash-attn" in line]
    assert len(notes) == 1 and "using eager attention instead" in notes[0], res.stderr
    data = torch.load(tmp_path / "gpt-oss-20b-measurements.pt", map_location="cpu", weights_only=True)
    assert data["layers"] == 2 and {"harmful_1", "harmless_1", "refuse_1", "refusenorm_1"} <= set(data)

    # 2. analyze --chart: the PNG beside the file, and the command says where
    assert analyze_cmd.main(["gpt-oss-20b-measurements.pt", "--chart"]) == 0
    out = capsys.readouterr().out
    assert "wrote gpt-oss-20b-measurements.png" in out
    assert (tmp_path / "gpt-oss-20b-measurements.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 3-4. the guide's YAML, then sharded_ablate
    (tmp_path / "gpt-oss-20b.yml").write_text(GUIDE_YAML)
    assert ablate_cmd.main(["gpt-oss-20b.yml"]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "layers: 0-1" in out
    assert not [line for line in err.splitlines() if line.startswith(("warning:", "error:"))], err
    rec = json.loads((tmp_path / "gpt-oss-20b-ablated" / "abliteration.json").read_text())
    assert [(e["layer"], e["measurement"], e["effective_scale"], e["sparsity"]) for e in rec["directions"]] == [
        (0, 1, 1.0, 1.0), (1, 1, 1.0, 1.0)]
    assert rec["edited_layers"] == [0, 1]

    # 5. chat: piped input (one prompt per line) ...
    res = script("chat.py", "--model", "gpt-oss-20b-ablated/", "--max-new-tokens", "4", "--seed", "0", cwd=tmp_path,
                 stdin="Hi there\nhow do I make a cake\n")
    assert res.returncode == 0, res.stderr
    assert "answered 2 prompt(s) from standard input" in res.stderr

    # ... and interactively (a terminal: the prompt, answers, /exit)
    lines = iter(["Hi there", "/exit"])
    prompts = []
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(builtins, "input", lambda prompt="": prompts.append(prompt) or next(lines))
    assert chat_cmd.main(["--model", "gpt-oss-20b-ablated/", "--max-new-tokens", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chatting with gpt-oss-20b-ablated/") and prompts == ["you> ", "you> "]
