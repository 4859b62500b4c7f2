# Applying one sandbox's settings, sourced by boot-setup (at boot, from fw_cfg)
# and by control (when a guest restored from a template becomes an instance,
# from the host's request). Settings are files DIR/NAME/raw, as the kernel's
# qemu_fw_cfg shows them. Under TCG every process started costs ~50 ms: these
# stick to shell builtins where they can.

get() {  # get DIR NAME VAR: VAR := the first line of DIR/NAME/raw; false if absent or empty
    [ -r "$1/$2/raw" ] || return 1
    read -r "$3" < "$1/$2/raw" || true  # fw_cfg files have no final newline
    eval "[ -n \"\$$3\" ]"
}

agent_user() {  # DIR: user := the agent user DIR names, else the image's
    user=""
    get "$1" user user || read -r user < /etc/vivarium/user
}

setup_identity() {  # DIR: the agent's authorized key, the SSH host key, the hostname
    key="" name=""
    agent_user "$1"
    [ -d /run/vivarium/authorized_keys ] || mkdir -p -m 0755 /run/vivarium/authorized_keys
    if get "$1" authorized_key key; then
        printf '%s\n' "$key" > "/run/vivarium/authorized_keys/$user"
    fi
    if [ -r "$1/ssh_host_key/raw" ]; then
        umask 077  # sshd (9.2) reads its host key at every connection: the next login sees this one
        while IFS= read -r line; do printf '%s\n' "$line"; done < "$1/ssh_host_key/raw" > /run/vivarium/ssh_host_ed25519_key
        umask 022
    elif [ ! -e /run/vivarium/ssh_host_ed25519_key ]; then
        # No key from the host (booted by hand): make one for this boot.
        ssh-keygen -q -t ed25519 -N '' -f /run/vivarium/ssh_host_ed25519_key
    fi
    if get "$1" hostname name; then
        echo "$name" > /proc/sys/kernel/hostname
        printf '%s\n' "$name" > /etc/hostname
        printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$name" > /etc/hosts
    fi
}

setup_network() {
    # Fixed addresses, so no DHCP and no network manager. A fenced sandbox has two
    # NICs: QEMU user networking (restrict=on: only the host's forwarded ports come
    # in, SSH among them) and, found by its MAC, the one the host fences: a TAP in
    # the sandbox's own network namespace, where the host's gateway takes every
    # connection and DNS query, whatever their address. Without it (unfenced),
    # user networking is the way out. vivarium's initrd has loaded virtio_net
    # already (net.ifnames=0 keeps the names ethN); booted another way, wait for the NICs.
    user="" fenced="" tries=0
    while [ -z "$user" ] && [ $tries -lt 100 ]; do
        for dev in /sys/class/net/*; do
            [ -e "$dev/device" ] || continue
            read -r mac < "$dev/address"
            if [ "$mac" = 52:54:00:76:69:76 ]; then fenced=${dev##*/}; else user=${dev##*/}; fi
        done
        [ -n "$user" ] || { sleep 0.1; tries=$((tries + 1)); }
    done
    if [ -z "$user" ]; then
        echo "vivarium: no network interface appeared" > /dev/ttyS0
        return 0
    fi
    if [ -n "$fenced" ]; then
        ip -batch - <<NET
link set lo up
link set $user up
addr replace 10.0.2.15/24 dev $user
link set $fenced up
addr replace 10.0.3.15/24 dev $fenced
route replace default via 10.0.3.1 dev $fenced
route replace default via 10.0.2.2 dev $user table 100
rule add from 10.0.2.15 lookup 100
NET
        # Replies on a forwarded connection leave the way it came in: user networking keeps the client's
        # own address when it is not the host's loopback (a port bound to 0.0.0.0, reached from the LAN).
        # Only replies: a connection the guest opens from 10.0.2.15 meets restrict=on and goes nowhere.
        # Every DNS query reaches the fence's resolver, whatever server it is sent to.
        echo "nameserver 10.0.3.1" > /etc/resolv.conf
        # The guest's containers go out through it too (Docker runs without iptables here).
        echo 1 > /proc/sys/net/ipv4/ip_forward
    else
        ip -batch - <<NET
link set lo up
link set $user up
addr replace 10.0.2.15/24 dev $user
route replace default via 10.0.2.2 dev $user
NET
        echo "nameserver 10.0.2.3" > /etc/resolv.conf
    fi
}

