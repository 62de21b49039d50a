"""Model folders built once and kept in a cache: the de-quantised builtin models.

Loading a GGUF (``gemma-3-270m``'s Q4_K weights and 262k-token vocabulary) takes 1–2 min on 2
CPU cores; loading the same weights and tokenizer from safetensors and ``tokenizer.json`` takes
seconds. :func:`cached_folder` builds such a folder once
with a caller's ``build`` function and hands back the folder on every later call::

    <root>/<name>-<key[:16]>/           the committed folder (key: the source's sha256)
        config.json, model.safetensors, tokenizer.json, ...   what ``build`` wrote
        .isdelta-cache.json             the manifest: key, and each file's size, mtime, xxh3-128
    <root>/.<name>-<key[:16]>.<host>.<pid>.<hex>.tmp    a build in progress (private to it)

The root is ``$ISDELTA_MODEL_CACHE``, else :func:`isdelta.outputs.cache_dir` ``("models")``.

Atomic: a build writes into its own temporary sibling folder, writes the manifest last, then
renames the folder into place; the rename is the commit. Two processes that build at once never
touch each other's files: the first rename wins and the loser, whose rename finds the folder
there, checks the winner's and uses it. A build that was interrupted leaves only its temporary
folder, which no reader looks at and the next build deletes once its process is gone.

Checked on every use, cheaply: the manifest must be readable and name the same key, and every
file it lists must exist with its size and modification time. A file whose size differs is
damaged; one whose mtime differs (rewritten in place, or copied without ``-p``) is read again
and compared with its xxh3-128 digest (0.3 s per GB). An unchanged folder costs one ``stat`` per
file. A damaged folder is moved aside, deleted and rebuilt, with a warning naming what was wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from isdelta.outputs import atomic_write, cache_dir

__all__ = ["ENV", "MANIFEST", "cached_folder", "folder_problem", "model_cache_dir"]

ENV = "ISDELTA_MODEL_CACHE"
MANIFEST = ".isdelta-cache.json"  # hidden: model_files (a model's identity) skips it
_FORMAT = 1
_BLOCK = 1 << 22  # 4 MiB reads


def model_cache_dir(*parts: str) -> Path:
    """The model cache (``$ISDELTA_MODEL_CACHE``, else ``cache_dir("models")``) joined with
    ``parts``; not created."""
    root = os.environ.get(ENV)
    return (Path(root).expanduser() if root else cache_dir("models")).joinpath(*parts)


def cached_folder(
    name: str,
    key: str,
    build: Callable[[Path], None],
    *,
    message: str | None = None,
    root: str | os.PathLike | None = None,
) -> Path:
    """The folder ``build`` makes for ``name`` from the source ``key``, built once and reused.

    Parameters
    ----------
    name : str
        The model's name: the folder is ``<root>/<name>-<key[:16]>``.
    key : str
        Hex digest of the source the folder is made from (a GGUF's sha256): another source gets
        another folder, and a manifest that names another key marks the folder damaged.
    build : callable
        ``build(folder)`` writes the model's files into ``folder`` (empty, private to this call).
        An exception leaves nothing behind and propagates.
    message : str, optional
        What a build does and how long it takes, printed to stderr (with the folder) before it.
    root : path, optional
        The cache; default :func:`model_cache_dir`.

    Returns
    -------
    Path
        The committed folder: checked (see the module docstring), or built now.
    """
    root = Path(root) if root is not None else model_cache_dir()
    folder = root / f"{name}-{key[:16]}"
    problem = folder_problem(folder, key)
    if problem is None:
        return folder
    if folder.exists():
        warnings.warn(f"the cached model folder {folder} is damaged ({problem}); rebuilding it.", stacklevel=2)
    root.mkdir(parents=True, exist_ok=True)
    _delete_leftovers(root, folder.name)
    tmp = root / _private_name(folder.name, "tmp")
    if message:
        print(f"[isdelta] {message}; cached at {folder}", file=sys.stderr, flush=True)
    try:
        tmp.mkdir()
        build(tmp)
        _write_manifest(tmp, key)
        _commit(tmp, folder, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def folder_problem(folder: str | os.PathLike, key: str) -> str | None:
    """What is wrong with a cached folder (absent, manifest unreadable or of another key, a file
    missing, resized or changed), or None when it is sound. Cheap: see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        return "absent"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        ok = manifest["format"] == _FORMAT and manifest["key"] == key and isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError):
        return f"its manifest {MANIFEST} is missing or unreadable"
    if not ok:
        return f"its manifest {MANIFEST} is not one of format {_FORMAT} for key {key[:16]}…"
    for rel, want in files.items():
        try:
            st = (folder / rel).stat()
            if st.st_size != want["size"]:
                return f"{rel} has {st.st_size} bytes, not {want['size']}"
            if st.st_mtime_ns != want["mtime_ns"] and _digest(folder / rel) != want["xxh3_128"]:
                return f"{rel} changed since it was built"
        except FileNotFoundError:
            return f"{rel} is missing"
        except (OSError, KeyError, TypeError) as e:
            return f"{rel} cannot be checked ({e})"
    return None


def _digest(path: Path) -> str:
    """xxh3-128 of a file's bytes (hex): 0.3 s per GB, 3× faster than sha256."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path, key: str) -> None:
    """List every file ``build`` wrote (size, mtime, digest); written last, so a folder with a
    manifest is a finished build."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3_128": _digest(path)}
    if not files:
        raise RuntimeError(f"building the cached model folder wrote no file into {folder}.")
    manifest = {"format": _FORMAT, "key": key, "files": files}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _commit(tmp: Path, folder: Path, key: str) -> None:
    """Rename ``tmp`` to ``folder``; a sound folder already there (a concurrent build that
    committed first) is kept and ``tmp`` discarded by the caller."""
    if folder.exists():
        if folder_problem(folder, key) is None:
            return
        _move_aside(folder)
    try:
        os.replace(tmp, folder)  # POSIX: fails on a non-empty folder, so a winner is never replaced
    except OSError:
        if folder_problem(folder, key) is not None:
            raise


def _move_aside(folder: Path) -> None:
    """Rename a damaged folder out of the way (one rename: readers never see it half-deleted),
    then delete it. Another process may have done so already."""
    old = folder.with_name(_private_name(folder.name, "old"))
    try:
        os.replace(folder, old)
    except FileNotFoundError:
        return
    shutil.rmtree(old, ignore_errors=True)


def _private_name(base: str, kind: str) -> str:
    """A hidden sibling name that says which process owns it: ``.<base>.<host>.<pid>.<hex>.<kind>``."""
    return f".{base}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}"


def _delete_leftovers(root: Path, base: str) -> None:
    """Delete the temporary and moved-aside folders of ``base`` whose process, on this host,
    has ended (an interrupted build); another host's or a live process's are left alone."""
    host = socket.gethostname()
    for path in root.glob(f".{base}.*"):
        parts = path.name[len(base) + 2 :].rsplit(".", 3)  # host (may hold dots), pid, hex, kind
        if len(parts) != 4 or parts[0] != host or parts[3] not in ("tmp", "old") or not parts[1].isdigit():
            continue
        if not _alive(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True
