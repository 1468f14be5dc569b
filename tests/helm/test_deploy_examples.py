"""deploy/: the H100 example's presets, its memory sizing in the README, and the image's promises to the chart."""

from __future__ import annotations

import importlib.util
import re

import yaml

from policies.placement import Mixer, Placement
from policies.published import published_preset
from tests.helm.chart import CHART, DEPLOY, values_file


def load_sizing():
    spec = importlib.util.spec_from_file_location("deploy_sizing", DEPLOY / "sizing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_h100_presets_have_the_published_mixer_counts():
    presets = values_file("values-h100.yaml")["app"]["presets"]
    assert len(presets) >= 3
    for preset in presets:
        counts = Placement.parse(preset["placement"], num_layers=48).counts()
        published = published_preset(preset["name"])
        assert counts == published.counts(), preset["name"]
        assert preset["quality"] == published.retention_pct / 100, preset["name"]


def test_readme_sizing_is_what_sizing_py_computes():
    """The numbers in deploy/README.md are deploy/sizing.py's output, not typed by hand."""
    readme = (DEPLOY / "README.md").read_text()
    block = re.search(r"<!-- sizing:begin -->\n(.*?)\n<!-- sizing:end -->", readme, re.S)
    assert block, "deploy/README.md has no <!-- sizing:begin --> ... <!-- sizing:end --> block"
    sizing = load_sizing()
    expected = sizing.sizing_table(DEPLOY / "values-h100.yaml", sizing.H100_GIB, sizing.CONTEXT_GIB, [32768, 16384])
    assert block.group(1).strip() == expected.strip(), "regenerate it: .venv/bin/python deploy/sizing.py"


def test_sizing_arithmetic():
    """The cache sizes the README quotes, from SUPERNET.md's shapes."""
    sizing = load_sizing()
    total, parts = sizing.weight_bytes()
    assert 48e9 < total < 51e9  # "about 50 GB in bf16"
    assert parts["attention"] == parts["sliding_window"] == 48 * 2 * 5120 * (4096 + 1024 + 1024 + 4096)
    from workers.model.config import parse_config, supernet_config_dict
    from workers.profiling import SHAPES

    memory = parse_config(supernet_config_dict(**SHAPES["superapriel-15b"])).memory_model(kv_bytes=2)
    page = memory.page_tokens * 2 * 8 * 128 * 2  # the pool's block: one 544-token page
    assert memory.layer_bytes(0, Mixer.ATTENTION, 32768) == 61 * page  # 32768 tokens on 61 pages
    assert memory.layer_bytes(0, Mixer.SLIDING_WINDOW, 32768) == 8 * page  # the 4096-token ring
    assert memory.layer_bytes(0, Mixer.GDN, 32768) == page >= 32 * 128 * 128 * 4 + (2 * 1024 + 4096) * 3 * 2
    assert memory.layer_bytes(0, Mixer.KDA, 32768) == page >= 32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2


def test_image_matches_the_chart():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "flash-linear-attention==0.6.0 fla-core==0.6.0" in dockerfile
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M) and "nvidia/cuda:" in dockerfile
    assert re.search(r"pip install -c constraints.txt \.", dockerfile)
    run_as = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert re.search(rf"^USER {run_as}:{run_as}$", dockerfile, re.M), "the image's user is the chart's runAsUser"
    assert "wget" in dockerfile  # KubeRay's probes run wget in the Ray containers
    ignored = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    assert ignored[0] == "*" and "!router/" in ignored and "!constraints.txt" in ignored
