"""Writing the project's files: atomically, never through a symlink, with one-line errors."""

from __future__ import annotations

import json

import pytest

from ohq_tvm.errors import OHQError
from ohq_tvm.jsonfile import make_output_folder, read_json, write_atomic, write_json


def test_write_json_round_trips_and_creates_the_folder(tmp_path):
    path = write_json(tmp_path / "a" / "b.json", {"layer": [1, 2]})
    assert read_json(path, "test") == {"layer": [1, 2]}
    assert path.read_text().endswith("\n")


def test_a_symlink_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    write_json(link, {"ok": True})
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and json.loads(link.read_text()) == {"ok": True}
    write_atomic(link, b"\x00\x01")
    assert link.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "victim.txt"]  # no temp file left


def test_the_new_file_gets_the_usual_permissions(tmp_path):
    path = write_atomic(tmp_path / "x.txt", "text")
    plain = tmp_path / "plain.txt"
    plain.write_text("text")
    assert path.stat().st_mode == plain.stat().st_mode


@pytest.mark.parametrize("where", ["/proc/nope/x.json", "{tmp}/folder"])
def test_unwritable_paths_are_one_error_naming_them(tmp_path, where):
    (tmp_path / "folder").mkdir()
    path = where.format(tmp=tmp_path)
    with pytest.raises(OHQError, match=rf"cannot write the plan {path}"):
        write_json(path, {}, what="the plan")


def test_a_missing_folder_is_refused_when_asked(tmp_path):
    with pytest.raises(OHQError, match=r"folder .*missing does not exist"):
        write_atomic(tmp_path / "missing" / "x.json", "{}", make_parents=False)
    assert not (tmp_path / "missing").exists()


def test_an_output_folder_is_made_or_refused_naming_it(tmp_path):
    made = make_output_folder(tmp_path / "a" / "out")
    assert made.is_dir() and make_output_folder(made) == made  # an existing folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(OHQError, match=r"output folder .*file is a file, not a folder"):
        make_output_folder(tmp_path / "file")
    with pytest.raises(OHQError, match=r"cannot create output folder .*file/out"):
        make_output_folder(tmp_path / "file" / "out")
