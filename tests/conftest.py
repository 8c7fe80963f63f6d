"""Test-session settings: a persistent XLA compilation cache shared by the tests.

Several tests build the same small models (every DPDM smoke config uses the same tiny
UNet); the cache turns their repeated compilations into lookups. It lives in a
temporary directory of the session, so no test depends on a previous run. The session
that creates it (the pytest-xdist controller under ``make test``, else the one process)
removes it; the xdist workers and the CLI subprocesses some tests start inherit it
through the environment (``JAX_COMPILATION_CACHE_DIR``), so a model compiled by one of
them is a lookup for the others. Concurrent access is safe when ``filelock`` is
installed: JAX then locks every read and write (a size limit turns the lock on).

XLA's LLVM optimizations dominate compile time on CPU for these small models (3x);
the tests run with them off (numerics are unchanged: every comparison is within one
configuration). The CPU shows four devices, as under ``make test``.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

_NO_LLVM_OPT = "--xla_backend_optimization_level=0"
if _NO_LLVM_OPT not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _NO_LLVM_OPT).strip()
# Four host devices, as ``make test`` gives them, also for a plain ``pytest`` run: the
# multi-device tests (one noise draw per step, sharded == one-device) skip without them.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"

# Without filelock JAX cannot lock the cache, so each process then keeps its own.
_LOCKED = importlib.util.find_spec("filelock") is not None
_CREATOR = "DPJAX_TEST_XLA_CACHE" not in os.environ
if _CREATOR:
    _cache = tempfile.mkdtemp(prefix="dpjax-xla-cache-")
    os.environ["DPJAX_TEST_XLA_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    # Read by JAX at import, here and in every process started from here.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if _LOCKED:
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import jax  # noqa: E402
import pytest  # noqa: E402

if not _CREATOR and not _LOCKED:
    _own = tempfile.mkdtemp(prefix="dpjax-xla-cache-")
    atexit.register(shutil.rmtree, _own, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _own)


@pytest.fixture(autouse=True)
def _quiet_logs():
    from dpjax import log_setup

    log_setup.quiet()


@pytest.fixture
def same_noise_secret(monkeypatch):
    """Every run this test starts in-process draws the same noise secret, so that runs in
    two workdirs (resumed and uninterrupted, 4 and 1 devices) can be compared bit for bit
    on the default secret path (``dpjax/privacy/noise_secret.py``). A run in a subprocess
    draws its own: such tests use ``--config.dp.secret_noise=False``."""
    from dpjax.privacy import noise_secret

    monkeypatch.setattr(noise_secret, "_draw",
                        lambda: {"noise": 12345, "batches": 678, "created": "test",
                                 noise_secret.LOSS_DRAWS_FIELD: noise_secret.LOSS_DRAWS_SECRET})


@pytest.fixture
def record_tried(request):
    """Returns ``record(kind, what)``: notes one fault or bad input a test tried.

    The note rides on the test's report (``user_properties``), so the summary below
    counts it whether the tests ran in this process or in pytest-xdist workers.
    """

    def record(kind: str, what: str) -> None:
        request.node.user_properties.append(("dpjax_tried", (kind, what)))

    return record


def pytest_terminal_summary(terminalreporter):
    """Reports how many faults and bad inputs the run tried (issue: trust)."""
    tried: dict[str, list[str]] = {}
    seen = set()
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) != "call":
                continue
            for name, value in getattr(rep, "user_properties", ()):
                if name != "dpjax_tried" or (rep.nodeid, tuple(value)) in seen:
                    continue
                seen.add((rep.nodeid, tuple(value)))
                kind, what = value
                tried.setdefault(kind, []).append(what)
    for kind in sorted(tried):
        items = sorted(tried[kind])
        terminalreporter.write_line(f"dpjax {kind} tried: {len(items)}")
        for item in items:
            terminalreporter.write_line(f"  - {item}")
