import os
import shutil

import numpy as np
import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _has_cuda()


#: Files whose tests take longest, run first: with one file per pytest-xdist worker, a long file
#: started last would run alone at the end while the other workers wait.
FIRST = ("test_tune_e2e.py", "test_tune.py")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test session builds into its own kernel cache unless TVMFLASH_CACHE is set."""
    if "TVMFLASH_CACHE" not in os.environ:
        os.environ["TVMFLASH_CACHE"] = str(tmp_path_factory.mktemp("tvmflash-cache"))
    yield


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fixed per test, different across tests."""
    return np.random.default_rng(sum(map(ord, request.node.nodeid)))


NVCC = shutil.which("nvcc")
