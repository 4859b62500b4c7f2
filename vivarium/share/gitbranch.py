"""`vivarium apply --branch`: a reviewed change set as a commit on a new branch of the host's repository,
made with git's plumbing in an index of its own: the working tree, the index and HEAD stay as they are,
and any git tool shows the branch (`git log -p`, `git merge`).

The changes are the ones review.py checked (paths beneath the share, the reviewed set, the guest's bytes
matched against what `diff` showed); git refuses what no tree may hold (a `.git` component). No hook,
filter or editor runs: hash-object --no-filters, update-index, write-tree, commit-tree, update-ref.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import UsageError, VivariumError
from vivarium.printable import printable
from vivarium.share.review import Change

ZERO = "0" * 40
# The project is its owner's, and vivarium may run as root (sudo): git's "dubious ownership" refusal would stop
# every command. Its worry is another user's config run as you; the repository here is the user's own, and the
# guest cannot write it (a review share). No fsmonitor either: nothing of the repository's config runs.
GIT = ("git", "-c", "safe.directory=*", "-c", "core.fsmonitor=false")


@dataclass(frozen=True)
class Repo:
    top: Path  # the repository's working tree
    prefix: str  # where the share is in it ("" at its top, else "sub/dir/")


def find(share: Path) -> Repo | None:
    """The git repository the share's directory is in, if any."""
    try:
        r = subprocess.run([*GIT, "-C", str(share), "rev-parse", "--show-toplevel", "--show-prefix"], capture_output=True, text=True, check=False)
    except OSError:  # no git on this host
        return None
    if r.returncode != 0:
        return None
    top, _, prefix = r.stdout.partition("\n")
    return Repo(Path(top.strip()), prefix.strip())


def head(share: Path) -> str | None:
    """The commit checked out in the share's repository now (noted when a sandbox starts)."""
    try:
        r = subprocess.run([*GIT, "-C", str(share), "rev-parse", "--verify", "-q", "HEAD^{commit}"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _git(repo: Repo, *args: str, env: Mapping[str, str] | None = None, input: bytes | None = None) -> str:
    r = subprocess.run([*GIT, "-C", str(repo.top), *args], capture_output=True, input=input, env=env, check=False)
    if r.returncode != 0:
        said = r.stderr.decode(errors="replace").strip().splitlines()
        raise VivariumError(f"git {args[0]} failed in {repo.top}: {printable(said[-1]) if said else f'exit code {r.returncode}'}")
    return r.stdout.decode(errors="replace").strip()


def commit(repo: Repo, parent: str, branch: str, changes: Sequence[Change], contents: Mapping[str, bytes], message: str) -> str:
    """A commit of `changes` on top of `parent`, as the new branch `branch`; its id."""
    if subprocess.run([*GIT, "check-ref-format", "--branch", branch], capture_output=True, check=False).returncode != 0 or branch.startswith("-"):
        raise UsageError(f"apply --branch: {branch!r} is not a branch name git takes")
    if subprocess.run([*GIT, "-C", str(repo.top), "show-ref", "--verify", "-q", f"refs/heads/{branch}"], check=False).returncode == 0:
        raise UsageError(f"apply --branch: branch {branch!r} exists in {repo.top}", hint="name a new one: nothing is overwritten")
    with tempfile.TemporaryDirectory(prefix="vivarium-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if not _identity(repo):
            env |= {"GIT_AUTHOR_NAME": "vivarium", "GIT_AUTHOR_EMAIL": "vivarium@localhost",
                    "GIT_COMMITTER_NAME": "vivarium", "GIT_COMMITTER_EMAIL": "vivarium@localhost"}  # fmt: skip
        _git(repo, "read-tree", parent, env=env)
        for c in changes:
            path = repo.prefix + c.path
            if c.kind == "deleted":
                _git(repo, "rm", "--cached", "-r", "-q", "--ignore-unmatch", "--", path, env=env)
            elif c.what == "symlink":
                blob = _git(repo, "hash-object", "-w", "--no-filters", "--stdin", input=c.target.encode(), env=env)
                _git(repo, "update-index", "--add", "--cacheinfo", f"120000,{blob},{path}", env=env)
            elif c.what == "file":
                blob = _git(repo, "hash-object", "-w", "--no-filters", "--stdin", input=contents[c.path], env=env)
                mode = "100755" if c.mode & 0o111 else "100644"
                _git(repo, "update-index", "--add", "--cacheinfo", f"{mode},{blob},{path}", env=env)
            # a directory is its entries: git keeps no empty ones
        tree = _git(repo, "write-tree", env=env)
        new = _git(repo, "commit-tree", tree, "-p", parent, "-m", message, env=env)
        _git(repo, "update-ref", f"refs/heads/{branch}", new, ZERO, env=env)
    return new


def _identity(repo: Repo) -> bool:
    """Does git know who commits here (user.name and user.email, or their environment variables)?"""
    return subprocess.run([*GIT, "-C", str(repo.top), "var", "GIT_COMMITTER_IDENT"], capture_output=True, check=False).returncode == 0
