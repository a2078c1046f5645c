"""Path safety and the output-folder policy, in one place for every reader and writer.

Why: users point this tool at their only copy of a defect dataset and at checkpoints that travel
between machines. A name that becomes a path (product, defect, run name, sample id) comes from a
``classes.json``, a checkpoint's ``config.json`` or the command line; ``../../X`` there must not
write outside the output folder. And an output folder must never silently mix new files with old
ones or overwrite a folder defectforge did not create.

* ``safe_component(name, what, source)``: a name is a single path component: not empty, not ``.``
  or ``..``, no ``/`` or ``\\``, no control characters, no leading/trailing space, at most 255
  bytes. Checked where the name enters (dataset scan, checkpoint load, command line, config).
* ``inside(root, *parts)``: ``root/parts`` after checking each part and that the result stays
  under ``root`` (defence in depth for writers).
* ``claim_output(out, kind, overwrite)``: every command that writes (synth, generate, evaluate,
  train's run root and run folders, sweep's run root) claims its folder first. A new or empty
  folder is created and marked with ``.defectforge-output.json``; a folder holding that mark from
  the same kind of *resumable* output (a training run) is resumed (the caller verifies the
  record); anything else is refused, naming the folder and what is in it. ``--overwrite`` replaces
  (deletes, then recreates) a folder that defectforge created; a non-empty folder without the mark
  is never deleted, with or without ``--overwrite``: it may be someone's only copy of their data.
* ``check_writable(folder)``: a probe file, so a read-only output fails before any sampling or
  Ray start-up, not after.
* ``is_regular_file(path)``: FIFOs, sockets and devices are never opened (a FIFO named ``x.png``
  would block a reader forever).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from defectforge.errors import DataError, DefectforgeError, OutputError

MARKER = ".defectforge-output.json"
_MAX_BYTES = 255


def unsafe_reason(name: Any) -> str | None:
    """Why ``name`` is not a safe single path component, or None when it is."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a relative folder reference"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if name != name.strip():
        return "starts or ends with white space"
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_BYTES:
        return f"is longer than {_MAX_BYTES} bytes"
    if ":" in name and len(name) >= 2 and name[1] == ":":
        return "looks like a drive letter"
    return None


def safe_component(name: Any, what: str, source: str | os.PathLike[str] | None = None,
                   error: type[DefectforgeError] = DataError) -> str:
    """``name`` if it is one safe path component, else ``error`` naming ``source`` and ``what``.

    ``what`` says which field the name is (``"defect name in field 'classes'"``, ``"--name"``);
    ``source`` the file it came from, if any.
    """
    reason = unsafe_reason(name)
    if reason is not None:
        where = f"{source}: " if source else ""
        raise error(f"{where}{what} {name!r} {reason}; names become folder and file names and must be "
                    "a single path component (no '/', '\\', '..')")
    return name


def inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts...`` after checking every part is a safe component and the result stays in ``root``."""
    base = Path(root)
    for part in parts:
        safe_component(part, "path component", base, error=OutputError)
    path = base.joinpath(*parts)
    resolved_root = base.resolve()
    if not path.resolve().is_relative_to(resolved_root):  # e.g. a symlinked sub-folder pointing out
        raise OutputError(f"{path} resolves outside the output folder {base} ({path.resolve()})")
    return path


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following symlinks); FIFOs, sockets, devices and dangling links are not."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def non_regular_kind(path: Path) -> str:
    """What a non-regular, non-directory entry is, for messages ("FIFO", "socket", ...)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "dangling link or unreadable entry"
    for test, label in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                        (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return label
    return "special file"


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it; ``OutputError`` naming it if not."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".defectforge-write-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc}); choose a writable output "
                          "folder") from None
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    mark = folder / MARKER
    if not mark.is_file():
        return None
    try:
        data = json.loads(mark.read_text())
    except (OSError, ValueError):
        return {"kind": "unknown"}
    return data if isinstance(data, dict) else {"kind": "unknown"}


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown


def _is_empty(folder: Path) -> bool:
    return not any(p.name != MARKER for p in folder.iterdir())


