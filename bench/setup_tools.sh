#!/usr/bin/env bash
# Install the external tools bench/bench_tunnel.py compares pytunnel with (Debian/Ubuntu, as
# root or with sudo). The benchmark's own setup step: CI does not run it or need it.
#
#   sshd + ssh   the ssh -L reference (a private sshd on 127.0.0.1, never the system one)
#   iperf3       bulk throughput          wrk    HTTP requests/s and latency
#   nginx        the HTTP target          socat  a plain userspace TCP relay, for reference
#   haproxy      an event-driven TCP proxy in C (one process), for reference
#
# The Python tunnels it also runs (pproxy, asyncssh) are not Debian packages here: they come
# with the project's bench extra, `pip install -e '.[bench]'`.
#
# Installing openssh-server or nginx on Debian may start their system services; the benchmark
# does not use them (it runs its own instances on free loopback ports), so they are stopped
# again here unless KEEP_SERVICES=1.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
PACKAGES=(openssh-server openssh-client iperf3 wrk nginx socat haproxy procps)

# iperf3's postinst asks whether to start a daemon; answer no.
echo "iperf3 iperf3/start_daemon boolean false" | $SUDO debconf-set-selections 2>/dev/null || true

$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"

if [ "${KEEP_SERVICES:-0}" != "1" ]; then
    for svc in ssh nginx iperf3 haproxy; do
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
            $SUDO systemctl stop "$svc" || true
        elif command -v service >/dev/null 2>&1; then
            $SUDO service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
fi

# sshd refuses to start without its privilege-separation directory.
$SUDO mkdir -p /run/sshd
$SUDO chmod 0755 /run/sshd

echo "installed:"
for tool in sshd ssh iperf3 wrk nginx socat haproxy; do
    path=$(command -v "$tool" || true)
    if [ -z "$path" ] && [ -x "/usr/sbin/$tool" ]; then
        path="/usr/sbin/$tool"
    fi
    printf '  %-7s %s\n' "$tool" "${path:-MISSING}"
done
