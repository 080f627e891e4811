#!/usr/bin/env python3
"""A user-sized fine-tuning job through the API, measured: how long it takes, what it learns,
and what interactive requests feel while it trains.

Starts `ferrum serve` on one tier (default nano), generates a toy task (classify a one-line
review as positive or negative, answering one word; the generator of
crates/ferrum-train/tests/reference), and with the official openai SDK:
1. scores the base model on held-out reviews (greedy, exact match of the label);
2. measures time to first token of short streamed chats on an idle server;
3. uploads the training and validation files and creates a job with default hyperparameters,
   sending a short streamed chat every few seconds while it runs (their TTFT);
4. reports the job's duration, trained tokens, per-epoch train and validation loss;
5. scores the fine-tuned `ft:` model on the same held-out reviews.

    target/e2e-venv/bin/python scripts/bench_finetune.py --ferrum-bin target/release/ferrum
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402

SYSTEM = "Classify the sentiment of the review. Answer with one word: positive or negative."
POS = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "fantastic",
       "charming", "brilliant", "pleasant"]
NEG = ["terrible", "awful", "boring", "dreadful", "poor", "disappointing", "horrible", "dull",
       "broken", "annoying"]
THINGS = ["movie", "pizza", "hotel", "phone", "book", "concert", "laptop", "game", "restaurant",
          "jacket", "class", "trip"]
FORMS = ["The {t} was {a}.", "What a {a} {t}!", "I found the {t} {a}.",
         "Honestly, this {t} is {a}.", "My {t} turned out {a}."]


def review(rng: random.Random, label: str) -> str:
    adj = rng.choice(POS if label == "positive" else NEG)
    return rng.choice(FORMS).format(t=rng.choice(THINGS), a=adj)


def task(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        out.append((review(rng, label), label))
    return out


def chat(text: str, label: str | None = None) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    if label is not None:
        msgs.append({"role": "assistant", "content": label})
    return {"messages": msgs}


def accuracy(client: openai.OpenAI, model: str, test: list[tuple[str, str]]) -> float:
    right = 0
    for text, label in test:
        r = client.chat.completions.create(model=model, messages=chat(text)["messages"],
                                           temperature=0, max_tokens=4)
        right += (r.choices[0].message.content or "").strip().lower().rstrip(".") == label
    return right / len(test)


def ttft(client: openai.OpenAI, model: str, i: int) -> float:
    t = time.monotonic()
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": f"Say hello to visitor number {i}."}])
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - t
    return first if first is not None else float("nan")


def upload(client: openai.OpenAI, lines: list[dict], name: str) -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.files.create(file=(name, data), purpose="fine-tune").id


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrum-bin", type=Path, required=True)
    ap.add_argument("--model", default="gpt-4.1-nano")
    ap.add_argument("--gguf", type=Path, help="the tier's weights (default: `ferrum pull`)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", type=int, default=40, help="training examples")
    ap.add_argument("--valid", type=int, default=10, help="validation examples")
    ap.add_argument("--test", type=int, default=60, help="held-out reviews scored")
    ap.add_argument("--probe-every", type=float, default=5.0,
                    help="seconds between interactive requests while the job runs")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)

    rng = random.Random(1)
    train, valid = task(rng, args.train), task(rng, args.valid)
    test = task(random.Random(7), args.test)
    gguf = (args.gguf or bs.default_gguf(args)).resolve()
    with tempfile.TemporaryDirectory(prefix="ferrum-ft-") as tmp:
        server = bs.FerrumServer(args.ferrum_bin, gguf, args.model, args.threads, Path(tmp),
                                 300.0, [])
        try:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                                   timeout=600, max_retries=0)
            base_acc = accuracy(client, args.model, test)
            idle = [ttft(client, args.model, i) for i in range(5)]
            train_id = upload(client, [chat(t, l) for t, l in train], "train.jsonl")
            valid_id = upload(client, [chat(t, l) for t, l in valid], "valid.jsonl")
            t0 = time.monotonic()
            job = client.fine_tuning.jobs.create(model=args.model, training_file=train_id,
                                                 validation_file=valid_id, suffix="sentiment")
            busy: list[float] = []
            while job.status not in ("succeeded", "failed", "cancelled"):
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"job still {job.status} after {args.timeout} s")
                if job.status == "running":
                    busy.append(ttft(client, args.model, len(busy)))
                time.sleep(args.probe_every)
                job = client.fine_tuning.jobs.retrieve(job.id)
            took = time.monotonic() - t0
            if job.status != "succeeded":
                raise SystemExit(f"job {job.status}: {job.error}")
            ckpts = sorted(client.fine_tuning.jobs.checkpoints.list(job.id, limit=100),
                           key=lambda c: c.step_number)
            tuned_acc = accuracy(client, job.fine_tuned_model, test)
        finally:
            server.stop()
    hp = job.method.supervised.hyperparameters if job.method and job.method.supervised else None
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"## Fine-tuning {args.model} through the API\n")
    print(f"{args.train} training and {args.valid} validation chats; hyperparameters "
          f"{hp.model_dump() if hp else '?'}; {job.trained_tokens} trained tokens; "
          f"job created -> succeeded in {took:.1f} s ({job.trained_tokens / took:.1f} trained "
          f"tokens/s overall)\n")
    print("| epoch (step) | train loss | train token accuracy | validation loss | "
          "validation token accuracy |")
    print("|---|---|---|---|---|")
    for i, c in enumerate(ckpts):
        m = c.metrics
        print(f"| {i + 1} ({c.step_number}) | {m.train_loss:.4f} | "
              f"{m.train_mean_token_accuracy:.3f} | {m.full_valid_loss:.4f} | "
              f"{m.full_valid_mean_token_accuracy:.3f} |")
    print(f"\nHeld-out reviews ({args.test}, exact label): base {args.model} "
          f"{base_acc:.1%}, `{job.fine_tuned_model}` {tuned_acc:.1%}\n")
    print(f"Interactive TTFT (8-token streamed chats): idle median {med(idle) * 1000:.0f} ms; "
          f"during the job median {med(busy) * 1000:.0f} ms, max "
          f"{max(busy, default=float('nan')) * 1000:.0f} ms over {len(busy)} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