def claim_output(out: str | os.PathLike[str], kind: str, overwrite: bool = False, resumable: bool = False,
                 flag: str = "--out", legacy: tuple[str, ...] = (), create: bool = True) -> tuple[Path, bool]:
    """Claim ``out`` for an output of ``kind``; returns (folder, resumed).

    * new or empty folder -> created, marked, writable (checked); resumed=False;
    * marked with the same ``kind`` and ``resumable`` -> resumed=True (the caller verifies its record);
    * marked by defectforge and ``overwrite`` -> deleted and recreated; resumed=False;
    * ``legacy`` names a file/folder whose presence marks an unmarked folder as an output of this
      kind written by an earlier version (e.g. ``mlflow.db`` in a run root): it is marked and used;
    * a run root (``kind="run-root"``, resumable, no ``overwrite``) that is unmarked but holds only
      defectforge-marked folders (``runs/`` after ``train --out runs/dg``) -> marked and used;
      never for other kinds, so ``--overwrite`` can never delete such a folder;
    * otherwise ``OutputError`` naming the folder, what it holds and what to do.

    ``create=False`` runs every check (refusals, writability of the folder or of its nearest
    existing parent) and changes nothing: commands call it before expensive work and claim for
    real just before writing.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: exists and is not a folder")
    if folder.is_dir() and not _is_empty(folder):
        mark = read_marker(folder)
        if mark is None and legacy and any((folder / name).exists() for name in legacy):
            mark = {"kind": kind}
            if create:
                _write_marker(folder, kind)
        if mark is None and kind == "run-root" and resumable and not overwrite \
                and _holds_only_defectforge_outputs(folder):
            # e.g. ``runs/`` after ``train --out runs/dg``: the default run root of the next
            # command holds nothing but defectforge's own folders, so it may share it.
            mark = {"kind": kind}
            if create:
                _write_marker(folder, kind)
        if mark is None:
            raise OutputError(
                f"{flag} {folder}: folder is not empty and was not created by defectforge (holds "
                f"{_listing(folder)}); refusing to write into it or delete it, even with --overwrite. "
                "Choose a new or empty folder")
        if overwrite:
            if not create:
                check_output_parent(folder, flag)
                return folder, False
            shutil.rmtree(folder)
        elif mark.get("kind") == kind and resumable:
            if create:
                check_writable(folder)
            else:
                check_output_parent(folder, flag)
            return folder, True
        elif mark.get("kind") == kind:
            raise OutputError(
                f"{flag} {folder}: already holds an earlier {kind} output ({_listing(folder)}); new files "
                "would mix with the old ones. Pass --overwrite to replace it whole, or choose a new folder")
        else:
            raise OutputError(
                f"{flag} {folder}: holds a defectforge {mark.get('kind')!r} output, not a {kind!r} one "
                f"({_listing(folder)}). Choose another folder (or --overwrite to replace it whole)")
    if not create:
        check_output_parent(folder, flag)
        return folder, False
    try:
        check_writable(folder)
    except OutputError as exc:
        raise OutputError(f"{flag} {exc}") from None
    _write_marker(folder, kind)
    return folder, False


def _holds_only_defectforge_outputs(folder: Path) -> bool:
    """Every entry of ``folder`` is a folder defectforge created (it carries the marker)."""
    entries = list(folder.iterdir())
    return bool(entries) and all(e.is_dir() and not e.is_symlink() and read_marker(e) is not None for e in entries)


def _write_marker(folder: Path, kind: str) -> None:
    # No timestamp: the same command gives byte-identical trees (data synth's promise).
    (folder / MARKER).write_text(json.dumps({"kind": kind, "created_by": "defectforge"}) + "\n")


def check_output_parent(out: str | os.PathLike[str], flag: str = "--out") -> None:
    """Fail before any work when ``out`` cannot become a folder (a file in the way, a read-only parent).

    Used where the folder is claimed later (after validation) but writability must be known first.
    Creates nothing when ``out`` does not exist yet: the nearest existing ancestor is probed.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: exists and is not a folder")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {folder}: cannot create it, {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {folder}: cannot write in {probe} (permission denied)")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".defectforge-write-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{flag} {folder}: cannot write in {probe} ({exc.strerror or exc})") from None
