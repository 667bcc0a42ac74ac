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


@pytest.fixture
def without_hopper(tmp_path_factory, monkeypatch):
    """The registry without the Hopper rule (``fused_hopper``), for a test of the mma.sync kernel
    at the H100 target: that rule serves the H100's dense head dims 64 and 128 first, the mma.sync
    rule its variants, static shapes and even builds (and every spec without the Hopper rule).
    A kernel cache of its own (a process's): the same key names the other rule's kernel there, which another
    test process may be building into the shared one."""
    from tvmflash import rules

    # (one per test process: its tests share their builds)
    monkeypatch.setenv("TVMFLASH_CACHE", str(tmp_path_factory.getbasetemp() / "mma-cache"))
    names = [r.name for r in rules.RULES]
    at = names.index("fused_hopper")
    rule = rules.RULES[at]
    rules.unregister(rule)
    try:
        yield
    finally:
        rules.register(rule, before=names[at + 1])
