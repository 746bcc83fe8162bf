"""Write files and swap folders so that a crash at any moment leaves either the old complete output or the new one,
never a mixture and never nothing. Every output folder ftscale writes (checkpoints, merges, exported adapters,
imported models) goes through `replace_folder`."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("ftscale")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def _drop(path: Path) -> None:
    """Delete a folder, or a file or link that stood where a folder was expected."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def remove_folder(path: Path) -> None:
    """Rename first, then delete: a crash mid-delete leaves a dotted folder that nothing takes for an output."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def recover_folder(out: Path) -> None:
    """Finish a `replace_folder` that a crash interrupted: the previous output comes back if the new one never
    arrived; a leftover previous output is dropped if the new one did."""
    aside = _aside(out)
    if not (aside.exists() or aside.is_symlink()):
        return
    if out.exists() or out.is_symlink():
        _drop(aside)
    else:
        os.rename(aside, out)
        log.warning("restored %s from %s (an earlier replacement was interrupted)", out, aside)


def replace_folder(new: Path, out: Path) -> None:
    """Move the complete folder `new` to `out`, replacing what is there: the old output is renamed aside, the new
    one renamed in, then the old one deleted. At no moment is `out` missing without its previous content kept
    beside it (restored by `recover_folder`). `new` and `out` must be on one filesystem (siblings, in practice)."""
    recover_folder(out)
    aside = _aside(out)
    if out.exists() or out.is_symlink():
        os.rename(out, aside)
    os.rename(new, out)
    if aside.exists() or aside.is_symlink():
        _drop(aside)


def partial_path(out: Path) -> Path:
    """Where `out` is built before `replace_folder` moves it into place (a dotted sibling: never taken for output)."""
    return out.parent / f".{out.name}.partial"


def partial_folder(out: Path) -> Path:
    """A fresh, empty `partial_path(out)`; anything an earlier crash left there is dropped."""
    tmp = partial_path(out)
    if tmp.exists() or tmp.is_symlink():
        _drop(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp
