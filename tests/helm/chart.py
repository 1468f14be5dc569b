"""Render the chart offline (Helm v4 through helm-python-sdk) and validate what comes out.

Core kinds are checked with kubernetes-validate (--strict: unknown fields are
errors); the custom resources against their CRDs' openAPIV3Schema from
shared/schemas/ (read in place, never copied), with unknown fields refused the
way the API server's strict field validation refuses them.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "supernet-router"
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(os.environ.get("SUPERNET_CRD_SCHEMAS", ROOT.parent / "shared" / "schemas"))
KUBERNETES_VERSION = "1.35"  # kubernetes-validate carries schemas up to 1.37
RELEASE, NAMESPACE = "llm", "serving"

CRD_FILES = {
    ("ray.io/v1", "RayService"): "kuberay/ray.io_rayservices.yaml",
    ("ray.io/v1", "RayCluster"): "kuberay/ray.io_rayclusters.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
}
# Kinds with no schema available here: the tests check their fields by hand.
UNVALIDATED = {("gateway.networking.k8s.io/v1", "HTTPRoute")}


def values_file(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def everything_on() -> dict:
    """Values that switch on every optional part (and the non-default checkpoint paths)."""
    return {
        "checkpoint": {"source": "url", "url": {"location": "s3://models/super-apriel/", "credentialsSecret": "s3"},
                       "initContainer": {"extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
                       "storage": {"kind": "ephemeral", "storageClassName": "local-nvme", "size": "120Gi"}},
        "app": {"presets": [{"name": "p48", "placement": "A" * 48, "quality": 1.0}],
                "routing": {"default_preset": "p48", "policy": "fixed:p48"},
                "tables": {"speed": "/etc/supernet-router/tables/speed.json"}},
        "apiKeys": {"create": True, "keys": ["k-0123456789", "k-abcdefghij"]},
        "tables": {"speed.json": '{"format": "supernet-router/speed"}', "presets.json": {"format": "x", "version": 1}},
        "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["a.example"], "secretName": "t"}],
                    "hosts": [{"host": "a.example", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
        "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw", "namespace": "gateways"}],
                      "hostnames": ["a.example"]},
        "networkPolicy": {"serveFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]},
        "head": {"nodeSelector": {"pool": "cpu"}, "podAnnotations": {"a": "b"},
                 "extraEnv": [{"name": "RAY_LOG_LEVEL", "value": "debug"}]},
        "workers": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}},
    }


def minimal() -> dict:
    """Every optional part switched off."""
    return {"autoscaler": {"enabled": False}, "networkPolicy": {"enabled": False}, "tests": {"enabled": False},
            "monitoring": {"podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                           "dashboards": {"enabled": False}},
            "checkpoint": {"source": "existing", "storage": {"existingClaim": "models"}}}


CASES = {
    "defaults": lambda: {},
    "h100": lambda: values_file("values-h100.yaml"),
    "kind": lambda: values_file("values-kind.yaml"),
    "everything": everything_on,
    "minimal": minimal,
}


@functools.cache
def _chart(path: str):
    import helm_python

    return helm_python.Chart.load(path)


def render_files(values: dict | None = None, chart: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` makes them (values.schema.json checked first)."""
    return _chart(str(chart)).render(values=copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE)


def render(values: dict | None = None, chart: Path = CHART) -> list[dict]:
    docs = []
    for path, text in sorted(render_files(values, chart).items()):
        if not path.endswith(".txt"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """The RayService's head and worker pod templates, plus any plain Pod, by name."""
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        pods[f"worker/{group['groupName']}"] = group["template"]
    for doc in docs:
        if doc["kind"] == "Pod":
            pods[f"pod/{doc['metadata']['name']}"] = doc
    return pods


# ---- custom resources: the CRDs' schemas, made strict ---------------------------------------

def strict_openapi(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema draft 4, refusing unknown fields.

    nullable -> a null type; x-kubernetes-int-or-string -> integer or string;
    objects with properties refuse others unless x-kubernetes-preserve-unknown-fields
    (the API server prunes them; `kubectl apply --validate=strict` refuses them).
    x-kubernetes-validations (CEL rules) are not evaluated.
    """
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {k: strict_openapi(v) for k, v in out["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_openapi(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict_openapi(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_openapi(s) for s in out[key]]
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft4Validator(strict_openapi(entry["schema"]["openAPIV3Schema"]))
    raise LookupError(f"{CRD_FILES[(api_version, kind)]} has no version {version}")


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{doc['kind']} {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(doc)]


def core_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']} {doc['metadata'].get('name')} {'.'.join(map(str, e.path))}: {e.message}"]
    return []


def validation_errors(docs: list[dict]) -> list[str]:
    errors = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES:
            errors += crd_errors(doc)
        elif key not in UNVALIDATED:
            errors += core_errors(doc)
    return errors
