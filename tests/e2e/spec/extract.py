#!/usr/bin/env python3
"""Writes openai-schemas.json: the response schemas of the operations ferrum implements, cut
from OpenAI's OpenAPI description (github.com/openai/openai-openapi, MIT licensed), so the e2e
tests validate every 2xx body against the spec without the 3 MB YAML (and without PyYAML).

    python3 tests/e2e/spec/extract.py path/to/openapi.yaml [commit]

The output holds, per operation ("POST /v1/chat/completions"), the schema name of each 2xx
content type, and `components.schemas` with every schema those reach through `$ref`.
"""

import json
import sys
from pathlib import Path

import yaml

# The operations ferrum serves (its paths, the spec's path templates).
OPERATIONS = {
    ("get", "/models"), ("get", "/models/{model}"),
    ("post", "/chat/completions"), ("get", "/chat/completions"),
    ("get", "/chat/completions/{completion_id}"), ("post", "/chat/completions/{completion_id}"),
    ("delete", "/chat/completions/{completion_id}"),
    ("get", "/chat/completions/{completion_id}/messages"),
    ("post", "/files"), ("get", "/files"), ("get", "/files/{file_id}"),
    ("delete", "/files/{file_id}"),
    ("post", "/batches"), ("get", "/batches"), ("get", "/batches/{batch_id}"),
    ("post", "/batches/{batch_id}/cancel"),
    ("post", "/responses"), ("get", "/responses/{response_id}"),
    ("post", "/responses/{response_id}/cancel"), ("get", "/responses/{response_id}/input_items"),
}


def refs(node, out: set[str]) -> None:
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/components/schemas/"):
            out.add(r.rsplit("/", 1)[1])
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def main() -> None:
    spec = yaml.safe_load(Path(sys.argv[1]).read_text())
    schemas = spec["components"]["schemas"]
    operations = {}
    todo: set[str] = set()
    for method, path in sorted(OPERATIONS):
        op = spec["paths"][path][method]
        for status, response in op["responses"].items():
            if not str(status).startswith("2"):
                continue
            for ctype, content in (response.get("content") or {}).items():
                ref = (content.get("schema") or {}).get("$ref")
                if ref:
                    name = ref.rsplit("/", 1)[1]
                    operations.setdefault(f"{method.upper()} /v1{path}", {})[ctype] = name
                    todo.add(name)
    keep: dict = {}
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        found: set[str] = set()
        refs(schemas[name], found)
        todo |= found - keep.keys()
    out = {
        "source": "openai/openai-openapi openapi.yaml"
                  + (f" at {sys.argv[2]}" if len(sys.argv) > 2 else "") + " (MIT)",
        "operations": operations,
        "components": {"schemas": dict(sorted(keep.items()))},
    }
    dest = Path(__file__).with_name("openai-schemas.json")
    dest.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"{dest}: {len(operations)} operations, {len(keep)} schemas, {dest.stat().st_size} bytes")


if __name__ == "__main__":
    main()