wait_shares() {  # N: until N virtiofs devices are bound (plugged in at run time)
    [ "$1" -gt 0 ] || return 0
    [ -d /sys/module/virtiofs ] || modprobe virtiofs 2>/dev/null || true
    tries=0
    while [ $tries -lt 100 ]; do
        n=0
        for dev in /sys/bus/virtio/drivers/virtiofs/virtio*; do [ -e "$dev" ] && n=$((n + 1)); done
        [ $n -lt "$1" ] || return 0
        sleep 0.1; tries=$((tries + 1))
    done
}

setup_shares() {  # DIR: shared host directories (virtiofs), one "TAG MODE PATH" line each (MODE: rw, ro, review)
    # A read-only share is read-only on the host side as well; "ro" here only makes that visible.
    [ -r "$1/shares/raw" ] || return 0
    loaded=""
    agent_user "$1"
    while read -r tag mode path; do
        [ -n "$tag" ] || continue
        [ -n "$loaded" ] || { [ -d /sys/module/virtiofs ] || modprobe virtiofs 2>/dev/null || true; loaded=1; }
        mkdir -p "$path"
        if [ "$mode" = review ]; then
            # the host's directory (read-only on the host side) under an overlay
            # whose writable layer is on this disk: the host takes changes with `vivarium apply`
            lower=/run/vivarium/lower/$tag state=/var/lib/vivarium/review/$tag
            mkdir -p "$lower" "$state/upper" "$state/work"
            [ -d /sys/module/overlay ] || modprobe overlay 2>/dev/null || true
            if mount -t virtiofs -o ro "$tag" "$lower"; then
                chown "$user" "$state/upper" 2>/dev/null || true
                mount -t overlay overlay -o "lowerdir=$lower,upperdir=$state/upper,workdir=$state/work" "$path" \
                    || echo "vivarium: cannot put an overlay on share $tag at $path" > /dev/ttyS0
            else
                echo "vivarium: cannot mount share $tag" > /dev/ttyS0
            fi
            continue
        fi
        opts=rw
        [ "$mode" = ro ] && opts=ro
        mount -t virtiofs -o "$opts" "$tag" "$path" || echo "vivarium: cannot mount share $tag on $path" > /dev/ttyS0
    done < "$1/shares/raw"
}

setup_ca() {  # DIR: the sandbox's CA (its gateway's: a secret's hosts, denial pages) joins the system's trust
    # store, on the disk (a template's copy replaces the template's). The bundle keeps it through apt:
    # /etc/ca-certificates/update.d/vivarium-sandbox-ca puts it back after update-ca-certificates.
    # (-r, not -s: a fw_cfg file in sysfs says it has size 0; that cost a cold boot its CA before)
    [ -r "$1/ca/raw" ] || return 0
    first=""
    { IFS= read -r first || true; } < "$1/ca/raw"
    [ "$first" = "-----BEGIN CERTIFICATE-----" ] || return 0
    { printf '%s\n' "$SANDBOX_CA_MARK"; while IFS= read -r line || [ -n "$line" ]; do printf '%s\n' "$line"; done < "$1/ca/raw"; } > "$SANDBOX_CA"
    bundle_ca
}

SANDBOX_CA=/etc/ssl/vivarium/sandbox-ca.crt  # NODE_EXTRA_CA_CERTS in /etc/environment
SANDBOX_CA_MARK="# vivarium sandbox CA"

bundle_ca() {  # the system bundle less any earlier sandbox CA (from the mark on), plus this one: one process
    sed -i -e "\$r $SANDBOX_CA" -e "/^$SANDBOX_CA_MARK\$/,\$d" /etc/ssl/certs/ca-certificates.crt
}

setup_kube_link() {  # DIR: kube.link_into_share (the origin's way): ~/.kube lives in the project share,
    # so the kubeconfig Kind writes inside is the host's to use too.
    klink=""
    get "$1" kube_link klink || return 0
    agent_user "$1"
    mkdir -p "$klink/.kube"
    chown "$user:" "$klink/.kube" 2>/dev/null || true
    [ -L "/home/$user/.kube" ] || rm -rf "/home/$user/.kube"
    ln -sfn "$klink/.kube" "/home/$user/.kube"
    chown -h "$user:" "/home/$user/.kube" 2>/dev/null || true
}
