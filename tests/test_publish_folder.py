"""util.files.publish_folder: a folder appears whole or not at all (the demo generators and the tile cache)."""
import os

import pytest

from util.files import publish_folder


def _hidden(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_folder_appears_whole_and_an_empty_root_is_replaced(tmp_path):
    root = tmp_path / "sub" / "data"

    def fill(tmp):
        assert not root.exists()  # nothing visible while it is being written
        (open(os.path.join(tmp, "a.txt"), "w")).write("x")

    assert publish_folder(str(root), fill) is True
    assert (root / "a.txt").read_text() == "x" and _hidden(tmp_path / "sub") == []
    assert os.stat(root).st_mode & 0o777 == 0o777 & ~_umask()  # ordinary permissions, not mkdtemp's 0700
    empty = tmp_path / "empty"
    empty.mkdir()
    assert publish_folder(str(empty), lambda t: open(os.path.join(t, "b"), "w").close()) is True
    assert os.listdir(empty) == ["b"]


def test_an_error_leaves_nothing_and_a_faster_process_wins(tmp_path):
    root = tmp_path / "data"

    def broken(tmp):
        open(os.path.join(tmp, "half"), "w").close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_folder(str(root), broken)
    assert not root.exists() and _hidden(tmp_path) == []

    def racing(tmp):  # another process publishes its own folder while this one is writing
        root.mkdir()
        (root / "theirs").write_text("t")

    assert publish_folder(str(root), racing) is False
    assert os.listdir(root) == ["theirs"] and _hidden(tmp_path) == []


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
