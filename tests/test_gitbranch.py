"""`apply --branch`: a reviewed change set as a commit on a new branch, the working tree and index untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vivarium.errors import UsageError, VivariumError
from vivarium.share import gitbranch
from vivarium.share.review import Change

GIT_ENV = ["-c", "user.name=t", "-c", "user.email=t@example.org"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_ENV, "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    (r / "proj" / "src").mkdir(parents=True)
    git(r, "init", "-q", "-b", "main")
    (r / "top.txt").write_text("top\n")
    (r / "proj" / "keep.txt").write_text("keep\n")
    (r / "proj" / "edit.txt").write_text("one\n")
    (r / "proj" / "src" / "gone.txt").write_text("bye\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "start")
    return r


def test_the_changes_become_a_branch_and_nothing_else_moves(repo: Path) -> None:
    share = repo / "proj"  # the share is a subdirectory of the repository
    found = gitbranch.find(share)
    assert found == gitbranch.Repo(repo, "proj/")
    parent = gitbranch.head(share)
    assert parent is not None
    (repo / "proj" / "edit.txt").write_text("the user's own, uncommitted\n")  # the working tree has work of its own
    git(repo, "add", "proj/edit.txt")  # and so has the index
    status, index = git(repo, "status", "--porcelain"), git(repo, "ls-files", "-s")
    changes = [Change("edit.txt", "modified", "file", mode=0o644), Change("new/run.sh", "added", "file", mode=0o755),
               Change("src", "deleted", "dir"), Change("link", "added", "symlink", target="keep.txt")]  # fmt: skip
    contents = {"edit.txt": b"two\n", "new/run.sh": b"#!/bin/sh\n"}
    made = gitbranch.commit(found, parent, "from-sandbox", changes, contents, "Changes from sandbox t\n")
    assert git(repo, "rev-parse", "from-sandbox").strip() == made and git(repo, "rev-parse", "from-sandbox^").strip() == parent
    assert git(repo, "diff", "--name-status", parent, "from-sandbox").split("\n")[:-1] == [
        "M\tproj/edit.txt", "A\tproj/link", "A\tproj/new/run.sh", "D\tproj/src/gone.txt"]  # fmt: skip
    assert git(repo, "show", "from-sandbox:proj/edit.txt") == "two\n"
    tree = git(repo, "ls-tree", "-r", "from-sandbox")
    assert "100755 blob" in next(ln for ln in tree.splitlines() if ln.endswith("proj/new/run.sh"))
    assert "120000 blob" in next(ln for ln in tree.splitlines() if ln.endswith("proj/link"))
    # HEAD, the index and the working tree are as they were
    assert git(repo, "rev-parse", "HEAD").strip() == parent and git(repo, "status", "--porcelain") == status
    assert git(repo, "ls-files", "-s") == index and (repo / "proj" / "edit.txt").read_text() == "the user's own, uncommitted\n"
    # a branch that exists is never overwritten; a name git refuses is refused
    with pytest.raises(UsageError, match="branch 'from-sandbox' exists"):
        gitbranch.commit(found, parent, "from-sandbox", changes, contents, "again\n")
    with pytest.raises(UsageError, match="not a branch name"):
        gitbranch.commit(found, parent, "bad..name", changes, contents, "x\n")


def test_git_refuses_a_path_into_its_own_metadata(repo: Path) -> None:
    found = gitbranch.find(repo)
    parent = gitbranch.head(repo)
    assert found is not None and parent is not None
    with pytest.raises(VivariumError, match="git update-index failed"):
        gitbranch.commit(found, parent, "evil", [Change(".git/hooks/post-checkout", "added", "file", mode=0o755)],
                         {".git/hooks/post-checkout": b"#!/bin/sh\n"}, "x\n")  # fmt: skip
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()
    assert subprocess.run(["git", "-C", str(repo), "show-ref", "--verify", "-q", "refs/heads/evil"], check=False).returncode != 0


def test_a_directory_outside_any_repository(tmp_path: Path) -> None:
    assert gitbranch.find(tmp_path) is None and gitbranch.head(tmp_path) is None


def test_a_repository_of_another_owner_as_when_run_under_sudo(repo: Path) -> None:
    """The project is the user's and vivarium runs as root: git's ownership check must not stop it."""
    import os

    if os.geteuid() != 0:
        pytest.fail("this test runs as root (as CI does): it gives the repository to another user")
    for p in [repo, *repo.rglob("*")]:
        os.lchown(p, 1000, 1000)
    found, parent = gitbranch.find(repo), gitbranch.head(repo)
    assert found is not None and parent is not None
    made = gitbranch.commit(found, parent, "theirs", [Change("top.txt", "modified", "file", mode=0o644)], {"top.txt": b"new\n"}, "x\n")
    assert git(repo, "-c", "safe.directory=*", "show", "theirs:top.txt") == "new\n" and made
