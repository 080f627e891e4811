"""Decode speed with and without a JSON Schema constraint, through `ferrum serve` (one stream).

Usage: target/e2e-venv/bin/python scripts/bench_constraint.py FERRUM_BIN GGUF MODEL_ID BAN_IDS
  e.g. ... target/release/ferrum ~/.cache/ferrum/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
           gpt-4.1-mini 151643,151645
Starts a server on the GGUF (2 threads), warms up, then alternates plain and constrained
requests (128 tokens, greedy, end-of-generation tokens banned) five times each and prints the
median decode tokens/s of each (from the gaps between streamed chunks) and the slowdown.
"""
import json, statistics, subprocess, sys, tempfile, time, re, os
import httpx

binary, gguf, model, ban = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
tmp = tempfile.mkdtemp()
cfg = os.path.join(tmp, "ferrum.toml")
open(cfg, "w").write(f'[[tier]]\nid = "{model}"\nprice = {{ input = 0.4, cached_input = 0.1, output = 1.6 }}\nweights = {{ path = "{gguf}" }}\n')
p = subprocess.Popen([binary, "serve", "--config", cfg, "--addr", "127.0.0.1:0", "--database", f"sqlite://{tmp}/b.db", "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
port = int(re.search(r":(\d+)$", p.stdout.readline().strip()).group(1))
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"], "additionalProperties": False}
bias = {t: -100 for t in ban.split(",")}
def run(constrained, i):
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell story number {i} about a lighthouse, as JSON."}],
            "max_tokens": 128, "temperature": 0, "stream": True, "logit_bias": bias}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    times = []
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    return len(gaps) / sum(gaps)
try:
    run(False, 0); run(True, 0)
    plain, cons = [], []
    for i in range(1, 6):
        plain.append(run(False, i)); cons.append(run(True, i))
    mp, mc = statistics.median(plain), statistics.median(cons)
    print(f"{model}: decode tok/s plain {mp:.1f} (runs {', '.join(f'{x:.1f}' for x in plain)}), with JSON Schema {mc:.1f} (runs {', '.join(f'{x:.1f}' for x in cons)}); slowdown {100*(1-mc/mp):.1f}%")
finally:
    p.terminate(); p.wait()
