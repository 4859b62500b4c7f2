"""`vivarium build` for real: mmdebstrap, the cache, what is inside the image, bad downloads."""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import state
from vivarium.image.build import find_image
from vivarium.run import run

from .conftest import vv, write_config

pytestmark = pytest.mark.integration


def image_path(built: subprocess.CompletedProcess[str]) -> Path:
    return Path(built.stdout.strip().splitlines()[-1])


def test_second_build_is_a_cache_hit(project: Path, built: subprocess.CompletedProcess[str]) -> None:
    started = time.monotonic()
    again = vv("build", cwd=project)
    took = time.monotonic() - started
    assert "up to date (cached)" in again.stderr
    assert image_path(again) == image_path(built)
    print(f"cache hit in {took:.2f}s (whole CLI process)")


def test_build_says_what_it_left_out(built: subprocess.CompletedProcess[str]) -> None:
    manifest = json.loads((image_path(built) / "manifest.json").read_text())
    # No internet here: the pinned kind and kubectl are left out, and said so.
    for name in manifest["left_out"]:
        assert name in built.stderr or "up to date" in built.stderr
    assert manifest["kernel"].endswith("cloud-amd64")
    # the agent CLIs and their versions are recorded with the image, and said
    assert manifest["agents"]["claude-code"][0].isdigit()
    assert f"claude-code {manifest['agents']['claude-code']}" in built.stderr or "up to date" in built.stderr


@pytest.fixture(scope="module")
def rootfs(built: subprocess.CompletedProcess[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The base disk as a raw ext4 file that debugfs can read without mounting."""
    raw = tmp_path_factory.mktemp("raw") / "base.raw"
    run(["qemu-img", "convert", "-O", "raw", image_path(built) / "base.qcow2", raw])
    yield raw
    raw.unlink()


def debugfs(raw: Path, request: str) -> str:
    return subprocess.run(["/usr/sbin/debugfs", "-R", request, raw], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    "path", ["/usr/bin/docker", "/usr/bin/containerd", "/usr/bin/git", "/usr/bin/node", "/usr/bin/npm",
             "/usr/bin/python3", "/usr/sbin/sshd", "/usr/bin/sudo", "/usr/sbin/nft", "/usr/sbin/iptables",
             "/usr/bin/jq", "/usr/bin/curl", "/usr/bin/gcc", "/usr/sbin/apparmor_parser",
             "/usr/local/bin/claude"],
)  # fmt: skip
def test_image_has(rootfs: Path, path: str) -> None:
    out = debugfs(rootfs, f"stat {path}")
    assert "Inode:" in out, f"{path} missing from the image"


def test_agent_user_in_sudo_and_docker(rootfs: Path) -> None:
    groups = debugfs(rootfs, "cat /etc/group")
    members = {line.split(":")[0]: line.split(":")[3].split(",") for line in groups.splitlines() if line.count(":") == 3}
    assert "agent" in members["sudo"] and "agent" in members["docker"]
    passwd = debugfs(rootfs, "cat /etc/passwd")
    assert any(line.startswith("agent:x:1000:") for line in passwd.splitlines())


def test_docker_pools_are_pinned(rootfs: Path) -> None:
    daemon = json.loads(debugfs(rootfs, "cat /etc/docker/daemon.json"))
    assert daemon["bip"].startswith("172.20.")
    fence = ipaddress.IPv4Network("172.20.0.0/14")
    assert ipaddress.IPv4Interface(daemon["bip"]).network.subnet_of(fence)
    for pool in daemon["default-address-pools"]:
        assert ipaddress.IPv4Network(pool["base"]).subnet_of(fence)


def test_no_instance_secret_in_the_image(rootfs: Path) -> None:
    assert "ssh_host_" not in debugfs(rootfs, "ls /etc/ssh")
    assert debugfs(rootfs, "cat /etc/machine-id").strip() == ""


# ----------------------------------------------- a bad download fails cleanly


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "kind").write_bytes(b"not really kind\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, directory=str(tmp_path / "www"), **k)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_wrong_sha256_fails_in_one_line_and_leaves_nothing(project: Path, server: str, tmp_path: Path, built: object) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    wrong = "1" * 64
    write_config(proj, f'[[image.download]]\nname = "kind"\nurl = "{server}/kind"\nsha256 = "{wrong}"\ndest = "/usr/local/bin/kind"\n')
    before = sorted(p.name for p in state.images_dir().iterdir())
    result = vv("build", cwd=proj, check=False)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    first = errors[0]
    actual = hashlib.sha256(b"not really kind\n").hexdigest()
    assert first.startswith("error: download kind:") and f"{server}/kind" in first and wrong in first and actual in first
    assert "Traceback" not in result.stderr
    after = sorted(p.name for p in state.images_dir().iterdir())
    assert [p for p in after if p.startswith(".tmp-")] == []
    assert [p for p in after if not p.startswith(".")] == [p for p in before if not p.startswith(".")]


def test_interrupted_build_leaves_no_half_image(tmp_path: Path, built: object) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    write_config(proj, '[image]\npackages = ["hello"]\nagents = []\n')
    from vivarium import config as cfg
    from vivarium.image.recipe import Recipe

    key = Recipe.from_config(cfg.load(proj / "vivarium.toml")).key()
    # a build that ever finished (its interrupt lost) would make this one a cache hit: start from nothing
    shutil.rmtree(state.images_dir() / key, ignore_errors=True)
    env = dict(os.environ)
    # ^C's default action, as at a terminal: a run in the background (`cmd &`) ignores SIGINT, and so would the CLI
    proc = subprocess.Popen([sys.executable, "-m", "vivarium", "build"], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    # Wait until mmdebstrap is really working on it, then interrupt.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(state.images_dir().glob(".tmp-*/root/var")):
        time.sleep(0.5)
    assert list(state.images_dir().glob(".tmp-*")), "the build never started"
    proc.send_signal(2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err
    assert list(state.images_dir().glob(".tmp-*")) == []
    assert find_image(key) is None and not (state.images_dir() / key).exists()
