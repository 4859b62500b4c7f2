from __future__ import annotations

import hashlib
import http.server
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from vivarium import config as cfg
from vivarium import host
from vivarium.errors import DownloadError
from vivarium.image import build, initrd, mmdebstrap
from vivarium.image.recipe import BASE_PACKAGES, Recipe, _debian_uris, host_mirror

from . import records

HOST = host.Host(cpus=4, memory=8 << 30, user="alice", uid=1234)


def recipe(tmp_path: Path, **settings: object) -> Recipe:
    return Recipe.from_config(cfg.load(None, settings, cwd=tmp_path, host=HOST))


def test_key_is_stable_and_follows_the_recipe(tmp_path: Path) -> None:
    a = recipe(tmp_path)
    assert a.key() == recipe(tmp_path).key()
    assert recipe(tmp_path, **{"image.packages": ["htop"]}).key() != a.key()
    assert recipe(tmp_path, **{"image.setup": "echo hi"}).key() != a.key()
    assert recipe(tmp_path, **{"image.suite": "trixie"}).key() != a.key()
    # VM shape is not part of the image
    assert recipe(tmp_path, **{"vm.memory": "2G", "vm.cpus": "1"}).key() == a.key()


def test_dev_profile_packages(tmp_path: Path) -> None:
    r = recipe(tmp_path, **{"image.packages": ["htop"]})
    for pkg in ("openssh-server", "sudo", "docker.io", "containerd", "nftables", "iptables", "git", "curl",
                "build-essential", "python3-venv", "nodejs", "npm", "jq", "linux-image-cloud-amd64", "htop"):  # fmt: skip
        assert pkg in r.packages
    assert set(BASE_PACKAGES) <= set(r.packages)
    assert r.user == "alice" and r.uid == 1234


def test_mmdebstrap_argv(tmp_path: Path) -> None:
    r = recipe(tmp_path, **{"image.setup": "touch /etc/from-setup", "image.mirror": "http://mirror.example/debian"})
    argv = mmdebstrap.mmdebstrap_argv(r, tmp_path / "root", tmp_path / "early.tar", tmp_path / "files.tar", mode="root")
    assert argv[0] == "mmdebstrap" and "--mode=root" in argv and "--variant=minbase" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "root"), "http://mirror.example/debian"]
    include = next(a for a in argv if a.startswith("--include="))
    assert "docker.io" in include.split("=", 1)[1].split(",")
    hooks = [a for a in argv if a.startswith("--customize-hook=")]
    assert any("vivarium-customize.sh alice 1234" in h for h in hooks)
    assert any("touch /etc/from-setup" in h for h in hooks)
    assert any("npm install --global" in h and "@anthropic-ai/claude-code" in h for h in hooks)
    assert "/etc/resolv.conf" in hooks[-2]  # the image's own network files go in last
    assert hooks[0] == f"--customize-hook=tar-in {tmp_path / 'files.tar'} /"


def test_pack_tree_makes_everything_root_owned(tmp_path: Path) -> None:
    import tarfile

    tree = tmp_path / "tree"
    (tree / "etc/sudoers.d").mkdir(parents=True)
    (tree / "etc/sudoers.d/vivarium").write_text("%sudo ALL=(ALL) NOPASSWD: ALL\n")
    (tree / "usr/local/bin").mkdir(parents=True)
    (tree / "usr/local/bin/tool").write_text("#!/bin/sh\n")
    (tree / "usr/local/bin/tool").chmod(0o755)
    out = tmp_path / "t.tar"
    build.pack_tree(out, [tree])
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"etc/sudoers.d/vivarium", "usr/local/bin/tool"}
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "root" for m in members.values())
    assert members["usr/local/bin/tool"].mode & 0o111


def test_host_mirror_reads_both_apt_formats(tmp_path: Path) -> None:
    deb822 = """Types: deb
URIs: http://deb.example.org/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://deb.example.org/debian-security
Suites: bookworm-security
Components: main
"""
    assert _debian_uris(deb822, deb822=True) == ["http://deb.example.org/debian"]
    assert _debian_uris("deb [arch=amd64] http://m.example/debian/ bookworm main contrib\n", deb822=False) == ["http://m.example/debian"]
    assert _debian_uris("deb https://packages.cloud.google.com/apt cloud-sdk main\n", deb822=False) == []
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(deb822)
    assert host_mirror((tmp_path / "nothing", tmp_path / "sources.list.d")) == "http://deb.example.org/debian"
    assert host_mirror((tmp_path / "nothing",)) == "http://deb.debian.org/debian"


