#!/usr/bin/env python3
"""Writes openai-schemas.json: the operations ferrum implements, cut from OpenAI's OpenAPI
description (github.com/openai/openai-openapi, MIT licensed), so the e2e tests validate every
2xx body against the spec, and schemathesis fuzzes those operations, without the 3 MB YAML
(and without PyYAML).

    python3 tests/e2e/spec/extract.py path/to/openapi.yaml [commit]

The output is itself an OpenAPI 3.1 document: `paths` with the implemented operations as the
spec describes them (requests and responses), `components` with everything those reach through
`$ref`, and `x-operations`, per operation ("POST /v1/chat/completions"), the schema name of each
2xx content type (what `spec_check.py` reads).
"""

import copy
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
    ("delete", "/models/{model}"),
    ("post", "/fine_tuning/jobs"), ("get", "/fine_tuning/jobs"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/pause"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/resume"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("post", "/evals"), ("get", "/evals"), ("get", "/evals/{eval_id}"),
    ("post", "/evals/{eval_id}"), ("delete", "/evals/{eval_id}"),
    ("post", "/evals/{eval_id}/runs"), ("get", "/evals/{eval_id}/runs"),
    ("get", "/evals/{eval_id}/runs/{run_id}"), ("post", "/evals/{eval_id}/runs/{run_id}"),
    ("delete", "/evals/{eval_id}/runs/{run_id}"),
    ("get", "/evals/{eval_id}/runs/{run_id}/output_items"),
    ("get", "/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"),
    ("post", "/embeddings"),
    ("post", "/moderations"),
    ("get", "/organization/projects"), ("post", "/organization/projects"),
    ("get", "/organization/projects/{project_id}"),
    ("post", "/organization/projects/{project_id}"),
    ("post", "/organization/projects/{project_id}/archive"),
    ("get", "/organization/projects/{project_id}/service_accounts"),
    ("post", "/organization/projects/{project_id}/service_accounts"),
    ("get", "/organization/projects/{project_id}/service_accounts/{service_account_id}"),
    ("delete", "/organization/projects/{project_id}/service_accounts/{service_account_id}"),
    ("get", "/organization/projects/{project_id}/api_keys"),
    ("get", "/organization/projects/{project_id}/api_keys/{api_key_id}"),
    ("delete", "/organization/projects/{project_id}/api_keys/{api_key_id}"),
    ("get", "/organization/projects/{project_id}/rate_limits"),
    ("post", "/organization/projects/{project_id}/rate_limits/{rate_limit_id}"),
    ("get", "/organization/admin_api_keys"), ("post", "/organization/admin_api_keys"),
    ("get", "/organization/admin_api_keys/{key_id}"),
    ("delete", "/organization/admin_api_keys/{key_id}"),
    ("get", "/organization/usage/completions"), ("get", "/organization/usage/embeddings"),
    ("get", "/organization/usage/moderations"), ("get", "/organization/costs"),
}


# Where the spec contradicts itself or OpenAI's API, the cut spec says what the API does (and
# what ferrum sends), so neither the e2e check nor the fuzzer flags it:
# - CreateFileRequest accepts `purpose: "evals"`, but OpenAIFile's enum omits it; a file
#   uploaded for evals reports the purpose it was uploaded with, as OpenAI's API does.
# - ChatCompletionMessageList's items are typed as response messages (role "assistant"), but
#   the list holds a stored completion's request messages, with their own roles.
# - A few operations type an error response as the bare `Error` object; every OpenAI error
#   body is `{"error": Error}` (`ErrorResponse`), which the SDKs parse.
# - FineTuningJob.status lists no `paused`, but the pause operation answers with a paused job
#   (its own example shows `"status": "paused"`), and resume takes it back to `queued`.
# - EvalRun.error and an output item's sample.error are typed as objects, but a run or sample
#   without an error has `"error": null` (the spec's own examples show it).
# - The message templates of completions and responses run data sources are `oneOf` two
#   schemas that a plain `{"role", "content": "text"}` message (the spec's own example) matches
#   both of: `anyOf`.
# - The spec cancels a run with `POST /evals/{eval_id}/runs/{run_id}`, the official SDKs with
#   `POST .../runs/{run_id}/cancel`; ferrum serves both, and both answer an EvalRun.
# - Embedding.embedding is typed as an array of floats, but with `encoding_format: "base64"`
#   (what the official SDKs send by default) the API answers a base64 string of the float32
#   bytes, which the SDKs decode.
SPEC_GAPS = [
    "OpenAIFile.purpose also takes 'evals' (CreateFileRequest accepts it)",
    "ChatCompletionMessageList items take every request message role",
    "error responses typed as the bare Error object are ErrorResponse",
    "FineTuningJob.status also takes 'paused' (what the pause operation answers)",
    "EvalRun.error and EvalRunOutputItem.sample.error are null without an error",
    "run data source message templates are anyOf (a plain message matches both branches)",
    "POST /evals/{eval_id}/runs/{run_id}/cancel (the SDKs' cancel) answers an EvalRun too",
    "Embedding.embedding is a base64 string with encoding_format 'base64'",
]


