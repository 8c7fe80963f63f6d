"""Registry of methods. Each module exposes ``Config`` (a frozen dataclass) and
``make(config, spec) -> Method``; see ``dpjax/methods/base.py`` for the contract.

``config.method`` is a name registered in ``METHODS`` or the import path of a module
outside dpjax that follows the same contract (``my_lab.dp_vae``): a new method needs no
change to dpjax. The path is stored in the run's config.json, so every mode (sample,
eval, export, resume) imports it again; it must be importable (e.g. on PYTHONPATH).
Importing runs the module's code: open only workdirs you trust (as with a pickle).

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


def is_import_path(name: str) -> bool:
    """Whether ``name`` names a method module by its import path (it has a dot)."""
    return "." in name and all(part.isidentifier() for part in name.split("."))


def get_method_module(name: str) -> ModuleType:
    """The module implementing method ``name`` (registered, or an import path); a clear
    ValueError for an unknown name, a module that cannot be imported, or one that lacks
    the contract's ``Config`` and ``make``."""
    if name in METHODS:
        return importlib.import_module(METHODS[name])
    if not is_import_path(name):
        raise ValueError(
            f"Unknown method '{name}'. Known methods: {sorted(METHODS)}, or the import path "
            "of a module with Config and make (e.g. 'my_lab.dp_vae')."
        )
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise  # The module itself failed to import one of its own imports: a bug.
        raise ValueError(
            f"Method module '{name}' cannot be imported ({e}); put its package on "
            "PYTHONPATH, or use a registered method: " + ", ".join(sorted(METHODS)) + "."
        ) from e
    missing = [a for a in ("Config", "make") if not hasattr(module, a)]
    if missing:
        raise ValueError(
            f"Method module '{name}' lacks {missing}: a method module defines Config (a "
            "frozen dataclass) and make(config, spec) (dpjax/methods/base.py)."
        )
    return module


def make_for_restore(name: str, config, spec):
    """The method ``name`` built to receive a checkpoint (``make_restored`` if defined)."""
    module = get_method_module(name)
    return getattr(module, "make_restored", module.make)(config, spec)
