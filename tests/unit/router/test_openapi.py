"""The published schema (docs/openapi.json) is the one the service serves, and it describes every body."""

import json
from pathlib import Path

from router.ingress import api

ROOT = Path(__file__).resolve().parents[3]


def test_docs_openapi_json_is_current():
    assert json.loads((ROOT / "docs" / "openapi.json").read_text()) == json.loads(json.dumps(api.openapi())), \
        "regenerate it: .venv/bin/python -m router.openapi > docs/openapi.json"


def test_every_reference_resolves_and_every_request_field_is_described():
    schema = api.openapi()
    components = schema["components"]["schemas"]
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(schema)}
    assert refs <= set(components), sorted(refs - set(components))
    for name in ("CompletionRequest", "ChatCompletionRequest", "Sla", "StreamOptions"):
        undescribed = [f for f, spec in components[name]["properties"].items() if "description" not in spec]
        assert not undescribed, (name, undescribed)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)
