"""The real Ray Serve application on loopback, called with the `openai` package and raw httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.e2e.conftest import PRESETS


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_model_and_every_preset(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == [p["name"] for p in PRESETS] and ids[0]


def test_completion_says_what_was_chosen(client):
    raw = client.completions.with_raw_response.create(
        model="balanced", prompt="def fibonacci(n):", max_tokens=12, temperature=0,
        extra_body={"sla": {"ttft_ms": 2000, "tpot_ms": 500}})
    completion = raw.parse()
    assert raw.headers["x-preset"] == "balanced" and raw.headers["x-placement"] == "ASASGK"
    assert raw.headers["x-predicted-quality"] == "0.900"
    assert completion.usage.completion_tokens == 12 and completion.choices[0].finish_reason == "length"
    routing = completion.model_extra["routing"]
    assert routing["placement"] == "ASASGK" and routing["reason"]


def test_streaming_completion_equals_the_plain_one(client):
    kwargs = dict(model="fast", prompt="import os\n", max_tokens=10, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Sort a list."}]
    plain = client.chat.completions.create(model="quality", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="quality", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == plain.choices[0].message.content


def test_openai_chat_with_text_parts_max_completion_tokens_and_stop_null_streams(client):
    plain = client.chat.completions.create(model="quality", messages=[{"role": "user", "content": "Sort a list."}],
                                           max_tokens=6, temperature=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Sort a list."}]}]
    stream = client.chat.completions.create(model="quality", messages=parts, max_completion_tokens=6, stop=None,
                                            temperature=0, n=1, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"


def test_vllm_extensions_that_load_tools_send(client):
    chunks = list(client.completions.create(
        model="fast", prompt="import os\n", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "min_tokens": 12}))
    with_text = [c for c in chunks if c.choices]
    assert with_text and all(c.usage is not None for c in with_text)  # usage in every chunk
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == 12 and chunks[-1].usage.completion_tokens == 12


def test_placement_forced_and_budget_headers(serve_url):
    response = httpx.post(f"{serve_url}/v1/completions", timeout=60,
                          headers={"x-slo-ttft-ms": "300", "x-deadline-ms": "5000"},
                          json={"model": "quality", "prompt": "x = 1", "max_tokens": 3, "placement": "KKKKKK"})
    assert response.status_code == 200, response.text
    assert response.headers["x-placement"] == "KKKKKK" and response.headers["x-preset"] == ""


def test_fifty_concurrent_mixed_requests_get_what_each_gets_alone(serve_url):
    prompts = ["def add(a, b):", "import sys\n", "class Node:", "for i in range(3):", "# read a file\n"]
    bodies = [{"model": PRESETS[i % 4]["name"], "prompt": prompts[i % 5], "max_tokens": 6 + i % 7,
               "temperature": 0} for i in range(50)]

    async def run_all():
        async with httpx.AsyncClient(base_url=serve_url, timeout=300) as http:
            together = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
            alone = {}
            for body in bodies:
                key = json.dumps(body, sort_keys=True)
                if key not in alone:
                    alone[key] = await http.post("/v1/completions", json=body)
            return together, alone

    together, alone = asyncio.run(run_all())
    for body, response in zip(bodies, together):
        assert response.status_code == 200, response.text
        single = alone[json.dumps(body, sort_keys=True)].json()
        assert response.json()["choices"][0]["text"] == single["choices"][0]["text"]
        assert response.json()["usage"]["completion_tokens"] == body["max_tokens"]


BAD = [
    ('{"model": "quality", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    ('{"model": "quality", "prompt": 5}', 400, "prompt"),
    ('{"model": "quality", "prompt": "x", "sla": {"ttft_ms": -5}}', 400, "sla.ttft_ms"),
    ('{"model": "quality", "prompt": "x", "max_tokens": 1000000}', 413, "exceeds the model's context"),
    ('{"model": "quality", "prompt": "x", "preset": "turbo"}', 404, "unknown preset 'turbo'"),
    ('{"model": "gpt-9", "prompt": "x"}', 404, "unknown model 'gpt-9'"),
    ('{"model": "quality", "prompt": "x", "placement": "AAX"}', 400, "unknown letter(s) X"),
    ('{"model": "quality", "prompt": "x", "placement": "AAA"}', 400, "has 3 layers but the model has 6"),
    ('{"model": "quality", "prompt": "x", "max_token": 3}', 400, "max_token: Extra inputs are not permitted"),
    ('{"model": "quality", "prompt": "x", "temperature": -1}', 400, "temperature"),
    ('{"model": "quality", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "at most 4 stop strings"),
    ('{"model": "quality", "prompt": ""}', 400, "the prompt is empty"),
    ('{"model": "quality", "prompt": "x", "preset": "fast", "placement": "AAAAAA"}', 400, "not both"),
    ('{"model": "quality", "prompt": "x", "n": 3}', 400, "n:"),
    ('{"model": "quality", "prompt": "x"', 400, "not valid JSON"),
    ('[1, 2]', 400, "must be a JSON object"),
    ('{"model": "quality", "prompt": "x", "sla": {"deadline_ms": 1e999}}', 400, "sla.deadline_ms: Input should be a finite"),
    ('{"model": "quality", "prompt": "x", "temperature": NaN}', 400, "NaN is not a JSON number"),
    ('{"model": "quality", "prompt": "x", "min_tokens": 99999}', 400, "min_tokens"),
    ('{"model": "quality", "prompt": "x", "min_tokens": 9, "max_tokens": 3, "ignore_eos": true}', 400,
     "must not exceed max_tokens"),
    ('{"model": "quality", "prompt": "x", "stream_options": {"include_usage": true}}', 400, "needs stream: true"),
    ('{"model": "quality", "prompt": "x", "stream": true, "stream_options": {"usage": true}}', 400,
     "stream_options.usage: Extra inputs"),
    ('{"model": "quality", "prompt": "' + "x" * 70000 + '"}', 413, "exceeds the limit"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
def test_bad_completion_input(serve_url, body, status, message):
    response = httpx.post(f"{serve_url}/v1/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"model": "quality", "messages": []}, 400, "messages"),
        ({"model": "quality", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "quality", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"model": "quality", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
         "messages.0.content: part 0 has type 'image_url': only text parts are supported"),
        ({"model": "quality", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
         "messages.0.content.0.text: Field required"),
        ({"model": "quality", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n: "),
        ({"model": "quality", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
         "max_completion_tokens: "),
    ],
)
def test_bad_chat_input(serve_url, body, status, message):
    response = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert response.json()["error"]["param"] == message.split(":")[0].strip()


def test_a_body_that_is_not_json_by_its_content_type_gets_415(serve_url):
    body = '{"model": "quality", "prompt": "x", "max_tokens": 2}'
    refused = httpx.post(f"{serve_url}/v1/completions", content=body, headers={"content-type": "text/plain"},
                         timeout=60)
    assert refused.status_code == 415 and "application/json" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "content-type"
    charset = {"content-type": "application/json; charset=utf-8"}
    assert httpx.post(f"{serve_url}/v1/completions", content=body, headers=charset, timeout=60).status_code == 200


def test_openapi_describes_every_route_with_its_bodies(serve_url):
    schema = httpx.get(f"{serve_url}/openapi.json", timeout=60).json()
    components = schema["components"]["schemas"]
    for path, request, response in (("/v1/completions", "CompletionRequest", "CompletionResponse"),
                                    ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse")):
        post = schema["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{request}"
        fields = components[request]["properties"]
        assert {"sla", "preset", "placement", "min_quality", "priority", "stream_options"} <= set(fields)
        ok = post["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith(response) and "text/event-stream" in ok
        assert post["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert "routing" in components[response]["properties"]
    assert set(components["Routing"]["properties"]) >= {"preset", "placement", "reason", "sla_at_risk"}
    assert {"ttft_ms", "tpot_ms", "deadline_ms"} == set(components["Sla"]["properties"])
    assert schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    docs = httpx.get(f"{serve_url}/docs", timeout=60)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_bad_budget_header(serve_url):
    response = httpx.post(f"{serve_url}/v1/completions", headers={"x-slo-tpot-ms": "soon"}, timeout=60,
                          json={"model": "quality", "prompt": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "x-slo-tpot-ms"


def test_api_keys_gate_everything_but_health(serve_url):
    url = f"{serve_url}/secured"
    body = {"model": "quality", "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 401
    good = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer secret-key-1"},
                      timeout=60)
    assert good.status_code == 200
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200


def test_overload_gives_fast_429s_and_every_request_ends(serve_url):
    body = {"model": "quality", "prompt": "def f(x):", "max_tokens": 200, "temperature": 0}

    async def flood():
        async with httpx.AsyncClient(base_url=f"{serve_url}/small", timeout=300) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    shed = next(r for r in responses if r.status_code == 429)
    assert shed.headers["retry-after"] and shed.headers["x-supernet-shed-reason"] == "queue-full"


@pytest.mark.parametrize("draft", ["fastest", "SGKGKG"])
def test_a_given_draft_gives_the_same_tokens_and_says_so(client, draft):
    kwargs = dict(model="quality", prompt="def parse(text):\n    ", max_tokens=40, temperature=0)  # past the window
    plain = client.completions.create(**kwargs, extra_body={"speculation": "off"})
    raw = client.completions.with_raw_response.create(**kwargs, extra_body={"speculation": {"draft": draft,
                                                                                          "tokens": 4}})
    drafted = raw.parse()
    assert drafted.choices[0].text == plain.choices[0].text and drafted.usage.completion_tokens == 40
    code = "GGGGGG" if draft == "fastest" else draft
    assert raw.headers["x-draft-placement"] == code and raw.headers["x-draft-tokens"] == "4"
    assert drafted.model_extra["routing"]["draft_placement"] == code
    bad = httpx.post(f"{client.base_url}completions", timeout=60,
                     json={**kwargs, "speculation": {"draft": "fastest", "tokens": 99}})
    assert bad.status_code == 400 and "tokens" in bad.text
