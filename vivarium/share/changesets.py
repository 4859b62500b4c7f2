"""Review mode's change sets on the host: what `diff` showed, recorded under an id; what `apply` takes.

The guest's files are read through GuestFiles (the sandbox gives one that reads over SSH);
everything the guest says is checked by review.py before anything on the host is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vivarium import ssh, state
from vivarium.errors import InstanceError, UsageError, VMError
from vivarium.printable import last_words, printable
from vivarium.record import Shared
from vivarium.share import gitbranch, review, writeback


class GuestFiles(Protocol):
    def scan(self, share: Shared) -> object:
        """The guest's (untrusted) account of what changed in a review share."""

    def fetch(self, share: Shared, rel: str) -> bytes:
        """A changed file's content, as the guest has it now."""


class SSHFiles:
    """A review share's changed files, read from the running guest over SSH (as root: the overlay's upper layer)."""

    def __init__(self, exec_: Callable[..., subprocess.CompletedProcess[str]], target: Callable[[], ssh.Target]) -> None:
        self.exec, self.target = exec_, target

    def scan(self, share: Shared) -> object:
        """The guest's own account of its changes: untrusted, checked by review.changes()."""
        r = self.exec(["sudo", "python3", "-c", review.SCAN, review.UPPER.format(tag=share.tag)], capture=True, timeout=600)
        if r.returncode != 0:
            raise VMError(f"cannot read the changes to {share.host} in the sandbox: {last_words(r.stderr, r.returncode)}")
        try:
            entries: object = json.loads(r.stdout)
        except ValueError:
            raise VMError(f"the sandbox's account of its changes to {share.host} is not JSON") from None
        return entries

    def fetch(self, share: Shared, rel: str) -> bytes:
        argv = self.target().argv(["sudo", "cat", "--", f"{review.UPPER.format(tag=share.tag)}/{rel}"], tty=False)
        r = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
        if r.returncode != 0:
            raise VMError(f"cannot read {rel} from the sandbox: {last_words(r.stderr, r.returncode)}")
        return r.stdout


def review_shares(name: str, shares: Sequence[Shared]) -> list[Shared]:
    reviewed = [sh for sh in shares if sh.mode == "review"]
    if not reviewed:
        raise UsageError(f"sandbox {name!r} has no share in review mode", hint='set mode = "review" on a [[share]] in vivarium.toml')
    return reviewed


def diff(d: state.InstanceDir, files: GuestFiles, shares: Sequence[Shared], *, patch: bool = False) -> list[dict[str, Any]]:
    """What the guest changed in each review share: [{share, guest, id, changes: [...], skipped: [...], patch?}].

    The change set is recorded under its id: `apply` takes exactly it (the last one, or the one named)."""
    out = []
    record: dict[str, dict[str, Any]] = {}
    for share in shares:
        host = Path(share.host)
        found = review.changes(host, files.scan(share))
        changes = [c.to_dict() for c in found.changes]
        record[share.host] = {"tag": share.tag, "changes": changes, "skipped": found.skipped}
        item: dict[str, Any] = {"share": share.host, "guest": share.guest, "changes": changes, "skipped": found.skipped}
        if patch:
            text = []
            for c in found.changes:
                if c.what != "file":
                    continue
                old = review.read_host(host, c.path) if c.kind != "added" else None
                new = files.fetch(share, c.path) if c.kind != "deleted" else None
                text.append(review.unified(printable(c.path), old, new))
            item["patch"] = "".join(text)
        out.append(item)
    set_id = review.set_id(record)
    where = d.path / "reviewed"
    where.mkdir(mode=0o700, exist_ok=True)
    state.write_atomic(where / f"{set_id}.json", json.dumps({"id": set_id, "shares": record}), 0o600)
    state.write_atomic(where / "last", set_id + "\n", 0o600)
    for item in out:
        item["id"] = set_id
    return out


def reviewed(d: state.InstanceDir, set_id: str | None) -> dict[str, Any]:
    where = d.path / "reviewed"
    if set_id is None:
        try:
            set_id = (where / "last").read_text().strip()
        except FileNotFoundError:
            raise UsageError(f"nothing of sandbox {d.name!r} was reviewed yet: apply takes the changes a diff showed",
                             hint=f"vivarium diff {d.name}") from None  # fmt: skip
    if not re.fullmatch(r"[0-9a-f]{12}", set_id) or not (where / f"{set_id}.json").exists():
        raise UsageError(f"sandbox {d.name!r} has no reviewed change set {set_id!r}", hint=f"vivarium diff {d.name}")
    data: dict[str, Any] = json.loads((where / f"{set_id}.json").read_text())
    return data


Plan = tuple[Shared, Path, list[review.Change], list[dict[str, str]]]  # share, its host dir, chosen changes, skipped


