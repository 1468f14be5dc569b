"""Values: `app` is AppConfig key for key; bad values fail naming the value; metric names and dashboards."""

from __future__ import annotations

import json
import shutil
import typing

import pytest
import yaml
from pydantic import BaseModel

from tests.helm.chart import CHART, ROOT, one, render
from tests.helm.conftest import HELM_MISSING

helm = pytest.importorskip("helm_python", reason=HELM_MISSING)


def model_keys(model: type[BaseModel]) -> dict:
    """AppConfig's key tree: {field: subtree or None}; a list of models is described by its item."""
    tree = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if typing.get_origin(annotation) is list:
            (annotation,) = typing.get_args(annotation)
        tree[name] = model_keys(annotation) if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            else None
    return tree


def value_keys(value) -> dict | None:
    if isinstance(value, list):
        merged = {}
        for item in value:
            merged.update(value_keys(item) or {})
        return merged or None
    return {k: value_keys(v) for k, v in value.items()} if isinstance(value, dict) else None


def schema_keys(schema: dict) -> dict | None:
    if schema.get("type") == "array":
        return schema_keys(schema["items"])
    if "properties" in schema:
        return {k: schema_keys(v) for k, v in schema["properties"].items()}
    return None


def test_values_app_is_app_config_key_for_key():
    """values.yaml `app` and values.schema.json `app` name exactly AppConfig's keys (router/config.py)."""
    from router.config import AppConfig

    expected = model_keys(AppConfig)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert value_keys(values["app"]) == expected, "helm/supernet-router/values.yaml app: differs from AppConfig"
    assert schema_keys(schema["properties"]["app"]) == expected, "values.schema.json app: differs from AppConfig"
    AppConfig.from_dict(values["app"], source="values.yaml app")


