"""Files and folders the package writes: atomic writes, safe deletes, and folders it owns.

Every file the package writes goes through one of three atomic steps, so a reader (or a run killed at
any moment) never sees half of it: the bytes go to a hidden temporary name beside the target, are made
durable, and :func:`os.replace` swaps them into place in one step.

- :func:`atomic`: any file (``with atomic(path) as tmp: ...``); :func:`write_text` / :func:`write_json`: a text or
  JSON file; :func:`save_tensors`: a safetensors file;
- :func:`replace_folder`: a folder built under a temporary name (a checkpoint, an exported UNet).

Deleting works the same way backwards (:func:`remove_folder`): a folder is renamed out of sight first, then
deleted.

An output folder is the package's only when it says so (:func:`claim_folder`): a marker file written into
a new or empty folder before anything else. A folder that holds files the package did not write (a user's
own ``config.json``, notes, another program's output) is refused with one line naming the folder and what
is in it, never written into or pruned.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from .errors import FolderError

MARKER = ".dpo-tutorial"  # written first into every output folder the package makes; holds its kind
LOCK_FILE = ".lock"  # held by the process writing a folder (run_dir.lock_output_dir)


def temporary_name(path: Path) -> Path:
    """A hidden name to write ``path`` under before it is renamed into place: ``.<name>.<pid>-<random>.tmp``, which no
    reader's pattern matches (``*.parquet``, ``shard-*.safetensors``...) and no other writer shares."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def replace_file(written: str | Path, path: str | Path) -> Path:
    """Make the finished file ``written`` durable, then rename it to ``path`` in one step; return ``path``."""
    _fsync(Path(written))
    os.replace(written, path)
    return Path(path)


@contextmanager
def atomic(path: str | Path):
    """``with atomic(path) as tmp:`` write the whole file to ``tmp``; on leaving the block it is made durable and
    renamed to ``path`` in one step, or removed if the block failed (``path`` keeps its old content)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic`); return the path."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, value, indent: int | None = 1) -> Path:
    """``value`` as JSON in ``path``, atomically (:func:`write_text`)."""
    return write_text(path, json.dumps(value, indent=indent))


def shown_path(path: str | Path) -> str:
    """``path`` as a reader finds it: relative to the working folder when it lies there or one folder up
    (a notebook's ``../runs/toy``), else as given."""
    try:
        relative = os.path.relpath(Path(path).resolve(), Path.cwd().resolve())
    except ValueError:  # another drive (Windows)
        return str(path)
    return relative if not relative.startswith(os.path.join("..", "..")) else str(path)


def replace_block(path: str | Path, name: str, text: str) -> Path:
    """Replace what lies between the lines ``<!-- name:start -->`` and ``<!-- name:end -->`` of the Markdown file
    ``path`` with ``text``, atomically: how a script that measures a number writes it into the README."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = Path(path).read_text(encoding="utf-8")
    if doc.count(start) != 1 or doc.count(end) != 1 or doc.index(start) > doc.index(end):
        raise ValueError(f"{path} has no single {start} ... {end} block to replace")
    head, rest = doc.split(start, 1)
    return write_text(path, f"{head}{start}\n{text.strip()}\n{end}{rest.split(end, 1)[1]}")


def save_tensors(tensors: dict, path: str | Path) -> Path:
    """A safetensors file of ``tensors`` at ``path``, atomically (contiguous CPU copies are written)."""
    with atomic(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    return Path(path)


def remove(path: str | Path) -> None:
    """Delete a file, a folder or a symbolic link (not what it points to); nothing when it does not exist."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def fresh_folder(path: str | Path) -> Path:
    """An empty folder at ``path`` for building something under a temporary name (whatever was there is removed,
    a symbolic link included, never followed)."""
    path = Path(path)
    remove(path)
    path.mkdir(parents=True)
    return path


def replace_folder(tmp: str | Path, final: str | Path) -> Path:
    """Make the finished folder ``tmp`` appear as ``final`` in one step: its files are made durable first, an older
    ``final`` is removed out of sight (:func:`remove_folder`), then ``tmp`` is renamed."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    remove_folder(final)
    os.replace(tmp, final)
    return final


def remove_folder(path: str | Path) -> None:
    """Delete ``path`` so that no half-deleted folder is ever visible under its name.

    The folder is first renamed (one atomic step) to ``.trash-<name>-<pid>`` beside it, then deleted; a
    run killed during the delete leaves only that hidden name, which :func:`clean_partial` removes later.
    ``shutil.rmtree`` alone deletes file by file, so a kill midway left e.g. ``checkpoint-2/state.json``
    without its weights: a folder that looked complete.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    remove(trash)
    os.replace(path, trash)
    remove(trash)


PARTIAL_PATTERNS = (".tmp-*", ".*.tmp", ".trash-*")  # half-written and half-deleted entries (atomic, remove)


def is_partial(path: Path) -> bool:
    """Whether ``path`` is an entry a killed write or removal left behind (see :func:`clean_partial`)."""
    return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in PARTIAL_PATTERNS)


def clean_partial(folder: str | Path) -> None:
    """Remove the half-written (``.tmp-*``, ``.*.tmp``) and half-deleted (``.trash-*``) entries a killed run left in
    ``folder``."""
    root = Path(folder)
    if root.is_dir():
        for p in list(root.iterdir()):
            if is_partial(p):
                remove(p)


def listing(folder: Path, limit: int = 4) -> str:
    """``'config.json, notes.txt, ... (7 entries)'``: what a folder holds, for error messages."""
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} entries)" if len(names) > limit else shown


def marker_kind(folder: str | Path) -> str | None:
    """The kind (``run``, ``cache``, ``figures``) the package marked ``folder`` with, or None when it holds no marker
    file (a link of that name counts as none: a user's folder could point it anywhere)."""
    marker = Path(folder) / MARKER
    if marker.is_file() and not marker.is_symlink():
        return marker.read_text(errors="replace").strip()
    return None


def claim_folder(path: str | Path, kind: str, legacy=None) -> Path:
    """Make ``path`` (created when missing) an output folder of ``kind`` (``run``, ``cache``, ``figures``), or refuse.

    A missing or empty folder gets the marker file :data:`MARKER` holding ``kind``; a folder already marked with
    ``kind`` is ours. Anything else raises :class:`FolderError`: a file, a folder marked for another kind, or
    a folder holding files the package did not write. ``legacy(folder) -> bool`` may recognise a folder an older
    version wrote without a marker; it is then marked.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"output folder {str(path)!r} is a file: expected a new folder or one dpo-tutorial made")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entries = list(folder.iterdir())
    except OSError as err:
        raise FolderError(f"output folder {str(path)!r} is not writable ({type(err).__name__}: "
                          f"{err.strerror or err}): expected a folder this user can write to") from err
    found = marker_kind(folder)
    if found is not None:
        if found == kind:
            return folder
        raise FolderError(f"output folder {str(path)!r} holds a dpo-tutorial {found or 'unknown'} output, not a {kind}: "
                          f"choose another folder")
    others = [p for p in entries if p.name != LOCK_FILE]
    if others and not (legacy and legacy(folder)):
        raise FolderError(f"output folder {str(path)!r} holds files dpo-tutorial did not write ({listing(folder)}): "
                          f"choose a new or empty folder, so that nothing of yours is overwritten")
    try:
        write_text(folder / MARKER, kind + "\n")
    except OSError as err:
        raise FolderError(f"output folder {str(path)!r} is not writable ({type(err).__name__}: "
                          f"{err.strerror or err}): expected a folder this user can write to") from err
    return folder
