"""Loading a benchmark script (benchmarks/ is not a package) as a module for its tests."""

import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(relative_path: str, name: str) -> types.ModuleType:
    """Imports ``ROOT/relative_path`` as module ``name`` (registered in sys.modules,
    where dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
