"""Loading an experiment file (a Python file that defines ``get_config``) by its path.

``dpjax.main`` reads experiments through ml_collections' ``config_flags``; the two other
readers, the unknown-key message of ``flag_errors`` and ``launch.sweep``, load the file
themselves through this one function.
"""

from __future__ import annotations

import importlib.util
import types


def load(path: str, module_name: str) -> types.ModuleType:
    """Executes the experiment file at ``path`` as a fresh module named ``module_name``.

    The module is not registered in ``sys.modules``: each call runs the file again.
    Raises whatever the file raises, and FileNotFoundError where there is no such file.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"No experiment file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
