"""An export read back into dpjax, without its workdir or source runs, to sample from it.

``load_export(directory)`` rebuilds the method from ``model_config.json`` (its settings,
the public data spec and the method's ``release_record``, through the module's
``make_released``) and fills its parameters from ``ema_params.npz`` and
``frozen_params.npz``. ``sample_from_export`` draws samples from it; ``python -m
dpjax.main --mode=sample --export=DIR --out=OUT`` calls it.

Guarantees:
* The export is first checked against its ``manifest.json`` (``export_manifest.verify``):
  a changed, missing or added file is refused before anything is loaded.
* The weights fit the rebuilt method exactly: every trainable leaf comes from
  ``ema_params.npz`` under its path, with its shape and dtype, and nothing is left over;
  every frozen leaf the method publishes (``exported_frozen``) comes from
  ``frozen_params.npz`` likewise. Frozen leaves an export never holds (DP-SAD's teacher)
  are NaN: sampling does not read them, and one that did would draw NaN, which
  ``sample_from_export`` refuses (``generate(require_finite=True)``) rather than write
  black images. An export listing a file that no export writes (``export.ALLOWED``) is
  refused.
* Sampling an export is post-processing of the released model: its samples carry the
  export's guarantee (its ``privacy_report.json``), and no private data exists here.
* A method module outside dpjax is imported only if the user trusts it
  (``$DPJAX_TRUSTED_METHODS``), as for a workdir.
* With the defaults (the export's sample count, batch size and seed), the samples are
  the export's ``samples.npz`` again (the manifest's key derivation; the same platform
  and JAX version draw the same bits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import export, export_manifest, sample
from dpjax import methods as methods_lib
from dpjax.methods.base import DataSpec, Params
from dpjax.typed_config import ConfigError, from_configdict


class ExportLoadError(ValueError):
    """The directory is not an intact export that this dpjax can rebuild."""


@dataclasses.dataclass
class ReleasedModel:
    """A model rebuilt from an export.

    Attributes:
      directory: the export.
      method: the method object (built by its module's ``make_released``).
      params: the EMA trainable parameters and the published frozen ones.
      spec: the public data spec.
      manifest: ``manifest.json`` (the guarantee, how the export's samples were drawn).
      model_config: ``model_config.json``.
    """

    directory: str
    method: Any
    params: Params
    spec: DataSpec
    manifest: dict[str, Any]
    model_config: dict[str, Any]


def _fill(template: Any, arrays: dict[str, np.ndarray], what: str,
          published: set[str] | None = None) -> Any:
    """``template`` (a pytree of shapes) with each leaf taken from ``arrays`` by path;
    leaves outside ``published`` (None: all) are NaN placeholders instead. Raises
    ExportLoadError on a missing, extra or mis-shaped array."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [export.path_name(p) for p, _ in flat]
    wanted = set(names) if published is None else set(names) & published
    extra, missing = sorted(set(arrays) - wanted), sorted(wanted - set(arrays))
    if extra or missing:
        raise ExportLoadError(
            f"{what} does not fit the rebuilt model: missing {missing[:5]}, unexpected "
            f"{extra[:5]} (an export of another dpjax version, or edited).")
    leaves = []
    for name, (_, shape) in zip(names, flat):
        if name not in wanted:
            fill = np.nan if jnp.issubdtype(shape.dtype, jnp.floating) else 0
            leaves.append(jnp.full(shape.shape, fill, shape.dtype))
            continue
        x = arrays[name]
        if x.shape != shape.shape or x.dtype != shape.dtype:
            raise ExportLoadError(
                f"{what}: '{name}' is {x.dtype}{list(x.shape)}, the rebuilt model needs "
                f"{shape.dtype}{list(shape.shape)}.")
        leaves.append(jnp.asarray(x))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        return {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an npz archive")
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ExportLoadError(f"{path} is unreadable ({type(e).__name__}: {e}).") from None


def _is_export_file(name: str) -> bool:
    """Whether ``name`` (a manifest path) is a file an export writes (``export.ALLOWED``,
    or a PNG of the ``png/<class>/`` folder)."""
    parts = name.split("/")
    if len(parts) == 1:
        return name in export.ALLOWED and name != "png"
    return (len(parts) == 3 and parts[0] == "png" and parts[1].isdigit()
            and parts[2].endswith(".png") and parts[2][:-4].isdigit())


def load_export(directory: str) -> ReleasedModel:
    """The model of the export in ``directory``, checked and rebuilt (module docstring).

    Raises:
      ExportLoadError: no manifest, files that differ from it or that no export
        writes, weights or settings that do not fit the method this dpjax rebuilds, an
        untrusted method module, or one that cannot be rebuilt.
      ConfigError: settings this dpjax does not know (e.g. an export of another version).
    """
    directory = os.path.abspath(directory)
    try:
        manifest = export_manifest.read_manifest(directory)
    except ValueError as e:
        raise ExportLoadError(str(e)) from None
    problems = export_manifest.verify(directory, manifest)
    if problems:
        raise ExportLoadError(
            f"{directory} does not match its manifest.json ({'; '.join(problems[:5])}); "
            "refusing to load it.")
    foreign = sorted(n for n in manifest["files"] if not _is_export_file(n))
    if foreign:
        raise ExportLoadError(
            f"{directory} holds files that no dpjax export writes ({', '.join(foreign[:5])}); "
            "refusing to load it.")
    path = os.path.join(directory, "model_config.json")
    try:
        with open(path) as f:
            model = json.load(f)
        name, spec_dict = str(model["method"]), model["data_spec"]
        spec = DataSpec(tuple(int(x) for x in spec_dict["image_shape"]),
                        int(spec_dict["num_classes"]))
        rebuild = model["rebuild"]
        if not isinstance(rebuild, dict):
            raise TypeError(f"rebuild is {rebuild!r}, not a record")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportLoadError(
            f"{path} lacks what a rebuild needs ({type(e).__name__}: {e}); an export from "
            "before dpjax recorded it: export the run again.") from None
    try:
        methods_lib.check_trusted(name)  # Before anything imports it.
        module = methods_lib.get_method_module(name)
        config = from_configdict(module.Config, model.get("method_args", {}), "method_args")
        method = methods_lib.make_released(name, config, spec, rebuild)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # The record's too.
        raise ExportLoadError(f"{path}: {type(e).__name__}: {e}") from None
    template = jax.eval_shape(lambda: method.init(jax.random.key(0), spec))
    published = {export.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        method.exported_frozen(template.frozen))[0]}
    trainable = _fill(template.trainable, _read_npz(os.path.join(directory, "ema_params.npz")),
                      "ema_params.npz")
    frozen = _fill(template.frozen, _read_npz(os.path.join(directory, "frozen_params.npz")),
                   "frozen_params.npz", published)
    return ReleasedModel(directory, method, Params(trainable, frozen), spec, manifest, model)


def sample_from_export(
    directory: str,
    out_dir: str,
    num: int | None = None,
    png: bool = False,
    seed: int | None = None,
    batch_size: int | None = None,
    log=print,
) -> str:
    """``--mode=sample --export``: ``num`` samples (default: as many as the export's) of
    the export's model into ``out_dir``, drawn in batches of ``batch_size`` (default: the
    export's) with the key of export seed ``seed`` (default: the export's;
    ``export.sample_key``). Returns the path of ``samples.npz``. ``out_dir`` must be new,
    empty or hold only earlier samples, and must not lie inside the export (its manifest
    would no longer match), also not through a symbolic link.

    Raises:
      ExportLoadError: as ``load_export``, or the model draws non-finite values.
    """
    directory, out_dir = os.path.realpath(directory), os.path.realpath(out_dir)
    if os.path.commonpath([directory, out_dir]) == directory:
        raise sample.SampleOutputError(
            f"--out {out_dir} lies inside the export {directory}; write samples elsewhere.")
    sample.check_sample_out(out_dir)
    model = load_export(directory)
    drawn = model.manifest.get("samples", {})
    try:
        num = int(num if num is not None else drawn.get("num", 1000))
        batch = int(batch_size if batch_size is not None else drawn.get("batch_size", 1000))
        seed = int(drawn.get("export_seed", 0) if seed is None else seed)
        config_seed = int(drawn.get("config_seed", 0))
    except (AttributeError, TypeError, ValueError) as e:
        raise ExportLoadError(f"{directory}/manifest.json: its 'samples' record is "
                              f"malformed ({type(e).__name__}: {e}).") from None
    if num < 1 or batch < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch}.")
    key = export.sample_key(config_seed, seed)
    try:
        images, labels = sample.generate(model.method, model.params, model.spec, key, num,
                                         batch, require_finite=True)
    except ValueError as e:
        raise ExportLoadError(
            f"{e} The export's model (or its rebuild by this dpjax) is broken; no samples "
            "were written.") from None
    privacy = model.manifest.get("privacy", {})
    log(f"[dpjax] {num} samples of the {model.model_config['method']} export {directory} "
        f"(post-processing: the export's guarantee, epsilon {privacy.get('epsilon')} at "
        f"delta {privacy.get('delta')}, holds for them)")
    extra = {"sample_batch": np.int64(max(1, min(batch, num))), "sample_seed": np.int64(seed)}
    return sample.write_samples(images, labels, out_dir, png,
                                sample.released_classes(model.method, model.spec), extra=extra)
