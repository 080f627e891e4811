"""Distillation on one platform, through the official openai SDK against a ferrum server:

1. the teacher (gpt-4.1) answers the training tickets with `store=True` and `metadata`;
2. an eval measures the student (gpt-4.1-nano) and the teacher on held-out tickets;
3. the stored completions, listed by their metadata, become a training file, and a
   fine-tuning job trains the student on them;
4. the same eval on the `ft:` model shows what it gained.

Every step is an OpenAI API call (Chat Completions, stored completions, Files, Fine-tuning,
Evals), so the same script runs against api.openai.com with the same model ids. The task is
extracting four fields from short support tickets into a fixed JSON shape (tickets.py); the
eval grades each field of the model's JSON (`sample.output_json`) against the ticket's true
fields, which neither model sees.

    ferrum serve &    # or: cargo run --release -- serve
    python examples/distill/distill.py --base-url http://127.0.0.1:8080/v1

It prints each step's progress and a table of held-out scores, and writes them as JSON with
`--out`. On a 2-core CPU it takes about half an hour, most of it the fine-tuning job.
"""

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tickets  # noqa: E402

FIELDS = ["name", "order_id", "product", "category"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def messages_for(ticket_text: str) -> list[dict]:
    return [{"role": "system", "content": tickets.SYSTEM}, {"role": "user", "content": ticket_text}]


def teacher_answers(client: OpenAI, teacher: str, train: list[dict], tag: str,
                    concurrency: int) -> None:
    """Step 1: the teacher answers every training ticket; each answer is stored with metadata
    naming this run, so it can be found again (and only it) in step 3."""
    done = 0

    def answer(t: dict) -> None:
        client.chat.completions.create(
            model=teacher, messages=messages_for(t["ticket"]), temperature=0,
            max_completion_tokens=100, response_format=tickets.RESPONSE_FORMAT,
            store=True, metadata={"example": "distill", "run": tag},
        )

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(answer, train):
            done += 1
            if done % 20 == 0 or done == len(train):
                log(f"  teacher answered {done}/{len(train)}")


def training_file(client: OpenAI, teacher: str, tag: str, path: Path) -> int:
    """Step 3a: the stored completions of this run (listed by metadata) as chat examples: the
    request's messages and the teacher's answer. Returns how many."""
    lines = []
    for stored in client.chat.completions.list(model=teacher, metadata={"run": tag}, limit=100):
        request = [{"role": m.role, "content": m.content}
                   for m in client.chat.completions.messages.list(stored.id, limit=100)]
        answer = stored.choices[0].message.content
        lines.append(json.dumps({"messages": request + [{"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def create_eval(client: OpenAI) -> str:
    """Step 2a: one string check per field of the model's JSON against the ticket's truth. The
    product passes when the answer contains it (case aside), so "Wireless earbuds" counts."""
    item_schema = {"type": "object", "properties": {k: {"type": "string"}
                                                    for k in ["ticket", *FIELDS]},
                   "required": ["ticket", *FIELDS]}
    criteria = [{"type": "string_check", "name": field,
                 "input": f"{{{{sample.output_json.{field}}}}}",
                 "reference": f"{{{{item.{field}}}}}",
                 "operation": "ilike" if field == "product" else "eq"} for field in FIELDS]
    ev = client.evals.create(
        name="support-ticket fields",
        data_source_config={"type": "custom", "item_schema": item_schema,
                            "include_sample_schema": True},
        testing_criteria=criteria,
        metadata={"example": "distill"},
    )
    return ev.id


def run_eval(client: OpenAI, eval_id: str, model: str, heldout: list[dict]) -> dict:
    """Step 2b/4: the model answers the held-out tickets inside an eval run (background work,
    billed at the batch price); returns the scores once the run completes."""
    run = client.evals.runs.create(
        eval_id, name=model,
        data_source={
            "type": "completions",
            "model": model,
            "input_messages": {"type": "template", "template": [
                {"role": "system", "content": tickets.SYSTEM},
                {"role": "user", "content": "{{item.ticket}}"}]},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 100,
                                "response_format": tickets.RESPONSE_FORMAT},
            "source": {"type": "file_content", "content": [{"item": t} for t in heldout]},
        },
    )
    last = None
    while run.status in ("queued", "in_progress"):
        time.sleep(3)
        run = client.evals.runs.retrieve(run.id, eval_id=eval_id)
        counts = run.result_counts
        done = counts.passed + counts.failed + counts.errored
        if done != last:
            log(f"  {model}: graded {done}/{len(heldout)}")
            last = done
    if run.status != "completed":
        raise SystemExit(f"eval run {run.id} ended {run.status}: {run.error}")
    # A criterion's id is its name and a suffix; an item whose answer is no JSON (cut at
    # max_tokens) errors in every criterion and counts here as wrong.
    counts = run.result_counts
    per_field = {}
    for r in run.per_testing_criteria_results:
        field = next(f for f in FIELDS if r.testing_criteria.startswith(f + "-"))
        per_field[field] = r.passed / counts.total
    return {"model": model, "run": run.id, "all_fields": counts.passed / counts.total,
            "per_field": per_field, "report_url": run.report_url}


def fine_tune(client: OpenAI, student: str, path: Path, epochs: int, tag: str) -> str:
    """Step 3b: upload the training file and train the student on it; returns the `ft:` id."""
    with path.open("rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=student, training_file=upload.id, suffix="tickets",
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": epochs}}},
        metadata={"example": "distill", "run": tag},
    )
    log(f"  job {job.id} created")
    seen = set()
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(10)
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        for e in reversed(events):
            if e.id not in seen:
                seen.add(e.id)
                log(f"  {e.message}")
    if job.status != "succeeded":
        raise SystemExit(f"fine-tuning job {job.id} ended {job.status}: {job.error}")
    return job.fine_tuned_model


def table(rows: list[dict]) -> str:
    head = "| model | all four fields | " + " | ".join(FIELDS) + " |"
    lines = [head, "|" + "---|" * (len(FIELDS) + 2)]
    for r in rows:
        cells = [f"{100 * r['per_field'].get(f, 0):.0f}%" for f in FIELDS]
        lines.append(f"| {r['label']} | {100 * r['all_fields']:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--teacher", default="gpt-4.1")
    parser.add_argument("--student", default="gpt-4.1-nano")
    parser.add_argument("--train", type=int, default=120, help="training tickets")
    parser.add_argument("--heldout", type=int, default=50, help="held-out tickets")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the scores here as JSON")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=600)
    train, heldout = tickets.split(args.train, args.heldout, args.seed)
    tag = uuid.uuid4().hex[:12]
    started = time.time()

    log(f"1. {args.teacher} answers {len(train)} training tickets (stored, run={tag})")
    teacher_answers(client, args.teacher, train, tag, args.concurrency)

    log(f"2. an eval of {len(heldout)} held-out tickets: {args.student} and {args.teacher}")
    eval_id = create_eval(client)
    base = run_eval(client, eval_id, args.student, heldout)
    teacher = run_eval(client, eval_id, args.teacher, heldout)

    log("3. the stored completions become a training file; a fine-tuning job trains the student")
    path = Path(tempfile.mkdtemp()) / "distill-train.jsonl"
    n = training_file(client, args.teacher, tag, path)
    log(f"  {n} examples in {path}")
    tuned_model = fine_tune(client, args.student, path, args.epochs, tag)
    log(f"  trained {tuned_model}")

    log(f"4. the same eval on {tuned_model}")
    tuned = run_eval(client, eval_id, tuned_model, heldout)

    base["label"] = f"{args.student} (base)"
    teacher["label"] = f"{args.teacher} (teacher)"
    tuned["label"] = f"{args.student} distilled"
    rows = [base, teacher, tuned]
    print()
    print(table(rows))
    print(f"\neval {eval_id}; {len(train)} training and {len(heldout)} held-out tickets "
          f"(seed {args.seed}), {args.epochs} epochs; {time.time() - started:.0f} s in all")
    if args.out:
        args.out.write_text(json.dumps({"eval": eval_id, "rows": rows, "train": len(train),
                                        "heldout": len(heldout), "seed": args.seed,
                                        "epochs": args.epochs,
                                        "seconds": round(time.time() - started)}, indent=2))


if __name__ == "__main__":
    main()
