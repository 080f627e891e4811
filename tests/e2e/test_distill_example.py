"""The distillation example (examples/distill/distill.py) runs end to end against the default
tiers, kept tiny for CI: gpt-4.1 answers 10 stored training tickets, an eval grades nano and
gpt-4.1 on 3 held-out tickets, the stored completions (found by their metadata) become a
training file, a one-epoch job tunes nano, and the same eval grades the `ft:` model. The
scores of the full-size run are in docs/benchmarks.md; here only the flow is checked."""

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
