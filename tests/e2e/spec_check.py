"""Every 2xx JSON body the e2e tests receive is validated against OpenAI's OpenAPI response
schema of its operation (spec/openai-schemas.json, cut from the spec by spec/extract.py, which
also mends the spec's few self-contradictions, listed there as SPEC_GAPS).

`check_response` is an httpx response hook: the test clients (raw httpx and the SDK's) carry
it, so a body that pleases the SDK but not the spec (a null where the spec wants a string, an
enum value it does not list, a missing required field) fails the test that received it.
Streamed bodies (text/event-stream) are checked event by event with `check_stream_event`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import httpx
import jsonschema

def _nullable(node):
    """The spec is OpenAPI 3.1 but still marks many fields `nullable: true` (3.0's keyword),
    which JSON Schema ignores: such a schema becomes `anyOf: [itself, null]`."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


SPEC = json.loads((Path(__file__).parent / "spec" / "openai-schemas.json").read_text())
SPEC["components"] = _nullable(SPEC["components"])


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


# Literal paths before templated ones, so /v1/chat/completions/{id} does not take a literal.
_OPERATIONS = sorted(
    ((key.split(" ", 1)[0], _template_regex(key.split(" ", 1)[1]), types)
     for key, types in SPEC["x-operations"].items()),
    key=lambda op: op[1].pattern.count("[^/]+"),
)


def schema_of(method: str, path: str, content_type: str) -> str | None:
    for m, regex, types in _OPERATIONS:
        if m == method and regex.match(path):
            return types.get(content_type)
    return None


@functools.cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    )


def problems(name: str, body) -> list[str]:
    errors = sorted(validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors[:5]:
        # For anyOf/oneOf failures the most specific branch error says more.
        best = jsonschema.exceptions.best_match([e]) if e.context else e
        where = "/".join(str(p) for p in best.absolute_path) or "(root)"
        out.append(f"at {where}: {best.message[:300]}")
    return out


class SpecViolation(AssertionError):
    pass


def check_response(response: httpx.Response) -> None:
    if not 200 <= response.status_code < 300:
        return
    ctype = response.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "application/json":
        return
    name = schema_of(response.request.method, response.request.url.path, ctype)
    if name is None:
        return
    response.read()
    body = response.json()
    found = problems(name, body)
    if found:
        raise SpecViolation(
            f"{response.request.method} {response.request.url.path}: the body does not match "
            f"the spec's {name}:\n  " + "\n  ".join(found) + f"\nbody: {json.dumps(body)[:1500]}"
        )


def check_stream_event(method: str, path: str, event: dict) -> None:
    """Validates one `data:` event of a stream against the operation's event-stream schema."""
    name = schema_of(method, path, "text/event-stream")
    assert name, f"no event-stream schema for {method} {path}"
    found = problems(name, event)
    if found:
        raise SpecViolation(
            f"{method} {path}: a stream event does not match the spec's {name}:\n  "
            + "\n  ".join(found) + f"\nevent: {json.dumps(event)[:1500]}"
        )


HOOKS = {"response": [check_response]}
