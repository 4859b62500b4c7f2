"""Running mmdebstrap: its command line for a recipe, its progress read from its log as phases, and its
failures (npm's included) told in one line."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from vivarium import state
from vivarium.errors import BuildError
from vivarium.guest import CUSTOMIZE, FINAL_HOSTS, FINAL_RESOLV
from vivarium.image.recipe import Recipe
from vivarium.progress import Progress
from vivarium.run import spawn

# The host's CA bundle, copied into the image (a host behind a TLS-inspecting proxy needs it to fetch anything).
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def mmdebstrap_argv(recipe: Recipe, target: Path, early: Path, files: Path, *, mode: str) -> list[str]:
    """The mmdebstrap command line for a recipe: pure, so tests can read it."""
    q = shlex.quote
    # Build-time network inside the image is the host's: its name overrides and
    # CA bundle (a TLS-inspecting proxy), in /tmp only, gone before packing.
    ca = "/tmp/vivarium-host-ca.crt"
    ca_env = " ".join(f"{v}={ca}" for v in ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"))
    in_image = f'chroot "$1" env HOME=/root DEBIAN_FRONTEND=noninteractive {ca_env}'
    hooks = [
        f"--essential-hook=tar-in {q(str(early))} /",
        f"--customize-hook=tar-in {q(str(files))} /",
        f"--customize-hook=upload {q(str(CUSTOMIZE))} /tmp/vivarium-customize.sh",
        f"--customize-hook={in_image} sh /tmp/vivarium-customize.sh {q(recipe.user)} {recipe.uid}",
        f'--customize-hook=cp /etc/hosts "$1/etc/hosts"; cat {q(str(HOST_CA))} > "$1{ca}" 2>/dev/null || : > "$1{ca}"',
    ]
    if recipe.agents:
        pkgs = " ".join(q(p) for p in recipe.npm_packages())
        hooks.append(f"--customize-hook={in_image} npm install --global --no-fund --no-audit --loglevel=error {pkgs}")
    if recipe.setup:
        hooks.append(f"--customize-hook=cat > \"$1/tmp/vivarium-setup.sh\" <<'VIVARIUM_SETUP_EOF'\n{recipe.setup}\nVIVARIUM_SETUP_EOF")
        hooks.append(f"--customize-hook={in_image} sh -e /tmp/vivarium-setup.sh")
    hooks.append('--customize-hook=rm -rf "$1"/tmp/vivarium-* "$1"/root/.npm "$1"/var/cache/apt/archives/*.deb')
    hooks.append(f"--customize-hook=upload {q(str(FINAL_HOSTS))} /etc/hosts")
    hooks.append(f"--customize-hook=upload {q(str(FINAL_RESOLV))} /etc/resolv.conf")
    hooks.append('--customize-hook=echo vivarium > "$1/etc/hostname"')
    dpkg_excludes = [
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/locale/*",
        "path-include=/usr/share/locale/locale.alias",
    ]
    return [
        "mmdebstrap",
        f"--mode={mode}",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt={o}" for o in dpkg_excludes),
        *hooks,
        recipe.suite,
        str(target),
        recipe.mirror,
    ]


ORDER = ("resolve", "download", "install", "customise", "pack")


# mmdebstrap's progress lines → our phases
_PHASES = (
    ("running apt-get update", "resolve"),
    ("downloading packages", "download"),
    ("extracting archives", "install"),
    ("installing essential", "install"),
    ("installing remaining", "install"),
    ("running --customize-hook", "customise"),
    ("running special hook", "customise"),
    ("running --essential-hook", "install"),
    ("cleaning package lists", "customise"),
)


def _stop_group(proc: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM to the whole process group, SIGKILL after `grace` seconds; the mounts it leaves are _remove_tree's."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
        return


def run_mmdebstrap(argv: list[str], logfile: Path, progress: Progress) -> None:
    progress("resolve", "starting mmdebstrap")
    current = "resolve"
    remaining = False
    with logfile.open("w") as out:
        # Its own process group: an interrupt stops all of it (mmdebstrap's top process alone waits for
        # its workers, and apt and dpkg run on for minutes).
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                out.write(line)
                text = line.strip()
                if "installing remaining" in text:
                    remaining = True
                for needle, phase in _PHASES:
                    if phase == "customise" and not remaining:
                        phase = "install"  # the essential hook runs mid-install
                    # Phases only move forward.
                    if needle in text and ORDER.index(phase) >= ORDER.index(current):
                        current = phase
                        progress(phase, text.removeprefix("I: "))
                        break
            rc = proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
    if rc != 0:
        saved = state.cache_dir() / "logs" / "build-failed.log"
        saved.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(logfile, saved)
        lines = [ln for ln in logfile.read_text().splitlines() if ln.strip()]
        npm = npm_failure(lines)
        if npm:
            raise BuildError(npm, hint=f"full log: {saved}")
        errors = [ln for ln in lines if ln.startswith(("E:", "W: hook", "npm ERR", "npm error"))]
        last = (errors or lines or ["no output"])[-1]
        raise BuildError(f"mmdebstrap failed: {last}", hint=f"full log: {saved}")


_NPM_PATH = re.compile(r"npm (?:error|ERR!) path .*/node_modules/(@[^/\s]+/[^/\s]+|[^/@\s][^/\s]*)")


_NPM_META = ("code ", "path ", "command ", "errno ", "syscall ", "A complete log", "Log files", "signal ", "cwd ")


def npm_failure(lines: list[str]) -> str | None:
    """One line for a failed `npm install` of the agent CLIs: which package, and why."""
    errs = [ln for ln in lines if ln.startswith(("npm error", "npm ERR!"))]
    if not errs:
        return None
    package = next((m.group(1) for ln in errs if (m := _NPM_PATH.match(ln))), None)
    reasons = [ln.split(" ", 2)[2].strip() for ln in errs if len(ln.split(" ", 2)) == 3]
    reason = next((r for r in reasons if r and not r.startswith(_NPM_META)), reasons[-1] if reasons else "npm failed")
    where = f" {package}" if package else ""
    return f"installing the agent CLI{where} from npm failed: {reason}"
