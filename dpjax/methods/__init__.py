"""Registry of methods. Each module exposes ``Config`` (a frozen dataclass) and
``make(config, spec) -> Method``; see ``dpjax/methods/base.py`` for the contract."""

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "autoencoder": "dpjax.methods.autoencoder",
    "classifier": "dpjax.methods.classifier",
    "dpdm": "dpjax.methods.dpdm",
    "dpmepf": "dpjax.methods.dpmepf",
    "dplflow": "dpjax.methods.dplflow",
    "dpsad": "dpjax.methods.dpsad",
    "ldm": "dpjax.methods.ldm",
    "toy": "dpjax.methods.toy",
}


def get_method_module(name: str) -> ModuleType:
    """The module implementing method ``name``; a clear error for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"Unknown method '{name}'. Known methods: {sorted(METHODS)}.")
    return importlib.import_module(METHODS[name])