# ------------------------------------------------- downloads, against a local server

PAYLOAD = b"#!/bin/sh\necho fake kind\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "kind").write_bytes(PAYLOAD)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, directory=str(root), **k)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


GOOD = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_verified_into_place(tmp_path: Path, server: str) -> None:
    overlay = tmp_path / "overlay"
    d = cfg.Download("kind", f"{server}/kind", GOOD, "/usr/local/bin/kind")
    seen: list[tuple[str, str]] = []
    got, left_out = build.fetch_downloads((d,), overlay, lambda p, x: seen.append((p, x)))
    placed = overlay / "usr/local/bin/kind"
    assert placed.read_bytes() == PAYLOAD and placed.stat().st_mode & 0o111
    assert got[0]["name"] == "kind" and left_out == []
    assert seen[0][0] == "download"


def test_wrong_sum_names_tool_url_and_both_sums(tmp_path: Path, server: str) -> None:
    d = cfg.Download("kind", f"{server}/kind", "0" * 64, "/usr/local/bin/kind")
    with pytest.raises(DownloadError) as e:
        build.fetch_downloads((d,), tmp_path / "o", lambda p, x: None)
    msg = str(e.value)
    assert "kind" in msg and f"{server}/kind" in msg and GOOD in msg and "0" * 64 in msg
    assert "\n" not in msg
    assert not (tmp_path / "o" / "usr/local/bin/kind").exists()


def test_missing_file_is_an_error(tmp_path: Path, server: str) -> None:
    d = cfg.Download("kind", f"{server}/nope", GOOD, "/usr/local/bin/kind")
    with pytest.raises(DownloadError, match="answered 404"):
        build.fetch_downloads((d,), tmp_path / "o", lambda p, x: None)


