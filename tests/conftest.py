import os

# Nothing may be downloaded: make diffusers / transformers fail fast instead of reaching for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (full-size models: minutes and up to ~10 GB of RAM)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: full-size or long-running; skipped unless --run-slow (outside CI)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("VELODIFF_RUN_SLOW") == "1"
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
