#!/usr/bin/env python3
"""Moderation benchmark: the classifiers behind `POST /v1/moderations` measured on the labelled
set tests/data/moderation_eval.jsonl (written for ferrum; see tests/data/README.md).

Two classifiers: the lexical one (`--classifier lexical`, the default: the server answers every
moderation model with it) and the model judge (`--classifier judge --judge-tier gpt-4.1-mini`:
the config gets `[moderation] judge = TIER` and `omni-moderation-latest` is asked, so the judge
tier answers one yes/no question per category). The script starts `ferrum serve` itself (fresh
database; for the lexical classifier one lazy tier that is never loaded, for the judge only the
judge tier, on the weights `ferrum pull` returns), or uses `--base-url` (then `--model` picks
the moderation model sent). It sends the texts through /v1/moderations and reports, per
category group (harassment, hate, illicit, self-harm, sexual, violence: a text is positive for
a group when any of its categories is labelled, predicted when any is flagged) and per
subcategory:

- precision, recall and F1 of the server's `flagged` categories on each split (`split` in the
  jsonl: dev, where thresholds are chosen; test; fresh; heldout, written after both
  classifiers' code and before either was run on it);
- the range of thresholds that maximise F1 on the dev split, from the returned scores, per
  group and (with `--fit`) per category: where the classifier's thresholds should lie
  (`Category::threshold` in moderation/classify.rs, `threshold` in moderation/judge.rs);
- calibration: the Brier score of the scores as probabilities, the mean score of the positives
  and of the negatives; with `--fit`, the logistic map sigmoid(a * logit(s) + b) of the
  returned scores that fits the dev split best, to compose with judge.rs's SLOPE and
  INTERCEPT (new SLOPE = a * SLOPE, new INTERCEPT = a * INTERCEPT + b);
- which labelled texts are missed and which benign ones are flagged, by kind;
- latency: all texts in requests of `--chunk` texts (wall time per text), and single-text
  requests (all texts for the lexical classifier, the first `--latency-sample` for the judge).

    target/e2e-venv/bin/python scripts/bench_moderation.py
    target/e2e-venv/bin/python scripts/bench_moderation.py --classifier judge --judge-tier gpt-4.1-mini

`--splits dev` limits the run to some splits (e.g. to fit the judge's calibration on dev
alone). Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
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
SPLITS = ["dev", "test", "fresh", "heldout"]
PRICE = "price = { input = 0, cached_input = 0, output = 0 }"
LAZY_CONFIG = f"""[[tier]]
id = "unused"
load = "lazy"
{PRICE}
weights = {{ path = "never-loaded.gguf" }}
"""


def judge_config(binary: str, tier: str) -> str:
    pull = subprocess.run([binary, "pull", tier], capture_output=True, text=True, check=True)
    [path] = [l.split(": ", 1)[1].strip() for l in pull.stdout.splitlines()
              if l.startswith(f"{tier}: ")]
    return (f'[[tier]]\nid = "{tier}"\n{PRICE}\nweights = {{ path = "{path}" }}\n\n'
            f'[moderation]\njudge = "{tier}"\n')


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


def logit(s: float) -> float:
    s = min(max(s, 1e-6), 1 - 1e-6)
    return math.log(s / (1 - s))


def fit_logistic(pairs: list[tuple[bool, float]]) -> tuple[float, float]:
    """a, b of sigmoid(a * logit(s) + b) by maximum likelihood (Newton's method)."""
    xs = [(logit(s), 1.0 if y else 0.0) for y, s in pairs]
    a, b = 1.0, 0.0
    for _ in range(50):
        ga = gb = haa = hab = hbb = 0.0
        for x, y in xs:
            p = 1 / (1 + math.exp(-(a * x + b)))
            ga += (p - y) * x
            gb += p - y
            w = p * (1 - p) + 1e-9
            haa += w * x * x
            hab += w * x
            hbb += w
        det = haa * hbb - hab * hab
        a -= (hbb * ga - hab * gb) / det
        b -= (haa * gb - hab * ga) / det
    return a, b


def classify_all(http: httpx.Client, model: str, texts: list[str], chunk: int) -> tuple[list[dict], float]:
    results = []
    t0 = time.perf_counter()
    for i in range(0, len(texts), chunk):
        r = http.post("/v1/moderations", json={"input": texts[i:i + chunk], "model": model})
        r.raise_for_status()
        results += r.json()["results"]
        print(f"  {len(results)}/{len(texts)} texts", file=sys.stderr, end="\r")
    return results, time.perf_counter() - t0


def single_latencies(http: httpx.Client, model: str, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        t0 = time.perf_counter()
        http.post("/v1/moderations", json={"input": t, "model": model}).raise_for_status()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def report(items: list[dict], results: list[dict], fit: bool) -> None:
    splits = {s: [i for i, it in enumerate(items) if it["split"] == s] for s in SPLITS}
    splits = {s: idx for s, idx in splits.items() if idx}
    shown = [s for s in splits if s != "dev"]

    def label(i: int, cats: list[str]) -> bool:
        return any(c in items[i]["labels"] for c in cats)

    def flagged(i: int, cats: list[str]) -> bool:
        return any(results[i]["categories"][c] for c in cats)

    def score(i: int, cats: list[str]) -> float:
        return max(results[i]["category_scores"][c] for c in cats)

    dev = splits.get("dev", [])
    rows = [(g, cs) for g, cs in GROUPS.items()]
    rows += [(c, [c]) for c in CATEGORIES if "/" in c]
    head = "".join(f" | P {s} | R {s} | F1 {s}" for s in shown)
    print(f"| group / category | support {'/'.join(splits)} | F1 dev{head} "
          "| F1-best thresholds on dev (F1) | Brier | mean score +/- |")
    print("|---" * (6 + 3 * len(shown)) + "|")
    for name, cats in rows:
        cells = [f"{prf([(label(i, cats), flagged(i, cats)) for i in dev])[2]:.2f}" if dev else "-"]
        for s in shown:
            p, r, f, _ = prf([(label(i, cats), flagged(i, cats)) for i in splits[s]])
            cells += [f"{p:.2f}", f"{r:.2f}", f"{f:.2f}"]
        support = "/".join(str(sum(label(i, cats) for i in idx)) for idx in splits.values())
        lo, hi, f1 = best_thresholds([(label(i, cats), score(i, cats)) for i in dev])
        best = f"({lo:.2f}, {hi:.2f}] ({f1:.2f})" if dev else "-"
        scored = [(label(i, cats), score(i, cats)) for i in range(len(items))]
        brier = statistics.fmean((s - (1.0 if y else 0.0)) ** 2 for y, s in scored)
        pos = statistics.fmean([s for y, s in scored if y] or [0.0])
        neg = statistics.fmean([s for y, s in scored if not y] or [0.0])
        print(f"| {name} | {support} | " + " | ".join(cells)
              + f" | {best} | {brier:.3f} | {pos:.2f} / {neg:.2f} |")
    for s, idx in splits.items():
        p, r, f, n = prf([(bool(items[i]["labels"]), results[i]["flagged"]) for i in idx])
        print(f"\n`flagged` (any category), {s} ({len(idx)} texts: {n} harmful, "
              f"{len(idx) - n} benign): precision {p:.2f}, recall {r:.2f}, F1 {f:.2f}")
    if fit and dev:
        pairs = [(c in items[i]["labels"], results[i]["category_scores"][c])
                 for i in dev for c in CATEGORIES]
        a, b = fit_logistic(pairs)
        print(f"\nLogistic fit on dev (all categories): a = {a:.3f}, b = {b:.3f}")
        print("Per category, F1-best threshold range on dev (F1), positives:")
        for c in CATEGORIES:
            cp = [(c in items[i]["labels"], results[i]["category_scores"][c]) for i in dev]
            lo, hi, f1 = best_thresholds(cp)
            print(f"  {c}: ({lo:.4f}, {hi:.4f}] ({f1:.2f}), {sum(y for y, _ in cp)}")
    print("\nBy kind (texts with at least one wrong group):")
    for kind in sorted({it["kind"] for it in items}):
        idx = [i for i, it in enumerate(items) if it["kind"] == kind]
        wrong = [i for i in idx
                 if any(label(i, cs) != flagged(i, cs) for cs in GROUPS.values())]
        print(f"- {kind}: {len(idx) - len(wrong)}/{len(idx)} right")
        for i in wrong:
            missed = [g for g, cs in GROUPS.items() if label(i, cs) and not flagged(i, cs)]
            extra = [g for g, cs in GROUPS.items() if flagged(i, cs) and not label(i, cs)]
            print(f"    [{items[i]['split']}] {items[i]['text'][:70]!r}: missed {missed}, "
                  f"false {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrum-bin", default="target/debug/ferrum")
    ap.add_argument("--base-url", help="an already running server (else one is started)")
    ap.add_argument("--classifier", choices=["lexical", "judge"], default="lexical")
    ap.add_argument("--judge-tier", default="gpt-4.1-mini")
    ap.add_argument("--model", help="the moderation model sent (default: text-moderation-latest "
                    "for the lexical classifier, omni-moderation-latest for the judge)")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--chunk", type=int, default=16, help="texts per request")
    ap.add_argument("--latency-sample", type=int, default=12,
                    help="single-text requests timed for the judge")
    ap.add_argument("--fit", action="store_true", help="print calibration and threshold fits")
    args = ap.parse_args()
    judge = args.classifier == "judge"
    model = args.model or ("omni-moderation-latest" if judge else "text-moderation-latest")
    wanted = args.splits.split(",")
    items = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    items = [it for it in items if it["split"] in wanted]
    texts = [it["text"] for it in items]
    proc = None
    base = args.base_url
    if base is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench-moderation-"))
        config = judge_config(args.ferrum_bin, args.judge_tier) if judge else LAZY_CONFIG
        (workdir / "ferrum.toml").write_text(config)
        proc, base = start_server(args.ferrum_bin, workdir,
                                  ["--config", str(workdir / "ferrum.toml")])
    try:
        with httpx.Client(base_url=base, timeout=3600) as http:
            classify_all(http, model, texts[:4], args.chunk)  # warms up
            results, wall = classify_all(http, model, texts, args.chunk)
            timed = texts[:args.latency_sample] if judge else texts
            singles = single_latencies(http, model, timed)
        print(f"{args.classifier} classifier ({model}"
              + (f", judge tier {args.judge_tier}" if judge else "") + f"), {len(texts)} texts\n")
        report(items, results, args.fit)
        print(f"\nLatency: {len(texts)} texts in requests of {args.chunk}: {wall:.1f} s, "
              f"{wall / len(texts) * 1000:.1f} ms per text; one text per request "
              f"({len(singles)} texts) median {statistics.median(singles):.1f} ms, "
              f"max {max(singles):.1f} ms (HTTP round trip included)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
