#!/usr/bin/env bash
# Builds what `make test-boot` boots (tests/boot/), per exit-node image, into
# the cache, never into the repository:
#
#   $CACHE/boot/keys/       the test apt signing key (GnuPG home, armored public
#                           key, fingerprint) and the test CA (cert and key)
#   $CACHE/boot/<image>/    disk.raw (ext4 root filesystem, no partition table),
#                           vmlinuz and initrd.img for QEMU's -kernel/-initrd,
#                           www-1/ and www-2/: what the VM's "internet" serves:
#                             debian/               the Debian mirror (only the
#                                                   packages the document installs)
#                             stable/debian/        Tailscale's repository, with
#                                                   tailscale <pinned> (www-1), and
#                                                   also a newer <pinned>+upgrade1 (www-2)
#
# Usage: build-boot-image.sh [debian-12|debian-13 ...] (default: both).
# Idempotent: an image whose stamp matches this script's inputs is kept.
# Needs root (mmdebstrap's root mode, chroot), the Debian mirror, and the
# pinned tailscaled/tailscale from scripts/build-datapath-bins.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
BOOT="$CACHE/boot"
MIRROR_URL="http://deb.debian.org/debian"
# One pin for tailscale: the data-path build's.
TS_TAG=$(sed -n 's/^TAILSCALE_VERSION=\(v[0-9.]*\)$/\1/p' scripts/build-datapath-bins.sh | head -n 1)
TS_VERSION="${TS_TAG#v}"
TS_UPGRADE_VERSION="${TS_VERSION}+upgrade1"
TS_BIN="$CACHE/bin/tailscale-$TS_TAG"

# What a Hetzner Debian image has (cloud-init, ifupdown with the ISC DHCP
# client, openssh-server, gnupg), plus a kernel and what its initramfs needs
# (its virtio drivers are modules).
BASE_PACKAGES=systemd-sysv,dbus,cloud-init,iproute2,ifupdown,netbase,ca-certificates,gnupg,openssh-server,sudo,procps,apt-utils,locales,linux-image-cloud-amd64,udev,kmod,initramfs-tools
# What the rendered document installs from the Debian mirror (see
# builders/cloud_init.py "packages"), pre-fetched with their dependencies.
DOC_PACKAGES="iptables unattended-upgrades"

die() { echo "build-boot-image: ERROR: $*" >&2; exit 1; }
log() { echo "build-boot-image: $*"; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap in root mode, chroot)"

# Host tools, installed from Debian where this machine can (one apt at a
# time with the other steps); under CI=true a missing one is an error.
bash scripts/install-test-tools.sh --boot

# ---------------------------------------------------------------- keys
keys() {
    local k="$BOOT/keys"
    mkdir -p "$k"
    if [ ! -s "$k/signing-key.asc" ]; then
        rm -rf "$k/gnupg"
        mkdir -m 700 "$k/gnupg"
        # A test key only: no passphrase, expires in 10 years.
        gpg --homedir "$k/gnupg" --batch --pinentry-mode loopback --passphrase '' \
            --quick-gen-key "tailscale-egress test apt repository <test@tailscale-egress.invalid>" rsa3072 sign 10y
        gpg --homedir "$k/gnupg" --batch --with-colons --list-keys \
            | awk -F: '$1 == "fpr" { print $10; exit }' >"$k/signing-key.fpr"
        gpg --homedir "$k/gnupg" --batch --armor --export >"$k/signing-key.asc.tmp"
        mv "$k/signing-key.asc.tmp" "$k/signing-key.asc"
    fi
    if [ ! -s "$k/ca.crt" ]; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj "/CN=tailscale-egress boot test CA" -keyout "$k/ca.key" -out "$k/ca.crt.tmp" 2>/dev/null
        mv "$k/ca.crt.tmp" "$k/ca.crt"
    fi
}

sign_release() {  # <dists/codename dir> <origin> <label> <codename> <suite>
    local dir=$1
    apt-ftparchive -o "APT::FTPArchive::Release::Origin=$2" -o "APT::FTPArchive::Release::Label=$3" \
        -o "APT::FTPArchive::Release::Codename=$4" -o "APT::FTPArchive::Release::Suite=$5" \
        -o "APT::FTPArchive::Release::Architectures=amd64" -o "APT::FTPArchive::Release::Components=main" \
        release "$dir" >"$dir/Release.tmp"
    mv "$dir/Release.tmp" "$dir/Release"
    rm -f "$dir/InRelease"
    gpg --homedir "$BOOT/keys/gnupg" --batch --yes --pinentry-mode loopback --passphrase '' \
        --clearsign -o "$dir/InRelease" "$dir/Release"
}

