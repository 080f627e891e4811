"""Teach a small model to end an agent's tool loop: after a tool's result it should answer in
text, not call the same tool again (what Qwen2.5-Coder-0.5B, gpt-4.1-mini's default weights,
does with p ~ 1).

1. Synthetic transcripts over five tools (a user question, the assistant's call, the tool's
   result, the assistant's answer quoting it) become a fine-tuning file with `tools` on each
   line, OpenAI's format for function-calling fine-tunes.
2. A fine-tuning job tunes the model (LoRA) on them.
3. The openai-agents loop (first turn `tool_choice: "required"`, then "auto" until a text
   answer, at most 4 turns) runs on held-out questions over two *other* tools, on the base
   model and on the `ft:` model: how many loops end in text, and how many answers quote the
   tool's result.

    ferrum serve &
    python examples/tool-loop/tune.py --base-url http://127.0.0.1:8080/v1
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from openai import OpenAI


def fn(name: str, description: str, properties: dict) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties), "additionalProperties": False}}}


S = {"type": "string"}
N = {"type": "number"}
# Tools of the training transcripts.
TRAIN_TOOLS = [
    fn("get_stock_price", "Latest price of a stock", {"ticker": S}),
    fn("lookup_order", "Status of a customer order", {"order_id": S}),
    fn("add", "Add two numbers", {"a": N, "b": N}),
    fn("get_population", "Population of a country", {"country": S}),
    fn("translate", "Translate a word into French", {"word": S}),
]
# Held-out tools: those of tests/e2e/test_tools.py.
TEST_TOOLS = [
    fn("get_weather", "Weather in a city", {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["c", "f"]}}),
    fn("get_time", "Current time", {"tz": {"type": "string", "enum": ["UTC", "CET"]}}),
]


def training_case(rng: random.Random) -> tuple[str, str, dict, str, str]:
    """(question, tool, arguments, tool result, final answer) for one training transcript."""
    kind = rng.randrange(5)
    if kind == 0:
        t = rng.choice(["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "GOOG"])
        p = f"{rng.uniform(50, 900):.2f}"
        return (rng.choice([f"What is {t} trading at?", f"Price of {t} stock?",
                            f"How much is one share of {t} right now?"]),
                "get_stock_price", {"ticker": t}, f"{t}: {p} USD",
                f"{t} is trading at {p} USD.")
    if kind == 1:
        o = f"{rng.choice('ABCDEFGH')}{rng.randint(1000, 9999)}"
        s = rng.choice(["shipped", "delivered", "processing", "out for delivery"])
        return (rng.choice([f"Where is my order {o}?", f"Can you check order {o}?",
                            f"What's the status of {o}?"]),
                "lookup_order", {"order_id": o}, f"Order {o}: {s}",
                f"Your order {o} is {s}.")
    if kind == 2:
        a, b = rng.randint(2, 9999), rng.randint(2, 9999)
        return (rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.",
                            f"Compute {a} + {b}."]),
                "add", {"a": a, "b": b}, str(a + b), f"{a} + {b} = {a + b}.")
    if kind == 3:
        c, n = rng.choice([("Peru", "34 million"), ("Norway", "5.5 million"),
                           ("Kenya", "55 million"), ("Chile", "19 million"),
                           ("Japan", "124 million"), ("Canada", "40 million")])
        return (rng.choice([f"How many people live in {c}?", f"Population of {c}?"]),
                "get_population", {"country": c}, f"{c}: {n}",
                f"About {n} people live in {c}.")
    w, f = rng.choice([("cat", "chat"), ("house", "maison"), ("water", "eau"),
                       ("book", "livre"), ("tree", "arbre"), ("sun", "soleil")])
    return (rng.choice([f"How do you say '{w}' in French?", f"Translate {w} to French."]),
            "translate", {"word": w}, f, f"'{w}' in French is '{f}'.")


def transcripts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        question, tool, args, result, answer = training_case(rng)
        call_id = f"call_{i:04d}"
        lines.append(json.dumps({"tools": TRAIN_TOOLS, "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": tool, "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer},
        ]}))
    return lines


HELD_OUT = [
    ("What is the weather in Paris?", "18"),
    ("Is it warm in Tokyo right now? Use celsius.", "18"),
    ("What's the weather like in London, in fahrenheit?", "18"),
    ("What time is it in UTC?", "14:05"),
    ("Tell me the current time in CET.", "14:05"),
]


def run_tool(name: str, arguments: str) -> str:
    args = json.loads(arguments)
    if name == "get_weather":
        return f"It is 18 degrees ({args['unit'].upper()}) and sunny in {args['city']}."
    return f"It is 14:05 {args['tz']}."


def agents_loop(client: OpenAI, model: str, question: str) -> tuple[bool, str]:
    """The openai-agents loop: whether it ended in text within 4 turns, and that text."""
    messages = [{"role": "user", "content": question}]
    tool_choice = "required"
    for _ in range(4):
        choice = client.chat.completions.create(
            model=model, messages=messages, tools=TEST_TOOLS, tool_choice=tool_choice,
            max_tokens=80, temperature=0).choices[0]
        if not choice.message.tool_calls:
            return True, choice.message.content or ""
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            c.model_dump() for c in choice.message.tool_calls]})
        for call in choice.message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": run_tool(call.function.name, call.function.arguments)})
        tool_choice = "auto"
    return False, ""


def score(client: OpenAI, model: str) -> dict:
    ended = quoted = 0
    for question, fact in HELD_OUT:
        done, text = agents_loop(client, model, question)
        ended += done
        quoted += done and fact in text
        print(f"  {model}: {question!r} -> {'text: ' + repr(text) if done else 'no text in 4 turns'}",
              flush=True)
    return {"model": model, "ended_in_text": ended, "quoted_result": quoted,
            "questions": len(HELD_OUT)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default="gpt-4.1-mini")
    parser.add_argument("--examples", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=600)
    started = time.time()

    path = Path(tempfile.mkdtemp()) / "tool-loop.jsonl"
    path.write_text("\n".join(transcripts(args.examples, args.seed)) + "\n")
    with path.open("rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=args.model, training_file=upload.id, suffix="toolloop",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": args.epochs}}})
    print(f"job {job.id}: {args.examples} transcripts, {args.epochs} epochs", flush=True)
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(15)
        job = client.fine_tuning.jobs.retrieve(job.id)
        last = list(client.fine_tuning.jobs.list_events(job.id, limit=1))
        print(f"  {job.status}: {last[0].message if last else ''}", flush=True)
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} ended {job.status}: {job.error}")

    rows = [score(client, args.model), score(client, job.fine_tuned_model)]
    print("\n| model | loops ending in text | answers quoting the tool's result |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ended_in_text']}/{r['questions']} | "
              f"{r['quoted_result']}/{r['questions']} |")
    print(f"\n{time.time() - started:.0f} s in all")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "examples": args.examples,
                                        "epochs": args.epochs}, indent=2))


if __name__ == "__main__":
    main()
