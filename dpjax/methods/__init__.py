"""Registry of methods. Each module exposes ``Config`` (a frozen dataclass) and
``make(config, spec) -> Method``; see ``dpjax/methods/base.py`` for the contract.

A module may also expose ``make_restored(config, spec) -> Method``: the method of a run
whose checkpoint is about to be restored into it (sampling, eval, export, or a run
loaded as a starting point). It may skip work whose result the checkpoint holds (LDM:
measuring the latent scale on public data). ``make_for_restore`` picks it.
"""

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


def make_for_restore(name: str, config, spec):
    """The method ``name`` built to receive a checkpoint (``make_restored`` if defined)."""
    module = get_method_module(name)
    return getattr(module, "make_restored", module.make)(config, spec)
