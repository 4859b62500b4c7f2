#!/bin/sh
# Runs inside the image (chroot) after every package is installed.
# Usage: customize.sh USER UID
set -eu
user=$1 uid=$2

# The agent user: passwordless sudo, in the docker group, uid as on the host.
useradd --create-home --uid "$uid" --user-group --groups sudo,docker --shell /bin/bash "$user"
passwd --lock "$user" >/dev/null
mkdir -p /etc/vivarium
printf '%s\n' "$user" > /etc/vivarium/user

# No secret may be shared by every instance: host keys and machine-id come at boot.
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id

systemctl enable systemd-networkd.service vivarium-setup.service vivarium-swap.service ssh.service >/dev/null 2>&1
# Units that only cost boot time in a disposable VM.
systemctl mask \
    systemd-networkd-wait-online.service \
    apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer \
    getty@tty1.service systemd-timesyncd.service \
    >/dev/null 2>&1
