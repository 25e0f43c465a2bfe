"""zip_submission packs regular files only: no dotfiles, notebooks or caches, no links out of the folder."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from cloudseg.submission import SubmissionLinkError, submission_files, zip_submission


def make_folder(folder: Path) -> Path:
    """A submission-like folder holding what belongs in a zip and what does not."""
    (folder / "assets").mkdir(parents=True)
    (folder / "main.py").write_text("print('hi')\n")
    (folder / "assets" / "model_0.pt").write_bytes(b"weights")
    (folder / "assets" / "inference.json").write_text("{}\n")
    (folder / ".env").write_text("DB=postgresql://user:password@db/x\n")
    (folder / "explore.ipynb").write_text("{}\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "main.cpython-39.pyc").write_bytes(b"\x00")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "explore-checkpoint.ipynb").write_text("{}\n")
    (folder / "assets" / ".hidden").write_text("x\n")
    return folder


def names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        return sorted(zf.namelist())


def test_dotfiles_notebooks_and_caches_are_left_out_and_listed(tmp_path):
    folder = make_folder(tmp_path / "sub")
    lines: list[str] = []
    zip_path = zip_submission(folder, tmp_path / "sub.zip", echo=lines.append)
    assert zip_path == tmp_path / "sub.zip"
    assert names(zip_path) == ["assets/inference.json", "assets/model_0.pt", "main.py"]
    assert sorted(lines) == sorted([
        "left out: .env (dotfile)", "left out: explore.ipynb (notebook)",
        "left out: .ipynb_checkpoints/ (dotfile)", "left out: __pycache__/ (cache or store)",
        "left out: assets/.hidden (dotfile)"])
    assert sorted(submission_files(folder)[1]) == sorted(ln.removeprefix("left out: ") for ln in lines)


def test_link_outside_the_folder_is_refused_naming_it(tmp_path):
    folder = make_folder(tmp_path / "sub")
    outside = tmp_path / "hostname"
    outside.write_text("secret-host\n")
    (folder / "assets" / "host.txt").symlink_to(outside)
    with pytest.raises(SubmissionLinkError, match=r"assets/host\.txt is a symbolic link to .*hostname"):
        zip_submission(folder, tmp_path / "sub.zip", echo=None)
    assert not (tmp_path / "sub.zip").exists()


def test_link_to_a_folder_outside_is_refused(tmp_path):
    folder = make_folder(tmp_path / "sub")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0\n")
    (folder / "conf").symlink_to(tmp_path / "etc")
    with pytest.raises(SubmissionLinkError, match="conf is a symbolic link"):
        zip_submission(folder, tmp_path / "sub.zip", echo=None)


def test_dangling_link_is_refused(tmp_path):
    folder = make_folder(tmp_path / "sub")
    (folder / "gone.py").symlink_to(tmp_path / "nowhere.py")
    with pytest.raises(SubmissionLinkError, match="gone.py"):
        zip_submission(folder, tmp_path / "sub.zip", echo=None)


def test_link_inside_the_folder_is_packed_as_its_file(tmp_path):
    folder = make_folder(tmp_path / "sub")
    (folder / "weights.pt").symlink_to(Path("assets") / "model_0.pt")
    zip_path = zip_submission(folder, tmp_path / "sub.zip", echo=None)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read("weights.pt") == b"weights"
        assert not any((i.external_attr >> 16) & 0o170000 == 0o120000 for i in zf.infolist())


def test_non_regular_files_are_left_out(tmp_path):
    folder = make_folder(tmp_path / "sub")
    os.mkfifo(folder / "pipe")
    lines: list[str] = []
    zip_path = zip_submission(folder, tmp_path / "sub.zip", echo=lines.append)
    assert "pipe" not in names(zip_path)
    assert "left out: pipe (not a regular file)" in lines


def test_zip_written_inside_the_folder_does_not_pack_itself(tmp_path):
    folder = make_folder(tmp_path / "sub")
    zip_submission(folder, folder / "sub.zip", echo=None)
    zip_path = zip_submission(folder, folder / "sub.zip", echo=None)
    assert "sub.zip" not in names(zip_path)
