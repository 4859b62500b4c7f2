#!/bin/sh
# Runs inside the image (chroot) after every package is installed.
# Usage: customize.sh USER UID
set -eu
user=$1 uid=$2

# Modes git cannot carry.
chmod 0440 /etc/sudoers.d/vivarium
chmod 0755 /usr/local/lib/vivarium/boot-setup /usr/local/lib/vivarium/control /etc/ca-certificates/update.d/vivarium-sandbox-ca
# Where each sandbox's CA goes (setup.sh: setup_ca); a file of the image's would be no sandbox's.
mkdir -p /etc/ssl/vivarium

# The agent user: passwordless sudo, in the docker group, uid as on the host.
useradd --create-home --uid "$uid" --user-group --groups sudo,docker --shell /bin/bash "$user"
passwd --lock "$user" >/dev/null
mkdir -p /etc/vivarium
printf '%s\n' "$user" > /etc/vivarium/user

# No secret may be shared by every instance: host keys and machine-id come at boot.
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id

systemctl enable vivarium-setup.service vivarium-sshd.service vivarium-swap.service \
    vivarium-control.service >/dev/null 2>&1
# Debian's nftables.service has no rules to load (the fence is the host's).
systemctl disable nftables.service >/dev/null 2>&1 || true
# Units that only cost boot time in a disposable VM.
systemctl mask \
    systemd-networkd-wait-online.service \
    apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer \
    getty@tty1.service systemd-timesyncd.service ssh.service ssh.socket \
    systemd-networkd.service systemd-network-generator.service \
    e2scrub_reap.service modprobe@efi_pstore.service modprobe@dm_mod.service \
    >/dev/null 2>&1

# Docker starts on first use (docker.socket), not at boot: under TCG dockerd
# and containerd take ~10 s of CPU that a booting sandbox needs for sshd.
systemctl disable docker.service containerd.service >/dev/null 2>&1
systemctl enable docker.socket >/dev/null 2>&1

# Every SSH login ran the update-motd scripts (pam_motd): ~0.25 s of a
# 0.65 s `ssh true` under TCG, for a banner no agent reads.
sed -i 's/^session\s\+optional\s\+pam_motd\.so/# vivarium: &/' /etc/pam.d/sshd

# pam_nologin refuses user logins until systemd-user-sessions runs after
# basic.target (AppArmor, Docker's socket, ...). The agent may log in as soon
# as sshd answers.
ln -sf /dev/null /etc/tmpfiles.d/systemd-nologin.conf

# Generators run on every boot before any unit starts; under TCG each costs
# ~0.2 s. Keep fstab (it also grows the root filesystem) and the tiny ones.
mkdir -p /etc/systemd/system-generators
for g in gpt-auto getty cryptsetup hibernate-resume integritysetup veritysetup system-update rc-local sysv; do
    ln -sf /dev/null "/etc/systemd/system-generators/systemd-$g-generator"
done
