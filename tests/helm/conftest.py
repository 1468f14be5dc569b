"""Fixtures of the chart tests (Helm v4 through helm-python-sdk; kubernetes-validate)."""

from __future__ import annotations

import pytest

from tests.helm.chart import SCHEMAS

HELM_MISSING = ("helm-python-sdk (Helm v4 as a library) is not installed: install the dev requirements "
                "(pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def crd_schemas():
    """shared/schemas/ (the CRDs' openAPIV3Schema), read in place."""
    if not (SCHEMAS / "kuberay" / "ray.io_rayservices.yaml").is_file():
        pytest.skip(f"no CRD schemas at {SCHEMAS} (set SUPERNET_CRD_SCHEMAS to the shared/schemas folder)")
    return SCHEMAS
