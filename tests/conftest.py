"""Test-session settings: a persistent XLA compilation cache shared by the tests.

Several tests build the same small models (every DPDM smoke config uses the same tiny
UNet); the cache turns their repeated compilations into lookups. It lives in a
temporary directory of the session, so no test depends on a previous run.

XLA's LLVM optimizations dominate compile time on CPU for these small models (3x);
the tests run with them off (numerics are unchanged: every comparison is within one
configuration).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="dpjax-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _quiet_logs():
    from dpjax import log_setup

    log_setup.quiet()


def pytest_terminal_summary(terminalreporter):
    """Reports how many faults and bad inputs the run tried (issue: trust)."""
    import sys

    tried = []
    for name, attr in (("tests.test_train_loop", "FAULTS_TRIED"),
                       ("tests.test_bad_inputs", "BAD_INPUTS_TRIED")):
        module = sys.modules.get(name)
        if module is not None:
            tried.append((attr, list(getattr(module, attr, []))))
    for attr, items in tried:
        label = attr.lower().replace("_", " ")
        terminalreporter.write_line(f"dpjax {label}: {len(items)}")
        for item in items:
            terminalreporter.write_line(f"  - {item}")
