"""Function calling: forced calls (tool_choice "required" or a named function) are generated
under a grammar, so their arguments always validate; calls stream as `tool_calls` deltas; tool
results round-trip."""

import json

import jsonschema
import pytest

from helpers import NANO

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(message):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("tier", ["gpt-4.1-nano", "gpt-4.1-mini", "gpt-4.1"])
def test_required_tool_call_validates(tiers_server, tier):
    """tool_choice "required", on every tier (tools through each model's own template): the
    answer is a call whose arguments validate."""
    completion = tiers_server.client().chat.completions.create(
        model=tier, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    check_calls(choice.message)


def test_named_function_is_the_one_called(client):
    """A named tool_choice calls exactly that function."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    message = completion.choices[0].message
    check_calls(message)
    assert [c.function.name for c in message.tool_calls] == ["get_time"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_calls_still_validate(client, seed):
    """At temperature 1 the forced calls (possibly several in parallel) still validate."""
    completion = client.chat.completions.create(
        model=NANO, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=1, seed=seed,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    check_calls(choice.message)


def test_streamed_tool_call_deltas_reassemble_to_the_call(client):
    """Streaming emits tool_calls deltas that join to the non-streamed call."""
    kwargs = dict(model=NANO, messages=ASK, tools=TOOLS, tool_choice="required",
                  parallel_tool_calls=False, max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    fragments = 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                fragments += bool(delta.function.arguments)
                if delta.index not in calls:
                    # The first delta of a call carries its id, type and name.
                    assert delta.id and delta.type == "function" and delta.function.name, delta
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = delta.id or entry["id"]
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    # The arguments stream as they are generated, not as one piece at the end.
    assert fragments > 3, fragments


def test_tool_results_round_trip(client):
    """An assistant tool call and its tool result are accepted and answered."""
    call = client.chat.completions.create(
        model=NANO, messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, temperature=0,
    ).choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    completion = client.chat.completions.create(
        model=NANO, messages=messages, tools=TOOLS, max_tokens=30, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


def test_auto_answers_with_text_or_valid_calls(client):
    """tool_choice "auto" (the default with tools): text, or calls in the OpenAI shape."""
    completion = client.chat.completions.create(
        model=NANO, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0
    )
    choice = completion.choices[0]
    if choice.finish_reason == "tool_calls":
        assert all(c.function.name in SCHEMAS for c in choice.message.tool_calls)
    else:
        assert choice.message.content and not choice.message.tool_calls


def stream_choice(client, **kwargs):
    """Streams a request; returns (content chunks, calls as {index: entry}, argument fragments,
    finish_reason)."""
    contents: list[str] = []
    calls: dict[int, dict] = {}
    fragments = 0
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.delta.content:
                contents.append(choice.delta.content)
            for delta in choice.delta.tool_calls or []:
                fragments += bool(delta.function.arguments)
                if delta.index not in calls:
                    assert delta.id and delta.type == "function" and delta.function.name, delta
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return contents, calls, fragments, finish


@pytest.mark.parametrize(
    "messages",
    [
        ASK,
        [{"role": "user", "content": "What is the weather in Paris and in Tokyo, in celsius?"}],
        [{"role": "user", "content": "Write a haiku about the sea. Do not call any tool."}],
    ],
    ids=["weather", "two-cities", "text"],
)
@pytest.mark.parametrize("tier", ["gpt-4.1-mini", "gpt-4.1"])
def test_auto_streams_text_and_calls_as_they_are_generated(tiers_server, tier, messages):
    """With tool_choice "auto", a stream sends text as it is generated and each `<tool_call>`
    block's name and arguments as they are written; the pieces join to the non-streamed
    answer (content, calls and their arguments, finish_reason)."""
    client = tiers_server.client()
    kwargs = dict(model=tier, messages=messages, tools=TOOLS, max_tokens=150, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    contents, calls, fragments, finish = stream_choice(client, **kwargs)
    assert finish == whole.finish_reason
    assert ("".join(contents) or None) == whole.message.content
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls or []
    ]
    if whole.message.tool_calls:
        assert finish == "tool_calls"
        assert fragments > len(calls), "arguments came whole, not as they were generated"
    if whole.message.content and len(whole.message.content) > 40:
        assert len(contents) > 3, "text came whole, not as it was generated"


# gpt-4.1 answers it with three fences, one call each. After the first fence the model picks
# between two tokenizations of its closing backticks ("``" then "`\n\n", which goes on to the
# next fence, or "```", which ends the turn): a prompt where that margin is wide (0.8-0.9 nats
# here, 0.07 for "... Call the tool once per city.") keeps the answer the same whatever the prefix
# cache holds (a cached prompt's logits differ from a fresh one's in the last bits).
THREE_CITIES = ("Weather for Paris, London and Tokyo in c, please: "
                "call get_weather three times in parallel.")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("tier", ["gpt-4.1-mini", "gpt-4.1"])
def test_auto_calls_are_always_valid_tool_calls(tiers_server, tier, stream):
    """With tool_choice "auto", mini and gpt-4.1 answer a three-city question with calls in
    ```json fences, their own habit: the auto grammar checks that form too, so the answer is
    `tool_calls` with arguments valid against the schema (before, gpt-4.1 wrote
    `"city": ["Paris", "Tokyo"]`), never text holding a call, streamed or not. gpt-4.1 writes one
    fence per city, a parallel call: three `tool_calls` (before, three fences came back as text
    with finish "stop"). mini (greedy) writes the first city's call and ends its turn, which the
    grammar allows; that is the model's choice (under tool_choice "required" it calls all three)."""
    client = tiers_server.client()
    kwargs = dict(model=tier, tools=TOOLS, max_tokens=200, temperature=0,
                  messages=[{"role": "user", "content": THREE_CITIES}])
    if stream:
        contents, calls, _, finish = stream_choice(client, **kwargs)
        found = [(c["name"], c["arguments"]) for c in calls.values()]
        text = "".join(contents)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        finish = choice.finish_reason
        found = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        text = choice.message.content or ""
    assert finish == "tool_calls", (finish, text, found)
    assert not text, text
    assert found, found
    for name, arguments in found:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    cities = [json.loads(arguments)["city"] for _, arguments in found]
    if tier == "gpt-4.1":
        assert cities == ["Paris", "London", "Tokyo"], found
    else:
        assert cities[0] == "Paris", found


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parallel_auto_calls_over_responses(tiers_server, stream):
    """The same parallel call over the Responses API: one `function_call` output item per city,
    with valid arguments, streamed (`response.output_item.added` per call) or not."""
    client = tiers_server.client()
    tools = [{"type": "function", "name": t["function"]["name"],
              "description": t["function"]["description"], "parameters": t["function"]["parameters"],
              "strict": t["function"].get("strict", False)} for t in TOOLS]
    kwargs = dict(model="gpt-4.1", input=THREE_CITIES, tools=tools, max_output_tokens=200,
                  temperature=0)
    if stream:
        events = list(client.responses.create(stream=True, **kwargs))
        added = [e.item for e in events if e.type == "response.output_item.added"]
        assert [item.type for item in added] == ["function_call"] * 3, added
        output = [e for e in events if e.type == "response.completed"][0].response.output
    else:
        output = client.responses.create(**kwargs).output
    assert [item.type for item in output] == ["function_call"] * 3, output
    for item in output:
        jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])
        assert item.call_id.startswith("call_"), item
    assert [json.loads(item.arguments)["city"] for item in output] == ["Paris", "London", "Tokyo"]


def run_tool(name: str, arguments: str) -> str:
    args = json.loads(arguments)
    if name == "get_weather":
        return f"It is 18 degrees ({args['unit'].upper()}) and sunny in {args['city']}."
    return f"It is 14:05 {args['tz']}."


def test_agents_style_loop_ends_in_text(client):
    """The openai-agents SDK's loop over chat completions: the first turn must call a tool
    (tool_choice "required"), the tool runs, later turns are "auto" until the model answers in
    text. On nano the loop ends in a text answer after the tool result. (mini and gpt-4.1 call the
    same tool again at that point with p ~ 1 under their own template: the models' habit, see
    issue 17's note; the rendering of tool results is the template's, as llama.cpp renders it.)"""
    messages = list(ASK)
    tool_choice = "required"
    for turn in range(4):
        choice = client.chat.completions.create(
            model=NANO, messages=messages, tools=TOOLS, tool_choice=tool_choice,
            max_tokens=60, temperature=0,
        ).choices[0]
        if not choice.message.tool_calls:
            break
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message)
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            c.model_dump() for c in choice.message.tool_calls]})
        for call in choice.message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": run_tool(call.function.name, call.function.arguments)})
        tool_choice = "auto"
    assert turn >= 1, "the first turn must call a tool"
    assert choice.finish_reason in ("stop", "length"), choice
    assert choice.message.content and not choice.message.tool_calls, choice.message
    assert [m["role"] for m in messages][:3] == ["user", "assistant", "tool"]


def test_agents_style_loop_ends_in_text_over_responses(client):
    """The same loop over the Responses API, as the agents SDK's default model runs it: a
    `function_call` output item, its `function_call_output` sent back with
    `previous_response_id`, then "auto" until a `message` item answers."""
    tools = [{"type": "function", "name": t["function"]["name"],
              "description": t["function"]["description"], "parameters": t["function"]["parameters"],
              "strict": t["function"].get("strict", False)} for t in TOOLS]
    response = client.responses.create(
        model=NANO, input=ASK[0]["content"], tools=tools, tool_choice="required",
        max_output_tokens=60, temperature=0,
    )
    for _ in range(3):
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            break
        outputs = [{"type": "function_call_output", "call_id": c.call_id,
                    "output": run_tool(c.name, c.arguments)} for c in calls]
        response = client.responses.create(
            model=NANO, previous_response_id=response.id, input=outputs, tools=tools,
            tool_choice="auto", max_output_tokens=60, temperature=0,
        )
    assert [item.type for item in response.output] == ["message"], response.output
    assert response.output_text
