"""The OpenAI Python client (from PyPI) against our server: every response must parse.

usage: python openai_client.py BASE_URL MODEL
The served checkpoint (tests/serve.rs) answers any chat turn with one call
get_weather({"city": "Paris"}).
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
out = {"openai": openai.__version__}

models = client.models.list()
assert [m.id for m in models.data] == [model], models

c = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, temperature=0, logprobs=2)
text = c.choices[0].text
assert isinstance(text, str) and c.choices[0].finish_reason in ("stop", "length"), c
assert len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs) >= 1
assert c.usage.completion_tokens >= 1
out["completion"] = text

streamed = ""
for chunk in client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, temperature=0, stream=True):
    for ch in chunk.choices:
        streamed += ch.text
assert streamed == text, (streamed, text)

scored = client.completions.create(model=model, prompt="x = 1\ny = 2", max_tokens=0, echo=True, logprobs=1)
lp = scored.choices[0].logprobs
assert lp.token_logprobs[0] is None and all(isinstance(x, float) for x in lp.token_logprobs[1:]), lp
out["echo_tokens"] = len(lp.tokens)

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
messages = [{"role": "user", "content": "Weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=16)
msg = r.choices[0].message
assert r.choices[0].finish_reason == "tool_calls", r
assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather", msg
assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}, msg
out["tool_call"] = msg.tool_calls[0].function.arguments

# The conversation continues with the tool's answer, as an agent loop sends it.
follow = client.chat.completions.create(
    model=model,
    messages=messages
    + [msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny"}],
    tools=tools,
    temperature=0,
    max_tokens=16,
)
assert follow.choices[0].message.tool_calls[0].function.name == "get_weather"

calls, finish, content = {}, None, ""
for chunk in client.chat.completions.create(
    model=model, messages=messages, tools=tools, temperature=0, max_tokens=16, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage:
        out["stream_usage"] = chunk.usage.total_tokens
    for ch in chunk.choices:
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = ch.finish_reason or finish
assert finish == "tool_calls" and calls[0]["name"] == "get_weather", (calls, finish)
assert json.loads(calls[0]["arguments"]) == {"city": "Paris"} and content == "", (calls, content)
assert out["stream_usage"] > 0

plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e
try:
    client.completions.create(model=model, prompt="a " * 600, max_tokens=10)
    raise AssertionError("over-long prompt accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e
try:
    client.chat.completions.create(model=model, messages=messages, tools=[{"type": "function", "function": {}}])
    raise AssertionError("malformed tools accepted")
except openai.BadRequestError as e:
    assert e.param == "tools[0].function.name", e

print("OK " + json.dumps(out))