def patch_gaps(paths: dict, kept: dict, all_schemas: dict) -> None:
    schemas = kept["schemas"]
    schemas["OpenAIFile"]["properties"]["purpose"]["enum"].append("evals")
    items = schemas["ChatCompletionMessageList"]["properties"]["data"]["items"]["allOf"]
    message = copy.deepcopy(schemas["ChatCompletionResponseMessage"])
    message["properties"]["role"]["enum"] += ["system", "developer", "user", "tool"]
    items[0] = message
    schemas["FineTuningJob"]["properties"]["status"]["enum"].append("paused")
    for ops in paths.values():
        for op in ops.values():
            for status, response in op["responses"].items():
                for content in (response.get("content") or {}).values():
                    if content.get("schema") == {"$ref": "#/components/schemas/Error"}:
                        content["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
    for name in ("EvalRun",):
        error = schemas[name]["properties"]["error"]
        schemas[name]["properties"]["error"] = {"anyOf": [error, {"type": "null"}]}
    sample = schemas["EvalRunOutputItem"]["properties"]["sample"]["properties"]
    sample["error"] = {"anyOf": [sample["error"], {"type": "null"}]}
    for name in ("CreateEvalCompletionsRunDataSource", "CreateEvalResponsesRunDataSource"):
        template = schemas[name]["properties"]["input_messages"]["oneOf"][0]
        items = template["properties"]["template"]["items"]
        items["anyOf"] = items.pop("oneOf")
    vector = schemas["Embedding"]["properties"]["embedding"]
    schemas["Embedding"]["properties"]["embedding"] = {
        "anyOf": [vector, {"type": "string", "contentEncoding": "base64"}]
    }
    # The references patched in need their targets.
    schemas.setdefault("ErrorResponse", all_schemas["ErrorResponse"])
    schemas.setdefault("Error", all_schemas["Error"])


def refs(node, out: set[str]) -> None:
    """Adds the components `node` names through `$ref`, as "kind/name" ("schemas/Model")."""
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/components/"):
            out.add(r[len("#/components/"):])
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def main() -> None:
    spec = yaml.safe_load(Path(sys.argv[1]).read_text())
    components = spec["components"]
    operations = {}
    paths: dict = {}
    todo: set[str] = set()
    for method, path in sorted(OPERATIONS):
        op = spec["paths"][path][method]
        paths.setdefault(path, {})[method] = op
        refs(op, todo)
        for status, response in op["responses"].items():
            if not str(status).startswith("2"):
                continue
            for ctype, content in (response.get("content") or {}).items():
                ref = (content.get("schema") or {}).get("$ref")
                if ref:
                    name = ref.rsplit("/", 1)[1]
                    operations.setdefault(f"{method.upper()} /v1{path}", {})[ctype] = name
    operations["POST /v1/evals/{eval_id}/runs/{run_id}/cancel"] = {"application/json": "EvalRun"}
    keep: dict = {}
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        kind, key = name.split("/", 1)
        keep[name] = components[kind][key]
        found: set[str] = set()
        refs(keep[name], found)
        todo |= found - keep.keys()
    kept: dict = {}
    for name in sorted(keep):
        kind, key = name.split("/", 1)
        kept.setdefault(kind, {})[key] = keep[name]
    kept["securitySchemes"] = components["securitySchemes"]
    patch_gaps(paths, kept, components["schemas"])
    out = {
        "openapi": spec["openapi"],
        "info": {**spec["info"], "title": "OpenAI API: the operations ferrum implements"},
        "servers": spec["servers"],
        "security": spec["security"],
        "x-source": "openai/openai-openapi openapi.yaml"
                    + (f" at {sys.argv[2]}" if len(sys.argv) > 2 else "") + " (MIT)",
        "x-spec-gaps": SPEC_GAPS,
        "x-operations": operations,
        "paths": paths,
        "components": kept,
    }
    dest = Path(__file__).with_name("openai-schemas.json")
    dest.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"{dest}: {len(operations)} operations, {len(keep)} components, "
          f"{dest.stat().st_size} bytes")


if __name__ == "__main__":
    main()