BAD_VALUES = {
    "negative worker replicas": ({"workers": {"replicas": -1}}, "/workers/replicas"),
    "negative min replicas": ({"workers": {"minReplicas": -2}}, "/workers/minReplicas"),
    "no app worker replicas": ({"app": {"worker": {"num_replicas": 0}}}, "/app/worker/num_replicas"),
    "missing checkpoint source": ({"checkpoint": {"source": None}}, "/checkpoint': missing property 'source'"),
    "unknown checkpoint source": ({"checkpoint": {"source": "ftp"}}, "/checkpoint/source"),
    "huggingface without a repo": ({"checkpoint": {"source": "huggingface"}}, "/checkpoint/huggingface/repo"),
    "url without a location": ({"checkpoint": {"source": "url"}}, "/checkpoint/url/location"),
    "unknown preset": ({"app": {"routing": {"default_preset": "turbo"}}},
                       "app.routing.default_preset \"turbo\" is not one of app.presets' names (quality, balanced,"),
    "unknown app key": ({"app": {"worker": {"num_gpu": 1}}}, "at '/app/worker': additional properties 'num_gpu'"),
    "min above max": ({"workers": {"minReplicas": 5}}, "workers.minReplicas (5) is more than workers.maxReplicas (4)"),
    "replicas above max": ({"workers": {"replicas": 9}}, "workers.replicas (9) is outside"),
    "more GPUs than a pod has": ({"app": {"worker": {"num_gpus": 2}}}, "app.worker.num_gpus (2) is more than"),
    "placement of the wrong length": ({"app": {"presets": [{"name": "x", "placement": "AAA"}]}},
                                      "app.presets[0].placement \"AAA\" has 3 layers but checkpoint.tiny.layers is 6"),
    "repeated preset": ({"app": {"presets": [{"name": "x", "placement": "AAAAAA"}] * 2}},
                        "app.presets[1].name \"x\" is repeated"),
    "checkpoint outside the volume": ({"app": {"model": {"checkpoint": "/data/ckpt"}}},
                                      "app.model.checkpoint \"/data/ckpt\" is not under checkpoint.mountPath"),
    "api keys to create but none given": ({"apiKeys": {"create": True}}, "apiKeys.keys is empty"),
    "cuda without GPUs": ({"workers": {"gpusPerPod": 0}, "app": {"model": {"device": "cuda"},
                                                                  "worker": {"num_gpus": 0}}},
                          "app.model.device is cuda but workers.gpusPerPod is 0"),
    "unknown routing policy": ({"app": {"routing": {"policy": "fastest-first"}}}, "/app/routing/policy"),
    "fixed policy without the preset": ({"app": {"routing": {"policy": "fixed:turbo"}}},
                                        "app.routing.policy \"fixed:turbo\" names no preset"),
    "speed table not in tables": ({"app": {"tables": {"speed": "/etc/supernet-router/tables/speed.json"}}},
                                  "app.tables.speed is /etc/supernet-router/tables/speed.json but tables has no"),
    "speed table with unrated presets": ({"app": {"tables": {"speed": "/etc/supernet-router/tables/speed.json"}},
                                          "tables": {"speed.json": "{}"}}, "app.presets[0].quality is missing"),
    "bad metric name": ({"monitoring": {"metrics": {"shed": "shed-total"}}}, "/monitoring/metrics/shed"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_naming_the_value(case):
    values, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    assert message in str(failure.value)


def test_metric_names_come_from_values():
    docs = render({"monitoring": {"metrics": {"requests": "ray_supernet_requests_total", "shed": "ray_shed_total"},
                                  "errorOutcomes": ["error", "timeout"]}})
    exprs = "\n".join(r["expr"] for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"])
    assert "ray_supernet_requests_total{" in exprs and "ray_shed_total{" in exprs
    assert "supernet_sla_met_total{" in exprs and "supernet_sla_missed_total{" in exprs
    assert " supernet_requests_total" not in exprs and "(supernet_requests_total" not in exprs
    assert 'outcome=~"error|timeout"' in exprs
    assert 'namespace="serving", supernet_release="llm"' in exprs  # this release only


def test_alerts():
    rule = one(render(), "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"SupernetSLAAttainmentLow", "SupernetShedRateHigh", "SupernetErrorRateHigh"}
    assert ") < 0.95" in alerts["SupernetSLAAttainmentLow"]["expr"]
    assert ") > 0.05" in alerts["SupernetShedRateHigh"]["expr"]
    assert all(a["for"] == "10m" and a["labels"]["severity"] == "warning" for a in alerts.values())
    podmonitor = one(render(), "PodMonitor")
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert any(r["targetLabel"] == "supernet_release" for r in endpoint["relabelings"])


def test_chart_dashboards_equal_the_repository_dashboards():
    """helm/supernet-router/dashboards/*.json are byte-for-byte copies of dashboards/*.json.

    Passes trivially while the repository has no dashboard yet.
    """
    repo = {p.name: p.read_bytes() for p in sorted((ROOT / "dashboards").glob("*.json"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "dashboards").glob("*.json"))}
    assert sorted(chart) == sorted(repo), "refresh them: cp dashboards/*.json helm/supernet-router/dashboards/"
    for name in repo:
        assert chart[name] == repo[name], f"helm/supernet-router/dashboards/{name} differs from dashboards/{name}"
    rendered = {n: cm for cm in render() if cm["kind"] == "ConfigMap" for n in cm["data"] if n.endswith(".json")}
    assert sorted(rendered) == sorted(repo)
    for name, configmap in rendered.items():
        assert configmap["data"][name].encode() == repo[name]
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboard_configmaps(tmp_path):
    """A dashboard in the chart becomes a ConfigMap with the sidecar's label, its bytes unchanged."""
    chart = tmp_path / "supernet-router"
    shutil.copytree(CHART, chart)
    for existing in (chart / "dashboards").glob("*.json"):  # only the sample below
        existing.unlink()
    dashboard = '{\n  "title": "Supernet <router> & \\"SLA\\"",\n  "panels": []\n}\n'
    (chart / "dashboards" / "Supernet_Overview.json").write_text(dashboard)
    configmaps = [d for d in render({"monitoring": {"dashboards": {"folder": "LLM"}}}, chart=chart)
                  if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    (configmap,) = configmaps
    assert configmap["metadata"]["name"] == "llm-supernet-router-dashboard-supernet-overview"
    assert configmap["data"] == {"Supernet_Overview.json": dashboard}
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"]["grafana_folder"] == "LLM"
    off = render({"monitoring": {"dashboards": {"enabled": False}}}, chart=chart)
    assert not [d for d in off if "grafana_dashboard" in d["metadata"]["labels"]]


TEMPLATE_CHECKS = {
    "missing checkpoint source": ({"checkpoint": {"source": None}}, "checkpoint.source is missing"),
    "huggingface without a repo": ({"checkpoint": {"source": "huggingface"}}, "checkpoint.huggingface.repo is missing"),
    "url without a location": ({"checkpoint": {"source": "url"}}, "checkpoint.url.location \"\" is not an http"),
    "negative replicas": ({"workers": {"replicas": -1, "minReplicas": -1}}, "workers.replicas is -1: it must not be"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CHECKS))
def test_templates_refuse_bad_values_without_the_schema(case, tmp_path):
    """The same mistakes are refused by the templates when the schema is skipped (--skip-schema-validation)."""
    chart = tmp_path / "supernet-router"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    values, message = TEMPLATE_CHECKS[case]
    with pytest.raises(helm.HelmError) as failure:
        render(values, chart=chart)
    assert message in str(failure.value)