def _checked(d: state.InstanceDir, files: GuestFiles, shares: Sequence[Shared], paths: Sequence[str],
             set_id: str | None) -> tuple[str, list[Plan], dict[str, dict[str, bytes]]]:  # fmt: skip
    """The reviewed change set (all, or what is at or under `paths`), and the guest's bytes for it, checked to be
    exactly what `diff` showed; an error, before anything is written, when the guest changed any of it since."""
    record = reviewed(d, set_id)
    wanted = [os.path.normpath(os.path.abspath(p)) for p in paths]
    plans: list[Plan] = []
    for share in shares:
        host = Path(share.host)
        rec = record["shares"].get(share.host)
        if rec is None:
            continue
        rels: list[str] | None = None
        if wanted:
            rels = [os.path.relpath(w, host) for w in wanted if w == str(host) or w.startswith(str(host).rstrip("/") + "/")]
            if not rels:
                continue
        chosen = review.select((review.Change.from_dict(c) for c in rec["changes"]), rels)
        skipped = [s for s in rec["skipped"] if review.under(s["path"], rels)]
        plans.append((share, host, chosen, skipped))
    # The guest as it is now must still hold what was reviewed, byte for byte: fetch and check all before writing any.
    fetched: dict[str, dict[str, bytes]] = {}  # share → path → content
    moved: list[str] = []
    for share, host, chosen, _ in plans:
        content = fetched.setdefault(share.host, {})
        if not chosen:
            continue
        now = {c.path: c for c in review.changes(host, files.scan(share)).changes}
        for c in chosen:
            if now.get(c.path) not in (c, None):
                moved.append(f"{host}/{c.path}")
            elif c.what == "file" and c.kind != "deleted":
                content[c.path] = files.fetch(share, c.path)
                if hashlib.sha256(content[c.path]).hexdigest() != c.sha256:
                    moved.append(f"{host}/{c.path}")
    if moved:
        raise InstanceError(f"sandbox {d.name!r} changed {', '.join(printable(m) for m in moved[:5])}"
                            f"{' and more' if len(moved) > 5 else ''} since the diff you reviewed; nothing was applied",
                            hint=f"`vivarium diff {d.name}` again, then apply what it shows")  # fmt: skip
    return record["id"], plans, fetched


def apply(d: state.InstanceDir, files: GuestFiles, shares: Sequence[Shared], paths: Sequence[str] = (),
          set_id: str | None = None) -> list[tuple[str, writeback.ApplyResult, list[dict[str, str]]]]:  # fmt: skip
    """Copy the reviewed changes (all, or those at or under `paths`) to the host: exactly what `diff` showed
    (the last one, or `set_id`), or nothing when the guest changed any of it since. Host-changed paths are left alone.
    Returns (share, result, skipped) per share."""
    _, plans, fetched = _checked(d, files, shares, paths, set_id)
    results = []
    for share, host, chosen, skipped in plans:
        snap_path = d.path / f"review-{share.tag}.json"
        snap = writeback.load_snapshot(snap_path)
        st = host.stat()
        owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
        with d.lock():
            result = writeback.apply(host, chosen, snap, fetched[share.host], owner)
            writeback.save_snapshot(snap_path, snap)
        results.append((share.host, result, skipped))
    return results


@dataclass(frozen=True)
class Branched:
    share: str
    repo: str
    commit: str
    parent: str
    noted: bool  # the parent is the commit noted when the sandbox started (else: HEAD now)
    changes: int
    skipped: list[dict[str, str]]


def apply_branch(d: state.InstanceDir, files: GuestFiles, shares: Sequence[Shared], branch: str, paths: Sequence[str] = (),
                 set_id: str | None = None) -> list[Branched]:  # fmt: skip
    """The reviewed change set as a commit on the new branch `branch` of each share's repository, on top of the
    commit checked out when the sandbox started; the working tree and the index are not touched."""
    set_id, plans, fetched = _checked(d, files, shares, paths, set_id)
    out = []
    for share, host, chosen, skipped in plans:
        repo = gitbranch.find(host)
        if repo is None:
            raise UsageError(f"apply --branch: {host} is not in a git repository", hint=f"`vivarium apply {d.name}` writes the files instead")
        noted = _noted_head(d, share)
        parent = noted or gitbranch.head(host)
        if parent is None:
            raise UsageError(f"apply --branch: the repository at {repo.top} has no commit to put the changes on")
        message = f"Changes from sandbox {d.name} ({share.guest}), change set {set_id}\n"
        made = gitbranch.commit(repo, parent, branch, chosen, fetched[share.host], message)
        out.append(Branched(share.host, str(repo.top), made, parent, noted is not None, len(chosen), skipped))
    return out


def _noted_head(d: state.InstanceDir, share: Shared) -> str | None:
    try:
        text = (d.path / f"review-{share.tag}.head").read_text().strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{40,64}", text) else None
