"""Structured Outputs and JSON mode: `response_format` enforced by constrained decoding, so the
output always parses (and validates against the schema) whenever the model finishes."""

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from helpers import NANO, assert_error

# Bounded schemas (enums, small integers, short strings, few items), so even a 135M model ends
# its JSON well within max_tokens: the test checks validity, not the model's knowledge.
SCHEMAS = {
    "flat_enum_and_bool": {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "enum": ["a", "b", "c"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "enum": ["none"]},
                ]
            }
        },
        "required": ["value"],
        "additionalProperties": False,
    },
    "nullable_and_const": {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "label": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["kind", "label"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -9, "maximum": 9},
                        "y": {"type": "integer", "minimum": -9, "maximum": 9},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["points"],
        "additionalProperties": False,
    },
    "number_range": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
        "additionalProperties": False,
    },
    "pattern_code": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "bool_array": {
        "type": "object",
        "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
        "required": ["flags"],
        "additionalProperties": False,
    },
    "optional_property": {
        "type": "object",
        "properties": {
            "size": {"type": "string", "enum": ["s", "m", "l"]},
            "note": {"type": "string", "maxLength": 10},
        },
        "required": ["size"],
        "additionalProperties": False,
    },
    "integer_enum": {
        "type": "object",
        "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["level"],
        "additionalProperties": False,
    },
    "nested_arrays": {
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "array",
                    "maxItems": 2,
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                },
            }
        },
        "required": ["grid"],
        "additionalProperties": False,
    },
    "tagged_union": {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "circle"},
                            "r": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                        "required": ["kind", "r"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "square"},
                            "side": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                        "required": ["kind", "side"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["shape"],
        "additionalProperties": False,
    },
    "shared_defs": {
        "$defs": {
            "money": {
                "type": "object",
                "properties": {
                    "amount": {"type": "integer", "minimum": 0, "maximum": 999},
                    "currency": {"type": "string", "enum": ["EUR", "USD"]},
                },
                "required": ["amount", "currency"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"price": {"$ref": "#/$defs/money"}, "tax": {"$ref": "#/$defs/money"}},
        "required": ["price", "tax"],
        "additionalProperties": False,
    },
    "many_fields": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "integer", "minimum": 0, "maximum": 5},
            "c": {"type": "string", "enum": ["x", "y"]},
            "d": {"type": "null"},
            "e": {"type": "string", "maxLength": 6},
            "f": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        },
        "required": ["a", "b", "c", "d", "e", "f"],
        "additionalProperties": False,
    },
    "nullable_object": {
        "type": "object",
        "properties": {
            "owner": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
                        "required": ["id"],
                        "additionalProperties": False,
                    },
                    {"type": "null"},
                ]
            }
        },
        "required": ["owner"],
        "additionalProperties": False,
    },
    "fixed_length_array": {
        "type": "object",
        "properties": {
            "pair": {
                "type": "array",
                "items": {"type": "string", "enum": ["left", "right"]},
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["pair"],
        "additionalProperties": False,
    },
    "negative_range": {
        "type": "object",
        "properties": {"delta": {"type": "integer", "minimum": -50, "maximum": -1}},
        "required": ["delta"],
        "additionalProperties": False,
    },
    "annotated": {
        "title": "Review",
        "description": "A short review.",
        "type": "object",
        "properties": {
            "stars": {"description": "1 to 5", "type": "integer", "minimum": 1, "maximum": 5},
            "verdict": {"title": "Verdict", "type": "string", "enum": ["good", "bad"]},
        },
        "required": ["stars", "verdict"],
        "additionalProperties": False,
    },
    "string_length_bounds": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 5}},
        "required": ["word"],
        "additionalProperties": False,
    },
}

TIERS = ["gpt-4.1-nano", "gpt-4.1-mini", "gpt-4.1"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("name", SCHEMAS.keys())
def test_json_schema_output_parses_and_validates(tiers_server, tier, name):
    """On every tier, a strict json_schema response_format gives JSON valid against the schema."""
    schema = SCHEMAS[name]
    completion = tiers_server.client().chat.completions.create(
        model=tier,
        messages=[{"role": "user", "content": f"Fill in the {name.replace('_', ' ')} object."}],
        max_tokens=200,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.refusal is None
    jsonschema.validate(json.loads(choice.message.content), schema)


RECURSIVE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer", "minimum": 0, "maximum": 9},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1},
            },
            "required": ["v", "kids"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"root": {"$ref": "#/$defs/node"}},
    "required": ["root"],
    "additionalProperties": False,
}