# ---------------------------------------------------------------- tailscale .deb
# Laid out as Tailscale's own package is (release/dist/unixpkgs): tailscaled in
# /usr/sbin, tailscale in /usr/bin, its systemd unit and /etc/default/tailscaled,
# the same Depends (iptables: dpkg configures it first, so the guard that the
# postinst's start of tailscaled pulls in finds it) and Recommends, and a
# postinst that enables and (re)starts tailscaled, as upstream's does.
build_tailscale_deb() {  # <version> <out dir>
    local version=$1 out=$2 root
    root=$(mktemp -d)
    install -D -m 0755 "$TS_BIN/tailscaled" "$root/usr/sbin/tailscaled"
    install -D -m 0755 "$TS_BIN/tailscale" "$root/usr/bin/tailscale"
    mkdir -p "$root/lib/systemd/system" "$root/etc/default" "$root/DEBIAN"
    cat >"$root/lib/systemd/system/tailscaled.service" <<'EOF'
[Unit]
Description=Tailscale node agent
Documentation=https://tailscale.com/kb/
Wants=network-pre.target
After=network-pre.target NetworkManager.service systemd-resolved.service

[Service]
EnvironmentFile=/etc/default/tailscaled
ExecStart=/usr/sbin/tailscaled --state=/var/lib/tailscale/tailscaled.state --socket=/run/tailscale/tailscaled.sock --port=${PORT} $FLAGS
ExecStopPost=/usr/sbin/tailscaled --cleanup
Restart=on-failure
RuntimeDirectory=tailscale
RuntimeDirectoryMode=0755
StateDirectory=tailscale
StateDirectoryMode=0700
CacheDirectory=tailscale
CacheDirectoryMode=0750
Type=notify

[Install]
WantedBy=multi-user.target
EOF
    cat >"$root/etc/default/tailscaled" <<'EOF'
# Set the port to listen on for incoming VPN packets.
PORT="41641"

# Extra flags you might want to pass to tailscaled.
FLAGS=""
EOF
    echo /etc/default/tailscaled >"$root/DEBIAN/conffiles"
    cat >"$root/DEBIAN/control" <<EOF
Package: tailscale
Version: $version
Section: net
Priority: extra
Architecture: amd64
Depends: iptables
Recommends: tailscale-archive-keyring (>= 1.35.181), iproute2
Replaces: tailscale-relay
Conflicts: tailscale-relay
Maintainer: tailscale-egress tests <test@tailscale-egress.invalid>
Description: The easiest, most secure way to use WireGuard and 2FA (test build of the pinned tailscaled)
EOF
    cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# As Tailscale's package: enable tailscaled and (re)start it.
if [ "$1" = configure ] || [ "$1" = abort-upgrade ]; then
	deb-systemd-helper unmask tailscaled.service >/dev/null || true
	if deb-systemd-helper --quiet was-enabled tailscaled.service; then
		deb-systemd-helper enable tailscaled.service >/dev/null || true
	else
		deb-systemd-helper update-state tailscaled.service >/dev/null || true
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		deb-systemd-invoke restart tailscaled.service >/dev/null || true
	fi
fi
EOF
    cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop tailscaled.service >/dev/null || true
fi
EOF
    chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm"
    mkdir -p "$out"
    dpkg-deb --root-owner-group -Zgzip --build "$root" "$out/tailscale_${version}_amd64.deb" >/dev/null
    rm -rf "$root"
}

# <www dir> <codename> <deb>...: Tailscale's layout, stable/debian <codename> main.
tailscale_repo() {
    local www=$1 codename=$2
    shift 2
    local top="$www/stable/debian" dist
    dist="$top/dists/$codename"
    mkdir -p "$top/pool" "$dist/main/binary-amd64"
    cp "$@" "$top/pool/"
    (cd "$top" && dpkg-scanpackages --multiversion pool /dev/null 2>/dev/null) >"$dist/main/binary-amd64/Packages"
    gzip -9nkf "$dist/main/binary-amd64/Packages"
    sign_release "$dist" Tailscale Tailscale "$codename" "$codename"
}

# ---------------------------------------------------------------- an image
# Bump when the disk's or the repositories' recipe changes (the stamps also
# cover the keys and, for the repositories, the pinned binaries).
DISK_RECIPE=3
REPO_RECIPE=4

stamp_of() { sha256sum | cut -c1-16; }

