"""The manifest of an export: what it holds, how it was made, and a check that it is intact.

``export.export_run`` writes ``manifest.json`` last, into the export it describes:

* ``files``: every other file of the export (``png/`` included) with its SHA-256 and
  size, so a recipient can tell that nothing was changed, added or lost in transit;
* ``method``, ``step``, ``data`` (the run config's public names of the data: source,
  name, split, image shape, classes; never its location), ``privacy`` (the guarantee as
  the privacy report states it), ``samples`` (how ``samples.npz`` was drawn: count,
  seeds, batch size and the key derivation, enough to draw them again from the
  exported model: ``dpjax.released``), ``audit`` (the run's own audit verdict, where
  one may be quoted: 'none' also for an audit on the private rows).

``verify(directory)`` recomputes the hashes; ``python -m dpjax.export_manifest DIR``
prints the result and exits 1 on any mismatch. The manifest is not a signature: whoever
can change the files can rewrite it too; publish its SHA-256 (printed by the export and
by the check) beside the release to pin the whole of it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from typing import Any

from dpjax import atomic_file

MANIFEST = "manifest.json"
FORMAT = "dpjax-export"
FORMAT_VERSION = 1
def file_digests(directory: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {'sha256', 'bytes'}}`` of every regular file under ``directory``
    except the manifest, with '/'-separated paths in sorted order.

    Raises:
      ValueError: for a symbolic link or anything that is not a regular file or a
        directory (an export holds only files it wrote itself).
    """
    out: dict[str, dict[str, Any]] = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            if os.path.islink(path) or not os.path.isfile(path):
                raise ValueError(f"{path} is not a regular file; an export holds only files.")
            out[rel] = {"sha256": atomic_file.sha256_file(path), "bytes": os.path.getsize(path)}
    return dict(sorted(out.items()))


def dpjax_version() -> str | None:
    """The installed dpjax distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("dpjax")
    except importlib.metadata.PackageNotFoundError:
        return None


def write_manifest(directory: str, facts: dict[str, Any]) -> str:
    """Writes ``directory/manifest.json``: ``facts`` plus the format and the digests of
    every other file now in ``directory``. Call it after the last other file is written.
    Returns the SHA-256 of the manifest itself."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dpjax_version": dpjax_version(),
        **facts,
        "files": file_digests(directory),
    }
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump(atomic_file.json_safe(manifest), f, indent=2, allow_nan=False)
        f.write("\n")
    return atomic_file.sha256_file(path)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the export in ``directory``.

    Raises:
      ValueError: if it is missing, not JSON, or not a dpjax export manifest.
    """
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: {directory} is not a dpjax export "
                         "(or one from before exports carried a manifest).") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dpjax export manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}; "
                         f"this dpjax reads {FORMAT_VERSION}.")
    if not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} lists no files.")
    return manifest


def verify(directory: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """The differences between the export in ``directory`` and its manifest (``manifest``
    if the caller read it already): files changed (hash or size), missing, or not
    listed. An empty list means every file is exactly as exported.

    Raises:
      ValueError: if the manifest is missing or unreadable (``read_manifest``).
    """
    listed = (manifest or read_manifest(directory))["files"]
    try:
        present = file_digests(directory)
    except ValueError as e:
        return [str(e)]
    problems = []
    for name in sorted(set(listed) | set(present)):
        want, have = listed.get(name), present.get(name)
        if want is not None and not isinstance(want, dict):
            problems.append(f"{name}: the manifest's entry is not a record ({want!r})")
        elif have is None:
            problems.append(f"{name}: missing")
        elif want is None:
            problems.append(f"{name}: not in the manifest (added after the export)")
        elif (want.get("sha256"), want.get("bytes")) != (have["sha256"], have["bytes"]):
            problems.append(f"{name}: changed (sha256 {have['sha256'][:12]}..., "
                            f"{have['bytes']} bytes; the manifest says "
                            f"{str(want.get('sha256'))[:12]}..., {want.get('bytes')} bytes)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m dpjax.export_manifest DIR``: 0 if the export is intact, 1 if not, 2 on
    a usage error or a missing or unreadable manifest."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m dpjax.export_manifest EXPORT_DIR", file=sys.stderr)
        return 2
    directory = args[0]
    try:
        manifest = read_manifest(directory)
    except ValueError as e:
        print(f"[dpjax] {e}", file=sys.stderr)
        return 2
    problems = verify(directory, manifest)
    listed = manifest["files"]
    digest = atomic_file.sha256_file(os.path.join(directory, MANIFEST))
    if problems:
        print(f"[dpjax] {directory} does NOT match its manifest:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"[dpjax] {directory}: all {len(listed)} files match manifest.json "
          f"(sha256 {digest}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