def test_unreachable_host_leaves_the_tool_out(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = cfg.Download("kind", f"http://127.0.0.1:{port}/kind", GOOD, "/usr/local/bin/kind")
    got, left_out = build.fetch_downloads((d,), tmp_path / "o", lambda p, x: None)
    assert got == [] and left_out == ["kind"]


def test_cached_download_is_not_fetched_again(tmp_path: Path, server: str) -> None:
    d = cfg.Download("kind", f"{server}/kind", GOOD, "/usr/local/bin/kind")
    build.fetch_downloads((d,), tmp_path / "a", lambda p, x: None)
    gone = replace(d, url="http://127.0.0.1:9/kind")  # the same file by sum, from nowhere
    _, left_out = build.fetch_downloads((gone,), tmp_path / "b", lambda p, x: None)
    assert left_out == [] and (tmp_path / "b/usr/local/bin/kind").read_bytes() == PAYLOAD


# ------------------------------------------------------------------ initrd

DEP = """\
K/virtio_pci.ko: K/virtio_pci_legacy_dev.ko K/virtio_pci_modern_dev.ko K/virtio_ring.ko K/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko K/virtio_ring.ko K/virtio.ko
kernel/drivers/firmware/qemu_fw_cfg.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
N/nf_tables.ko: N/nfnetlink.ko kernel/lib/libcrc32c.ko
N/nft_chain_nat.ko: N/nf_nat.ko N/nf_conntrack.ko N/nf_defrag_ipv6.ko N/nf_defrag_ipv4.ko N/nf_tables.ko N/nfnetlink.ko kernel/lib/libcrc32c.ko
N/nft_redir.ko: N/nf_nat.ko N/nf_conntrack.ko N/nf_defrag_ipv6.ko N/nf_defrag_ipv4.ko N/nf_tables.ko N/nfnetlink.ko kernel/lib/libcrc32c.ko
N/nft_ct.ko: N/nf_conntrack.ko N/nf_defrag_ipv6.ko N/nf_defrag_ipv4.ko N/nf_tables.ko N/nfnetlink.ko kernel/lib/libcrc32c.ko
N/nf_nat.ko: N/nf_conntrack.ko N/nf_defrag_ipv6.ko N/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
N/nf_conntrack.ko: N/nf_defrag_ipv6.ko N/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
N/nf_defrag_ipv6.ko:
N/nf_defrag_ipv4.ko:
N/nfnetlink.ko:
kernel/lib/libcrc32c.ko:
"""


DEP = DEP.replace("kernel/drivers/virtio/", "K/").replace("N/", "kernel/net/netfilter/")  # short lines; the paths only need to agree


def test_initrd_module_order_puts_dependencies_first() -> None:
    order = [Path(p).stem for p in initrd.load_order(DEP, initrd.MODULES)]
    assert order.index("virtio") < order.index("virtio_ring") < order.index("virtio_pci") < order.index("virtio_blk")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert len(order) == len(set(order)) and "qemu_fw_cfg" in order
    fence = [Path(p).stem for p in initrd.load_order(DEP, (*initrd.MODULES, *initrd.FENCE_MODULES))]
    assert fence.index("libcrc32c") < fence.index("nf_conntrack") < fence.index("nf_nat") < fence.index("nft_redir")
    assert fence.index("nfnetlink") < fence.index("nf_tables") < fence.index("nft_chain_nat") and len(fence) == len(set(fence))
    with pytest.raises(KeyError):
        initrd.load_order(DEP, ["nvme"])


def test_initrd_is_a_cpio_the_tools_can_read(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    moddir = tree / "lib/modules/6.1.0-test"
    for mod in set(DEP.replace(":", " ").split()):
        (moddir / mod).parent.mkdir(parents=True, exist_ok=True)
        (moddir / mod).write_bytes(b"\x7fELF" + mod.encode())
    (moddir / "modules.dep").write_text(DEP)
    (tree / "bin").mkdir()
    (tree / "bin/busybox").write_bytes(b"\x7fELF busybox")
    archive = tmp_path / "initrd.img"
    archive.write_bytes(initrd.make_initrd(tree, "6.1.0-test"))
    listing = subprocess.run(["cpio", "-itv"], stdin=archive.open("rb"), capture_output=True, text=True, check=True).stdout
    assert "init" in listing and "bin/busybox" in listing and "lib/modules/virtio_blk.ko" in listing
    assert any(line.startswith("crw") and "dev/console" in line for line in listing.splitlines())
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames"], cwd=out, stdin=archive.open("rb"), capture_output=True, check=False)
    init = (out / "init").read_text()
    assert init.startswith("#!/bin/busybox sh") and "switch_root /root /sbin/init" in init
    assert (out / "lib/modules/virtio_net.ko").read_bytes().endswith(b"virtio_net.ko")


def test_prune_keeps_used_recent_and_current(tmp_path: Path) -> None:
    import os
    import time

    from vivarium import state

    root = state.images_dir()
    now = time.time()
    for i, key in enumerate(["old1", "old2", "used", "new1", "new2"]):
        (root / key).mkdir(parents=True)
        (root / key / "manifest.json").write_text("{}")
        os.utime(root / key, (now - 100 + i, now - 100 + i))
    inst = state.InstanceDir.of("box")
    inst.path.mkdir(parents=True)
    inst.write(records.made("box", image="used"))
    removed = build.prune_images(keep={"old1"})
    assert sorted(removed) == ["old2"]
    assert sorted(p.name for p in root.iterdir()) == ["new1", "new2", "old1", "used"]
    assert inst.read().instance.image == "used"


def test_npm_failure_is_one_line_naming_the_package() -> None:
    from vivarium.image.mmdebstrap import npm_failure

    log = [
        "I: running --customize-hook in shell: sh -c 'chroot ... npm install --global @openai/codex'",
        "npm error code 1",
        "npm error path /usr/lib/node_modules/@openai/codex",
        "npm error command failed",
        "npm error command sh -c node scripts/postinstall.js",
        "npm error Error: getaddrinfo ENOTFOUND github.com",
        "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log",
    ]
    assert npm_failure(log) == "installing the agent CLI @openai/codex from npm failed: Error: getaddrinfo ENOTFOUND github.com"
    assert npm_failure(["npm error 404 Not Found - GET https://registry.npmjs.org/nope - Not found"]) == (
        "installing the agent CLI from npm failed: 404 Not Found - GET https://registry.npmjs.org/nope - Not found"
    )
    assert npm_failure(["E: apt failed"]) is None
