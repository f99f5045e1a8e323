import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Two host devices for the keras.distribution tests on JAX (set before JAX loads).
if os.environ["KERAS_BACKEND"] == "jax" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with default dtype policy, seeds and a clear session."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    if keras.backend.backend() == "jax":
        keras.distribution.set_distribution(None)
    keras.backend.clear_session(free_memory=False)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------ tiers
#
# `--tier quick` (what the README's test command runs) keeps every test
# function of every module but those marked `slow` (subprocesses, real
# architectures: each module keeps others), and of each parametrized family a
# deterministic sample: the first case and about one in QUICK_STRIDE of the
# rest, chosen by a hash of the test id so the sample spreads over every
# parameter (every optimizer, every feature) instead of repeating one column. `--tier rest` runs
# exactly the cases the quick tier leaves out, so quick + rest = full (CI runs
# both); `--tier full` (the default of a plain `pytest`) runs everything.

QUICK_STRIDE = 8


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("quick", "rest", "full"), default="full",
                     help="quick: a sample of each parametrized family; rest: the complement; full: all")


def in_quick_tier(items):
    """The nodeids the quick tier keeps, from the collected items."""
    import zlib

    families: dict = {}
    for item in items:
        families.setdefault((item.path, getattr(item, "originalname", item.name)), []).append(item)
    keep = set()
    for family in families.values():
        if family[0].get_closest_marker("slow") is not None:
            continue
        keep.add(family[0].nodeid)
        keep.update(i.nodeid for i in family[1:] if zlib.crc32(i.nodeid.encode()) % QUICK_STRIDE == 0)
    return keep


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier == "full":
        return
    quick = in_quick_tier(items)
    selected = [i for i in items if (i.nodeid in quick) == (tier == "quick")]
    deselected = [i for i in items if (i.nodeid in quick) != (tier == "quick")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
