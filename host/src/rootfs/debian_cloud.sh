# The cloud profile of debian:SUITE: mmdebstrap's customize hook, run with the new root as $1
# (in root mode as root, in unshare mode inside the user namespace). It turns the installed
# packages into a server that works on first boot anywhere: network by DHCP, SSH by key only,
# cloud-init with the datasources a server meets, and an identity (SSH host keys, machine-id)
# that each server makes for itself.
set -eu
root="$1"

# Network: DHCP on every Ethernet NIC, whatever the kernel calls it (eth0, ens2, enp0s2...).
# cloud-init writes a more specific file (10-cloud-init-*.network) when a datasource gives one.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/90-imgforge-dhcp.network" <<'EOF'
[Match]
Type=ether
Name=en* eth*

[Network]
DHCP=yes
EOF
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service

# cloud-init: Scaleway is detected by the DMI system-manufacturer "Scaleway"; NoCloud by a
# seed ("cidata" volume or ds=nocloud on the kernel command line). As on Scaleway's own images,
# root gets the server's SSH keys (Debian's default user "debian" gets them too).
mkdir -p "$root/etc/cloud/cloud.cfg.d"
cat > "$root/etc/cloud/cloud.cfg.d/90-imgforge.cfg" <<'EOF'
# Written by imgforge (debian: cloud profile).
datasource_list: [ Scaleway, NoCloud, None ]
disable_root: false
ssh_pwauth: false
# The one locale every glibc has: no locale to generate at first boot.
locale: C.UTF-8
# The host key types Debian's sshd loads (no DSA).
ssh_genkeytypes: [ rsa, ecdsa, ed25519 ]
EOF

# sshd: keys only; no password or keyboard-interactive logins for anyone.
mkdir -p "$root/etc/ssh/sshd_config.d"
cat > "$root/etc/ssh/sshd_config.d/50-imgforge.conf" <<'EOF'
# Written by imgforge (debian: cloud profile).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
EOF

# First-boot identity. The host keys made when openssh-server was installed would be shared by
# every server: remove them. cloud-init makes new ones at first boot; where cloud-init does not
# run (no datasource), sshd makes the missing ones before its config test.
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/etc/systemd/system/ssh.service.d"
cat > "$root/etc/systemd/system/ssh.service.d/50-imgforge-host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF
# An empty machine-id: systemd makes one at first boot (and so does every server).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# No root password: the account is locked for passwords; SSH keys still log in.
chroot "$root" usermod --password '*' root
