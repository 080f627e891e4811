#!/usr/bin/env python3
"""Moderation benchmark: the classifier behind `POST /v1/moderations` measured on the labelled
set tests/data/moderation_eval.jsonl (written for ferrum; see tests/data/README.md).

The script starts `ferrum serve` itself (fresh database, a config with one lazy tier that is
never loaded: moderation needs no model), or uses `--base-url`. It sends the texts through
/v1/moderations and reports, per category group (harassment, hate, illicit, self-harm, sexual,
violence: a text is positive for a group when any of its categories is labelled, predicted
when any is flagged) and per category with enough examples:

- precision, recall and F1 of the server's `flagged` categories, on the dev half (even lines
  of the first part, where the thresholds were chosen), the test half (its odd lines), the
  "fresh" texts (written after the lexicon and thresholds were frozen) and all;
- the range of thresholds that maximise F1 on the dev half, from the returned scores (where
  `Category::threshold` in crates/ferrum-server/src/moderation/classify.rs should lie);
- calibration: the Brier score of the scores as probabilities, and the mean score of the
  positives and of the negatives;
- which labelled texts are missed and which benign ones are flagged, by kind (ordinary,
  hard-negative, evasion, implicit);
- the latency of one request with all texts, and of single-text requests.

    target/e2e-venv/bin/python scripts/bench_moderation.py --ferrum-bin target/debug/ferrum

Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import start_server  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "moderation_eval.jsonl"
GROUPS = {
    "harassment": ["harassment", "harassment/threatening"],
    "hate": ["hate", "hate/threatening"],
    "illicit": ["illicit", "illicit/violent"],
    "self-harm": ["self-harm", "self-harm/intent", "self-harm/instructions"],
    "sexual": ["sexual", "sexual/minors"],
    "violence": ["violence", "violence/graphic"],
}
CATEGORIES = [c for cs in GROUPS.values() for c in cs]
LAZY_CONFIG = """[[tier]]
id = "unused"
load = "lazy"
price = { input = 0, cached_input = 0, output = 0 }
weights = { path = "never-loaded.gguf" }
"""


def prf(pairs: list[tuple[bool, bool]]) -> tuple[float, float, float, int]:
    """Precision, recall, F1 and support of (label, predicted) pairs."""
    tp = sum(1 for y, p in pairs if y and p)
    fp = sum(1 for y, p in pairs if not y and p)
    fn = sum(1 for y, p in pairs if y and not p)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, tp + fn


def best_thresholds(pairs: list[tuple[bool, float]]) -> tuple[float, float, float]:
    """The range of thresholds (lo, hi] whose F1 is the highest, and that F1: a threshold t
    flags scores >= t, so any t above the highest score left unflagged (lo) and at most the
    lowest score flagged (hi) gives the same F1."""
    scores = sorted({s for _, s in pairs} | {0.0, 1.0})
    best, lo, hi = -1.0, 0.0, 1.0
    for below, t in zip(scores, scores[1:]):
        f1 = prf([(y, s >= t) for y, s in pairs])[2]
        if f1 > best + 1e-9:
            best, lo, hi = f1, below, t
    return lo, hi, best


def classify_all(http: httpx.Client, texts: list[str]) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    r = http.post("/v1/moderations", json={"input": texts})
    wall = time.perf_counter() - t0
    r.raise_for_status()
    return r.json()["results"], wall


def single_latencies(http: httpx.Client, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        t0 = time.perf_counter()
        http.post("/v1/moderations", json={"input": t}).raise_for_status()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def report(items: list[dict], results: list[dict]) -> None:
    first = [i for i, it in enumerate(items) if it["kind"] != "fresh"]
    halves = {
        "dev": [i for i in first if i % 2 == 0],
        "test": [i for i in first if i % 2 == 1],
        "fresh": [i for i, it in enumerate(items) if it["kind"] == "fresh"],
        "all": list(range(len(items))),
    }

    def label(i: int, cats: list[str]) -> bool:
        return any(c in items[i]["labels"] for c in cats)

    def flagged(i: int, cats: list[str]) -> bool:
        return any(results[i]["categories"][c] for c in cats)

    def score(i: int, cats: list[str]) -> float:
        return max(results[i]["category_scores"][c] for c in cats)

    rows = [(g, cs) for g, cs in GROUPS.items()]
    rows += [(c, [c]) for c in CATEGORIES if "/" in c]
    print("| group / category | support dev/test/fresh | F1 dev | P test | R test | F1 test "
          "| P fresh | R fresh | F1 fresh | P all | R all | F1 all "
          "| F1-best thresholds on dev (F1) | Brier | mean score +/- |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, cats in rows:
        cells = []
        for half in ("dev", "test", "fresh", "all"):
            p, r, f, _ = prf([(label(i, cats), flagged(i, cats)) for i in halves[half]])
            cells += [f"{f:.2f}"] if half == "dev" else [f"{p:.2f}", f"{r:.2f}", f"{f:.2f}"]
        support = "/".join(str(sum(label(i, cats) for i in halves[h]))
                           for h in ("dev", "test", "fresh"))
        lo, hi, f1 = best_thresholds([(label(i, cats), score(i, cats)) for i in halves["dev"]])
        scored = [(label(i, cats), score(i, cats)) for i in halves["all"]]
        brier = statistics.fmean((s - (1.0 if y else 0.0)) ** 2 for y, s in scored)
        pos = statistics.fmean([s for y, s in scored if y] or [0.0])
        neg = statistics.fmean(s for y, s in scored if not y)
        print(f"| {name} | {support} | " + " | ".join(cells)
              + f" | ({lo:.2f}, {hi:.2f}] ({f1:.2f}) | {brier:.3f} | {pos:.2f} / {neg:.2f} |")
    for half in ("test", "fresh", "all"):
        idx = halves[half]
        p, r, f, n = prf([(bool(items[i]["labels"]), results[i]["flagged"]) for i in idx])
        print(f"\n`flagged` (any category), {half} ({len(idx)} texts: {n} harmful, "
              f"{len(idx) - n} benign): precision {p:.2f}, recall {r:.2f}, F1 {f:.2f}")
    print("\nBy kind (texts with at least one wrong group):")
    kinds = sorted({it["kind"] for it in items})
    for kind in kinds:
        idx = [i for i, it in enumerate(items) if it["kind"] == kind]
        wrong = [i for i in idx
                 if any(label(i, cs) != flagged(i, cs) for cs in GROUPS.values())]
        print(f"- {kind}: {len(idx) - len(wrong)}/{len(idx)} right")
        for i in wrong:
            missed = [g for g, cs in GROUPS.items() if label(i, cs) and not flagged(i, cs)]
            extra = [g for g, cs in GROUPS.items() if flagged(i, cs) and not label(i, cs)]
            print(f"    {items[i]['text'][:70]!r}: missed {missed}, false {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrum-bin", default="target/debug/ferrum")
    ap.add_argument("--base-url", help="an already running server (else one is started)")
    args = ap.parse_args()
    items = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    texts = [it["text"] for it in items]
    proc = None
    base = args.base_url
    if base is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench-moderation-"))
        (workdir / "ferrum.toml").write_text(LAZY_CONFIG)
        proc, base = start_server(args.ferrum_bin, workdir,
                                  ["--config", str(workdir / "ferrum.toml")])
    try:
        with httpx.Client(base_url=base, timeout=120) as http:
            results, wall = classify_all(http, texts)  # warms the lexicons up
            results, wall = classify_all(http, texts)
            singles = single_latencies(http, texts)
        report(items, results)
        print(f"\nLatency: all {len(texts)} texts in one request {wall * 1000:.1f} ms; one text "
              f"per request median {statistics.median(singles):.2f} ms, "
              f"max {max(singles):.2f} ms (HTTP round trip included)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