build_disk() {  # <image> <codename> <the image's own extra packages: DHCP client, ...>
    local image=$1 codename=$2 dhcp=$3 dir="$BOOT/$1" inputs
    inputs=$( (echo "$DISK_RECIPE $BASE_PACKAGES,$dhcp $DOC_PACKAGES"; cat "$BOOT/keys/signing-key.asc" "$BOOT/keys/ca.crt") \
        | stamp_of)
    if [ -f "$dir/disk.stamp" ] && [ "$(cat "$dir/disk.stamp")" = "$inputs" ]; then
        log "up to date: $dir/disk.raw"
        return 0
    fi
    log "building $image ($codename): root filesystem from $MIRROR_URL (a few minutes)"
    local work
    work=$(mktemp -d "$CACHE/boot-build.XXXXXX")
    if [ -z "$work" ] || [ ! -d "$work" ]; then die "mktemp failed"; fi
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" RETURN
    local rootfs="$work/rootfs" debs="$work/debs"
    mkdir -p "$debs"
    cat >"$work/agent.service" <<'EOF'
# Test image only: a root shell on a virtio serial port, how tests/boot
# drives the VM (Hetzner's images have none).
[Unit]
Description=tailscale-egress test agent
DefaultDependencies=no
After=local-fs.target
StartLimitIntervalSec=0

[Service]
ExecStartPre=/bin/sh -c 'until [ -e /dev/virtio-ports/tse.agent ]; do sleep 0.2; done'
# One open, read-write: a virtio port cannot be opened twice.
ExecStart=/bin/sh -c 'exec /bin/bash --noprofile --norc <>/dev/virtio-ports/tse.agent 1>&0 2>&0'
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
EOF
    cat >"$work/90-tse-test.cfg" <<'EOF'
# Test image: the seed is a NoCloud cidata ISO (Hetzner's images say [Hetzner, None]).
datasource_list: [ NoCloud, None ]
EOF
    # The mirror the VM uses is ours: signed with the test key, which the
    # image trusts for it (Debian's own keys stay as they are).
    gpg --homedir "$BOOT/keys/gnupg" --batch --export >"$work/tse-test-mirror.gpg"

    # The hooks' "$1" (the root) is mmdebstrap's, not ours.
    # shellcheck disable=SC2016
    # The download runs with Recommends, as cloud-init's apt-get install in the
    # VM does (mmdebstrap's own apt config turns them off).
    mmdebstrap --mode=root --variant=minbase --include="$BASE_PACKAGES,$dhcp" \
        --customize-hook="chroot \"\$1\" apt-get install --download-only -y -o APT::Install-Recommends=true $DOC_PACKAGES" \
        --customize-hook="cp \"\$1\"/var/cache/apt/archives/*.deb '$debs/'" \
        --customize-hook='chroot "$1" apt-get clean' \
        --customize-hook="install -m 0644 '$BOOT/keys/ca.crt' \"\$1\"/usr/local/share/ca-certificates/tse-boot-test-ca.crt" \
        --customize-hook='chroot "$1" update-ca-certificates' \
        --customize-hook="install -m 0644 '$work/tse-test-mirror.gpg' \"\$1\"/etc/apt/trusted.gpg.d/tse-test-mirror.gpg" \
        --customize-hook="install -m 0644 '$work/agent.service' \"\$1\"/etc/systemd/system/tse-test-agent.service" \
        --customize-hook='chroot "$1" systemctl enable tse-test-agent.service' \
        --customize-hook="install -m 0644 '$work/90-tse-test.cfg' \"\$1\"/etc/cloud/cloud.cfg.d/90-tse-test.cfg" \
        --customize-hook='echo "LABEL=root / ext4 defaults 0 1" >"$1"/etc/fstab' \
        --customize-hook='rm -f "$1"/etc/hostname' \
        --customize-hook='sed -i "s/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/" "$1"/etc/locale.gen' \
        --customize-hook='chroot "$1" locale-gen' \
        --customize-hook='chroot "$1" update-locale LANG=en_US.UTF-8' \
        "$codename" "$rootfs" "$MIRROR_URL"

    # The Debian mirror: only the pre-fetched packages, under Debian's layout.
    local mirror="$work/debian" main="$work/debian/dists/$codename/main/binary-amd64"
    mkdir -p "$mirror/pool/main" "$main"
    cp "$debs"/*.deb "$mirror/pool/main/"
    (cd "$mirror" && dpkg-scanpackages pool/main /dev/null 2>/dev/null) >"$main/Packages"
    gzip -9nkf "$main/Packages"
    sign_release "$mirror/dists/$codename" Debian Debian "$codename" "$codename"

    cp -L "$rootfs/vmlinuz" "$work/vmlinuz" 2>/dev/null || cp "$rootfs"/boot/vmlinuz-* "$work/vmlinuz"
    cp -L "$rootfs/initrd.img" "$work/initrd.img" 2>/dev/null || cp "$rootfs"/boot/initrd.img-* "$work/initrd.img"
    mkfs.ext4 -q -L root -d "$rootfs" "$work/disk.raw" 4G

    mkdir -p "$dir"
    rm -rf "$dir/debian" "$dir/disk.stamp"
    mv "$work/disk.raw" "$work/vmlinuz" "$work/initrd.img" "$mirror" "$dir/"
    echo "$codename" >"$dir/codename"
    echo "$inputs" >"$dir/disk.stamp"
    log "built $dir/disk.raw"
}

build_repos() {  # <image>
    local image=$1 dir="$BOOT/$1" inputs b codename
    codename=$(cat "$dir/codename")
    for b in tailscaled tailscale; do
        [ -x "$TS_BIN/$b" ] || die "$TS_BIN/$b missing: run scripts/build-datapath-bins.sh (make datapath-bins) first"
    done
    inputs=$( (echo "$REPO_RECIPE $TS_VERSION"; cat "$dir/disk.stamp" "$TS_BIN/tailscaled" "$TS_BIN/tailscale") | stamp_of)
    if [ -f "$dir/repos.stamp" ] && [ "$(cat "$dir/repos.stamp")" = "$inputs" ]; then
        log "up to date: $dir/www-1, $dir/www-2"
        return 0
    fi
    local work
    work=$(mktemp -d "$CACHE/boot-build.XXXXXX")
    if [ -z "$work" ] || [ ! -d "$work" ]; then die "mktemp failed"; fi
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" RETURN
    build_tailscale_deb "$TS_VERSION" "$work/ts"
    build_tailscale_deb "$TS_UPGRADE_VERSION" "$work/ts-upgrade"
    # www-1: what the first boot sees; www-2: the same with a newer tailscale.
    mkdir -p "$work/www-1" "$work/www-2"
    cp -a "$dir/debian" "$work/www-1/"
    cp -a "$dir/debian" "$work/www-2/"
    # The suites a Debian image's sources.list names besides the release
    # (cloud-init writes updates and security): served, empty, as on a day
    # with no updates; absent, apt-get update would fail.
    local www suite
    for www in "$work/www-1" "$work/www-2"; do
        for suite in "debian/dists/$codename-updates" "debian-security/dists/$codename-security"; do
            mkdir -p "$www/$suite/main/binary-amd64"
            : >"$www/$suite/main/binary-amd64/Packages"
            gzip -9nkf "$www/$suite/main/binary-amd64/Packages"
            sign_release "$www/$suite" Debian Debian "${suite##*/}" "${suite##*/}"
        done
    done
    tailscale_repo "$work/www-1" "$codename" "$work/ts/"*.deb
    tailscale_repo "$work/www-2" "$codename" "$work/ts/"*.deb "$work/ts-upgrade/"*.deb
    # Published an hour apart, as a real release is: apt asks with
    # If-Modified-Since (the Last-Modified of the lists it has), and
    # www-2's index signed within the same second as www-1's was answered
    # 304 Not Modified, so apt kept the old list and the upgrade found
    # nothing (seen on debian-13, whose two signatures fell in one second).
    local published
    published=$(stat -c %Y "$work/www-2/stable/debian/dists/$codename/InRelease")
    find "$work/www-1/stable/debian/dists" -type f -exec touch -d "@$((published - 3600))" {} +
    rm -rf "$dir/www-1" "$dir/www-2" "$dir/repos.stamp"
    mv "$work/www-1" "$work/www-2" "$dir/"
    echo "$TS_VERSION" >"$dir/tailscale-version"
    echo "$TS_UPGRADE_VERSION" >"$dir/tailscale-upgrade-version"
    echo "$inputs" >"$dir/repos.stamp"
    log "built $dir/www-1, $dir/www-2 (tailscale $TS_VERSION, $TS_UPGRADE_VERSION)"
}

keys
# gpg started an agent for the test key's home: stop it when done.
trap 'gpgconf --homedir "$BOOT/keys/gnupg" --kill gpg-agent 2>/dev/null || true' EXIT
# DISK_ONLY=1: the root filesystems and Debian mirrors only (no tailscale binaries needed).
images=("$@")
[ ${#images[@]} -gt 0 ] || images=(debian-12 debian-13)
for image in "${images[@]}"; do
    case "$image" in
        debian-12) build_disk debian-12 bookworm isc-dhcp-client ;;
        # trixie's minbase lacks e2fsprogs (no longer Priority: required);
        # Hetzner's image has it, and cloud-init's resizefs needs resize2fs.
        debian-13) build_disk debian-13 trixie dhcpcd-base,e2fsprogs ;;
        *) die "unknown image $image (debian-12, debian-13; Ubuntu's archive is not reachable here)" ;;
    esac
    [ -n "${DISK_ONLY:-}" ] || build_repos "$image"
done