def depth(value, key):
    """Levels of `key` nesting in a parsed answer."""
    return 1 + depth(value[key][0] if isinstance(value[key], list) else value[key], key) if value.get(key) else 1


def test_recursive_ref_schema_is_followed(client):
    """A recursive $ref schema compiles, and even nano, which keeps nesting, finishes a valid
    answer: recursion is bounded at 10 levels (OpenAI's nesting limit for strict schemas)."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[{"role": "user", "content": "A small tree."}],
        max_tokens=400,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "tree", "schema": RECURSIVE}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, RECURSIVE)
    assert depth(answer["root"], "kids") <= 10


def test_json_schema_streaming_equals_non_streaming(client):
    """Streamed deltas of a constrained answer join to the non-streamed content."""
    kwargs = dict(
        model=NANO,
        messages=[{"role": "user", "content": "Pick a color."}],
        max_tokens=100,
        temperature=0,
        seed=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": SCHEMAS["flat_enum_and_bool"], "strict": True},
        },
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices
    ]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), SCHEMAS["flat_enum_and_bool"])


def test_json_schema_at_temperature_one_still_validates(client):
    """Sampling at temperature 1 (several seeds) never leaves the schema."""
    schema = SCHEMAS["array_of_objects"]
    for seed in range(3):
        completion = client.chat.completions.create(
            model=NANO,
            messages=[{"role": "user", "content": "Some points."}],
            max_tokens=200,
            temperature=1,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: Literal["low", "medium", "high"]


def test_sdk_parse_with_a_pydantic_model(client):
    """`client.chat.completions.parse` with a pydantic model returns a parsed object."""
    completion = client.chat.completions.parse(
        model=NANO,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=100,
        temperature=0,
        response_format=Verdict,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Verdict), message
    assert message.refusal is None


def test_json_mode_gives_a_json_object(client):
    """response_format json_object: the content is a JSON object (or cut at max_tokens)."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[{"role": "user", "content": "Reply in JSON with a greeting."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = completion.choices[0]
    content = choice.message.content
    assert content.startswith("{"), content
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_json_mode_needs_the_word_json(http):
    """As with OpenAI, JSON mode requires the messages to mention JSON."""
    response = http.post(
        "/v1/chat/completions",
        json={
            "model": NANO,
            "messages": [{"role": "user", "content": "Say hi."}],
            "response_format": {"type": "json_object"},
        },
    )
    assert_error(response, 400, param="messages", code="invalid_value")


def test_an_invalid_schema_is_a_clear_400(http):
    """A schema that does not compile (a dangling $ref) is refused naming the schema."""
    response = http.post(
        "/v1/chat/completions",
        json={
            "model": NANO,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "bad",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}},
                },
            },
        },
    )
    error = assert_error(response, 400, param="response_format.json_schema.schema", code="invalid_json_schema")
    assert "nope" in error["message"]


def test_a_bad_schema_name_is_refused(client):
    """json_schema.name must be [a-zA-Z0-9_-]{1,64}."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=NANO,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}},
        )
    assert caught.value.body["param"] == "response_format.json_schema.name"


LINKED_LIST = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer", "minimum": 0, "maximum": 9},
                "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
            },
            "required": ["value", "next"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"list": {"$ref": "#/$defs/node"}},
    "required": ["list"],
    "additionalProperties": False,
}


# nano (135M) would nest this list until max_tokens; the recursion bound ends it at 10 levels.
@pytest.mark.parametrize("tier", TIERS)
def test_recursive_ref_validates_on_every_tier(tiers_server, tier):
    """A recursive $ref schema (a linked list) gives a finished, valid answer."""
    completion = tiers_server.client().chat.completions.create(
        model=tier,
        messages=[{"role": "user", "content": "A linked list of the numbers 1, 2, 3."}],
        max_tokens=300,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": LINKED_LIST, "strict": True}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), LINKED_LIST)
