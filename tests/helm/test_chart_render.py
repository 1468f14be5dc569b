"""The chart renders, lints and validates with its defaults, the example values and every option."""

from __future__ import annotations

import pytest
import yaml

from tests.helm.chart import (CASES, CHART, KUBERNETES_VERSION, NAMESPACE, RELEASE, core_errors, crd_errors, one,
                              pod_templates, render, serve_config, validation_errors)
from tests.helm.conftest import HELM_MISSING

helm = pytest.importorskip("helm_python", reason=HELM_MISSING)
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (a dev requirement)")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    values = CASES[request.param]()
    return request.param, values, render(values)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lint_strict(name):
    report = helm.lint(CHART, values=CASES[name](), strict=True, kube_version=f"v{KUBERNETES_VERSION}.0", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings fail too (--strict)
    assert report["errors"] == [] and problems == [], report


def test_every_manifest_validates(case, crd_schemas):
    name, _, docs = case
    assert validation_errors(docs) == [], name


def test_pod_templates_validate_as_core_pods(case):
    """The pod templates inside the RayService, checked with the core Pod schema too (quantities, probes, ...)."""
    name, _, docs = case
    for pod_name, template in pod_templates(docs).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template.get("metadata", {}), "name": "p"},
               "spec": template["spec"]}
        assert core_errors(pod) == [], f"{name}: {pod_name}"


def test_custom_resources_are_checked(crd_schemas):
    """The CRD check is strict enough to catch a misspelt field and a wrong type."""
    rayservice = one(render(), "RayService")
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    errors = "\n".join(crd_errors(rayservice))
    assert "enableInTreeAutoScaling" in errors and "num-cpus: 0 is not of type 'string'" in errors


def test_serve_config_is_the_app_config(case):
    """serveConfigV2 -> applications[0].args parses into AppConfig: the schema `serve --config` reads."""
    from router.config import AppConfig

    name, values, docs = case
    serve = serve_config(docs)
    (app,) = serve["applications"]
    assert app["import_path"] == "router.app:app_builder" and app["route_prefix"] == "/"
    assert app["name"] == "supernet-router"
    assert serve["http_options"]["port"] == 8000
    config = AppConfig.from_dict(app["args"], source=f"{name} serve config")
    assert config.model.checkpoint == (values.get("app", {}).get("model", {}).get("checkpoint") or "/models/checkpoint")
    mounted = yaml.safe_load(next(d for d in docs if d["metadata"]["name"].endswith("-config"))["data"]["config.yaml"])
    assert mounted == app["args"]  # the file in the pods is the same configuration
    if values.get("app", {}).get("presets"):
        assert [p.name for p in config.presets] == [p["name"] for p in values["app"]["presets"]]


def test_rayservice_shape(case):
    name, values, docs = case
    spec = one(docs, "RayService")["spec"]
    cluster = spec["rayClusterConfig"]
    autoscaling = values.get("autoscaler", {}).get("enabled", True)
    assert cluster["enableInTreeAutoscaling"] is autoscaling
    assert ("autoscalerOptions" in cluster) is autoscaling
    assert spec["serveService"]["metadata"]["name"] == f"{RELEASE}-supernet-router-serve-svc"
    assert spec["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000,
                                                     "protocol": "TCP"}]
    image = f"{values.get('image', {}).get('repository', 'supernet-router')}:"
    for pod_name, template in pod_templates(docs).items():
        podspec = template["spec"]
        assert all(c["image"].startswith(image) for c in podspec["containers"]), pod_name
        if pod_name.startswith("pod/"):
            continue
        volumes = {v["name"]: v for v in podspec["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        mounts = {m["mountPath"]: m for m in podspec["containers"][0]["volumeMounts"]}
        assert mounts["/dev/shm"]["name"] == "dshm"
        assert mounts["/models"]["readOnly"] is True
        assert [c["name"] for c in podspec["initContainers"]] == ["fill-checkpoint"]
        assert {p["name"] for p in podspec["containers"][0]["ports"]} >= {"serve", "metrics"}


def test_gpu_worker_group():
    docs = render(CASES["h100"]())
    (group,) = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    podspec = group["template"]["spec"]
    resources = podspec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert podspec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in podspec["tolerations"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 8)
    kind = one(render(CASES["kind"]()), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in kind["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_non_root_everywhere(case):
    name, _, docs = case
    spec = one(docs, "RayService")["spec"]["rayClusterConfig"]
    containers = [spec["autoscalerOptions"]] if "autoscalerOptions" in spec else []
    for pod_name, template in pod_templates(docs).items():
        podspec = template["spec"]
        assert podspec["securityContext"]["runAsNonRoot"] is True, pod_name
        assert podspec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, pod_name
        containers += podspec["containers"] + podspec.get("initContainers", [])
    for container in containers:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]} and context["readOnlyRootFilesystem"] is True, name


@pytest.mark.parametrize("existing", [False, True])
def test_api_keys_from_a_secret(existing):
    keys = {"existingSecret": "my-keys"} if existing else {"create": True, "keys": ["key-0123456789"]}
    docs = render({"apiKeys": keys, "app": {"ingress": {"api_keys_env": "ROUTER_KEYS"}}})
    secret = "my-keys" if existing else f"{RELEASE}-supernet-router-api-keys"
    if not existing:
        assert one(docs, "Secret")["stringData"] == {"api-keys": "key-0123456789"}
    for pod_name, template in pod_templates(docs).items():
        if pod_name.startswith("pod/"):
            continue
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["ROUTER_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "api-keys"}, pod_name
    assert serve_config(docs)["applications"][0]["args"]["ingress"]["api_keys_env"] == "ROUTER_KEYS"
    no_keys = render()
    assert all("SUPERNET_ROUTER_API_KEYS" not in {e["name"] for e in t["spec"]["containers"][0].get("env", [])}
               for t in pod_templates(no_keys).values())


def test_ingress_and_route_reach_the_serve_service():
    docs = render(CASES["everything"]())
    service = one(docs, "RayService")["spec"]["serveService"]["metadata"]["name"]
    backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service, "port": {"number": 8000}}
    route = one(docs, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": service, "port": 8000}]
    assert route["spec"]["parentRefs"] == [{"name": "gw", "namespace": "gateways"}]


def test_checkpoint_volume_kinds():
    shared = render()
    claim = one(shared, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for template in pod_templates(shared).values():
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        if volumes:
            assert volumes["checkpoint"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    ephemeral = render(CASES["everything"]())
    assert not [d for d in ephemeral if d["kind"] == "PersistentVolumeClaim"]
    head = pod_templates(ephemeral)["head"]["spec"]
    volume = next(v for v in head["volumes"] if v["name"] == "checkpoint")
    assert volume["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "120Gi"
    env = {e["name"]: e for e in head["initContainers"][0]["env"]}
    assert env["URL"]["value"] == "s3://models/super-apriel/" and env["SOURCE_ID"]["value"].startswith("url:")
    assert head["initContainers"][0]["envFrom"] == [{"secretRef": {"name": "s3"}}]


def test_tables_are_mounted():
    docs = render(CASES["everything"]())
    tables = next(d for d in docs if d["metadata"]["name"].endswith("-tables"))
    assert tables["data"]["speed.json"].strip() == '{"format": "supernet-router/speed"}'
    assert yaml.safe_load(tables["data"]["presets.json"]) == {"format": "x", "version": 1}
    head = pod_templates(docs)["head"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["tables"] == "/etc/supernet-router/tables"
