"""Output swaps: whatever moment a crash hits, the folder holds the old complete output or the new one, and an
interrupted swap is finished or undone by the next one. Crashes are simulated by failing the rename they hit."""

from __future__ import annotations

import os

import pytest

from ftscale.atomic_files import partial_folder, recover_folder, replace_folder


def make(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.txt").write_text(text)
    return folder


def crash_on_rename(monkeypatch, nth: int):
    real, calls = os.rename, {"n": 0}

    def rename(src, dst):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_replace_swaps_whole_folders(tmp_path):
    out = make(tmp_path / "out", "old")
    new = make(partial_folder(out), "new")
    replace_folder(new, out)
    assert (out / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_between_the_two_renames_loses_nothing_and_is_undone(tmp_path, monkeypatch):
    out = make(tmp_path / "out", "old")
    new = make(partial_folder(out), "new")
    crash_on_rename(monkeypatch, 2)  # the old output is aside, the new one not yet in
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, out)
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".out.previous/data.txt").read_text() == "old"
    recover_folder(out)
    assert (out / "data.txt").read_text() == "old"
    assert not (tmp_path / ".out.previous").exists()


def test_a_crash_before_the_old_output_is_deleted_keeps_the_new_one(tmp_path, monkeypatch):
    out = make(tmp_path / "out", "old")
    new = make(partial_folder(out), "new")
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("crash")))
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, out)
    monkeypatch.undo()
    assert (out / "data.txt").read_text() == "new" and (tmp_path / ".out.previous").exists()
    replace_folder(make(partial_folder(out), "newer"), out)  # the next swap drops the leftover first
    assert (out / "data.txt").read_text() == "newer" and not (tmp_path / ".out.previous").exists()


def test_partial_folder_starts_empty(tmp_path):
    out = tmp_path / "out"
    stale = make(partial_folder(out), "crashed half-way")
    assert partial_folder(out) == stale and list(stale.iterdir()) == []


def test_a_link_or_file_where_the_output_was_is_replaced_too(tmp_path):
    target = make(tmp_path / "elsewhere", "keep me")
    out = tmp_path / "out"
    out.symlink_to(target)
    replace_folder(make(partial_folder(out), "new"), out)
    assert (out / "data.txt").read_text() == "new" and not out.is_symlink()
    assert (target / "data.txt").read_text() == "keep me"  # the link went, not what it pointed to
    (tmp_path / ".out.partial").write_text("a stray file")
    assert partial_folder(out).is_dir()
