"""Registry of methods. Each module exposes ``Config`` (a frozen dataclass) and
``make(config, spec) -> Method``; see ``dpjax/methods/base.py`` for the contract.

``config.method`` is a name registered in ``METHODS`` or the import path of a module
outside dpjax that follows the same contract (``my_lab.dp_vae``): a new method needs no
change to dpjax. The path is stored in the run's config.json, so every mode (sample,
eval, export, resume) imports it again; it must be importable (e.g. on PYTHONPATH).
Importing runs the module's code, so a module named by a run's STORED config (a
workdir opened for sample, eval, export or audit, or loaded as a ``*_from`` source) is
imported only if the user lists it in $DPJAX_TRUSTED_METHODS (``check_trusted``): a run
handed over by someone else could otherwise name a module it ships itself (``python -m``
puts the current directory on ``sys.path``) and run it with the user's files and private
data (untrusted-input review, 2026-12-07). A module that lies inside a dpjax workdir (a
folder holding a ``dp_plan.json``, or below one) is refused even then. The method of
the user's own experiment file (``--config``) needs no listing: the user named it.

A module may also expose ``make_restored(config, spec) -> Method``: the method of a run
whose checkpoint is about to be restored into it (sampling, eval, export, or a run
loaded as a starting point). It may skip work whose result the checkpoint holds (LDM:
measuring the latent scale on public data). ``make_for_restore`` picks it.
"""

import dataclasses
import importlib
import importlib.util
import os
from types import ModuleType

#: Files that mark a dpjax workdir (every run writes dp_plan.json first) or an export
#: (manifest.json): code that comes with either is never imported.
_WORKDIR_MARKERS = ("dp_plan.json", "manifest.json")
#: Comma-separated import paths of method modules that stored runs may name.
TRUST_ENV = "DPJAX_TRUSTED_METHODS"

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
        _refuse_modules_in_workdirs(name)
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


def check_trusted(name: str) -> None:
    """Raises ValueError unless method ``name``, read from a stored run, is registered or
    an import path the user listed in $DPJAX_TRUSTED_METHODS (it is not imported here)."""
    if name in METHODS or not is_import_path(name):
        return  # Registered, or an unknown name that get_method_module reports.
    trusted = {n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()}
    if name not in trusted:
        raise ValueError(
            f"This run's method is the module '{name}', not one of dpjax's; importing it "
            "runs its code with your files and data. If it is your own (or you have read "
            f"it), allow it with {TRUST_ENV}={name} (comma-separated for several)."
        )


def _refuse_modules_in_workdirs(name: str) -> None:
    """Raises ValueError if ``name`` or a package above it lies in a dpjax workdir.

    Checked a level at a time before that level is imported: ``find_spec('a.b')`` runs
    package ``a``'s ``__init__``, which the check of ``a`` has cleared by then."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        spec = importlib.util.find_spec(".".join(parts[:i]))
        if spec is None:
            return  # import_module raises ModuleNotFoundError for it.
        places = list(spec.submodule_search_locations or [])
        if spec.origin and os.path.isabs(spec.origin):
            places.append(os.path.dirname(spec.origin))
        for place in places:
            folder = os.path.realpath(place)
            while True:
                if any(os.path.isfile(os.path.join(folder, m)) for m in _WORKDIR_MARKERS):
                    raise ValueError(
                        f"Method module '{name}' lies inside the dpjax workdir or export "
                        f"{folder}: dpjax does not import code that comes with a run or a "
                        "release (it would run with your "
                        "files and your private data). Install the method's package from "
                        "its source, outside any workdir, and use its import path."
                    )
                parent = os.path.dirname(folder)
                if parent == folder:
                    break
                folder = parent


def make_released(name: str, config, spec, record: dict):
    """The method ``name`` rebuilt from an export (``dpjax.released``): the module's
    ``make_released(config, spec, record)`` with ``record`` its ``release_record()``; a
    module without one is built by ``make`` if its settings name no source run (a
    ``*_from`` setting), which an export has redacted and a recipient does not have."""
    module = get_method_module(name)
    if hasattr(module, "make_released"):
        return module.make_released(config, spec, record)
    named = [f.name for f in dataclasses.fields(config)
             if f.name.endswith("_from") and getattr(config, f.name)]
    if named:
        raise ValueError(
            f"Method {name!r} cannot be rebuilt from an export: its settings name source "
            f"runs ({', '.join(named)}) and the module defines no make_released.")
    return module.make(config, spec)


def make_for_restore(name: str, config, spec):
    """The method ``name`` built to receive a checkpoint (``make_restored`` if defined)."""
    module = get_method_module(name)
    return getattr(module, "make_restored", module.make)(config, spec)
