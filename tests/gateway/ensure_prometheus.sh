#!/bin/sh
# Make a `prometheus` binary available for tests/gateway/test_prometheus.py.
# Installs the Debian package when none is on PATH (needs root or sudo); idempotent.
set -eu
if command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_prometheus: no apt-get here; install Prometheus by hand to run its test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "ensure_prometheus: not root and no sudo; the Prometheus test will be skipped" >&2
        exit 0
    fi
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus
