import pytest


@pytest.fixture(scope="session")
def kernel_model(tiny_checkpoint):
    """The tiny model as serving runs it on a CPU: the numba decode kernels (``tiny_model`` is plain torch)."""
    from workers.model.loader import load_checkpoint

    return load_checkpoint(tiny_checkpoint)
