#!/usr/bin/env python3
"""Fuzzes ferrum's implemented OpenAI operations with schemathesis, against the spec.

Starts `ferrum serve` with every tier on a tiny random-weight model (so any request the fuzzer
makes is answered in moments: the answers are noise, but every path of the API runs), then runs
`schemathesis run` over `tests/e2e/spec/openai-schemas.json` (the implemented operations, cut
from OpenAI's OpenAPI description by `tests/e2e/spec/extract.py`). The checks: no 5xx, every
response's content type and headers as the operation documents them, and every body valid
against its schema (errors included: `{"error": {...}}`). Status codes are not checked against
the spec: it documents only the 200 of most operations, while the API answers bad requests with
400/404 as OpenAI does. Exit status: schemathesis's (0 when every check passed).

    scripts/fuzz_spec.py --ferrum-bin target/release/ferrum [--max-examples 50]

Needs `schemathesis` (pip install schemathesis==4.32.5) and cargo (to write the tiny model).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402

SPEC = bs.REPO_ROOT / "tests/e2e/spec/openai-schemas.json"
TIERS = ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"]
CHECKS = ("not_a_server_error,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrum-bin", type=Path, default=bs.REPO_ROOT / "target/release/ferrum")
    ap.add_argument("--schemathesis", default=shutil.which("schemathesis") or "schemathesis")
    ap.add_argument("--max-examples", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args, rest = ap.parse_known_args()

    work = Path(tempfile.mkdtemp(prefix="ferrum-fuzz-"))
    tiny = work / "tiny.gguf"
    subprocess.run(["cargo", "run", "-q", "--release", "-p", "ferrum-engine", "--example",
                    "tiny_gguf", "--", str(tiny)], check=True, cwd=bs.REPO_ROOT)
    # Every tier (and dated alias) the spec's examples name runs on the tiny model.
    config = "".join(
        "[[tier]]\n"
        f'id = "{tier}"\n'
        f'aliases = ["{tier}-2025-04-14"]\n'
        "price = { input = 0.1, cached_input = 0.025, output = 0.4 }\n"
        f'weights = {{ path = "{tiny}" }}\n'
        for tier in TIERS)
    server = bs.FerrumServer(args.ferrum_bin, tiny, TIERS[0], args.threads, work, 120.0,
                             ["--api-key", "sk-fuzz"], config_text=config)
    try:
        cmd = [args.schemathesis, "run", str(SPEC),
               "--url", server.base_url.rstrip("/") + "/v1",
               "--header", "Authorization: Bearer sk-fuzz",
               "--checks", CHECKS,
               "--max-examples", str(args.max_examples),
               "--workers", str(args.workers),
               "--seed", str(args.seed),
               "--request-timeout", "120",
               *rest]
        print("$", " ".join(cmd), flush=True)
        # Run in the scratch folder: schemathesis writes its state (.schemathesis/) there.
        return subprocess.run(cmd, cwd=work).returncode
    finally:
        server.stop()
        print(f"server log: {server.log_path}")


if __name__ == "__main__":
    sys.exit(main())
