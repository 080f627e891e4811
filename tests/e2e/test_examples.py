"""The examples run end to end against the default tiers, kept tiny for CI (their full-size
figures are in docs/benchmarks.md; here only the flow is checked).

The distillation example (examples/distill/distill.py): gpt-4.1 answers 10 stored training tickets, an eval grades nano and
gpt-4.1 on 3 held-out tickets, the stored completions (found by their metadata) become a
training file, a one-epoch job tunes nano, and the same eval grades the `ft:` model.

The tool-loop example (examples/tool-loop/tune.py): transcripts over five tools tune a model,
then the agents loop runs on held-out questions over two other tools, base and tuned; in CI on
nano (whose loops already end in text), 10 transcripts, one epoch."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_distill_example_runs_end_to_end(tiers_server, tmp_path):
    out = tmp_path / "scores.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "distill" / "distill.py"),
         "--base-url", tiers_server.api_base, "--train", "10", "--heldout", "3",
         "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    scores = json.loads(out.read_text())
    models = [row["model"] for row in scores["rows"]]
    assert models[:2] == ["gpt-4.1-nano", "gpt-4.1"], models
    assert models[2].startswith("ft:gpt-4.1-nano-2025-04-14:ferrum:tickets:"), models
    for row in scores["rows"]:
        assert set(row["per_field"]) == {"name", "order_id", "product", "category"}, row
        assert all(0.0 <= v <= 1.0 for v in row["per_field"].values()), row
    # The teacher reads every order id right even in a tiny run (it did 50/50 held out).
    assert scores["rows"][1]["per_field"]["order_id"] == 1.0, scores
    assert "| gpt-4.1-nano distilled |" in run.stdout, run.stdout
    # Only this run's stored completions became the training file.
    assert "10 examples in" in run.stdout, run.stdout


def test_tool_loop_example_runs_end_to_end(tiers_server, tmp_path):
    out = tmp_path / "loops.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "tool-loop" / "tune.py"),
         "--base-url", tiers_server.api_base, "--model", "gpt-4.1-nano", "--examples", "10",
         "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["model"] == "gpt-4.1-nano", rows
    assert rows[1]["model"].startswith("ft:gpt-4.1-nano-2025-04-14:ferrum:toolloop:"), rows
    for row in rows:
        assert row["questions"] == 5 and 0 <= row["quoted_result"] <= row["ended_in_text"] <= 5
    # nano's loops end in text before tuning (test_tools.py's agents-loop tests rely on it).
    assert rows[0]["ended_in_text"] == 5, run.stdout
