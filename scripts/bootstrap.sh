#!/usr/bin/env bash
# Install what hpb-node needs on a fresh Debian 12 machine. Idempotent.
#   scripts/bootstrap.sh            Python venv (.venv) with the node installed
#   scripts/bootstrap.sh --test     plus Debian packages and npm modules the tests use
set -euo pipefail
cd "$(dirname "$0")/.."

WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

# Debian packages: real peers for the tests (Orthanc as PACS, DCMTK, dicom3tools,
# Chromium for web pages, Node.js for dcmjs/OHIF checks).
DEB_TEST=(orthanc orthanc-dicomweb orthanc-python orthanc-gdcm orthanc-postgresql
          dcmtk dicom3tools chromium chromium-driver fonts-dejavu-core)

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "[bootstrap] apt-get install ${missing[*]}"
        local SUDO=""
        [[ $(id -u) -ne 0 ]] && SUDO="sudo"
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

if ((WANT_TEST)); then
    apt_install "${DEB_TEST[@]}"
    # Debian's orthanc package starts a system service on 4242/8042; the tests
    # start their own Orthanc on free ports, so keep the packaged one out of the way.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
        systemctl stop orthanc || true
    fi
    pkill -x Orthanc 2>/dev/null || true
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "[bootstrap] creating .venv"
    "$PY" -m venv .venv
fi
# torch is pinned to the CPU wheel for tests and the demo (constraints/test.txt);
# users installing the package themselves choose their own torch build.
STAMP=.venv/.hpb-installed
HASH=$(cat pyproject.toml constraints/test.txt | sha256sum | cut -c1-16)-$WANT_TEST
if [[ ! -f $STAMP || "$(cat $STAMP)" != "$HASH" ]]; then
    .venv/bin/pip install -q -U pip wheel
    if ((WANT_TEST)); then
        .venv/bin/pip install -q -c constraints/test.txt -e '.[test]'
    else
        .venv/bin/pip install -q -c constraints/test.txt -e .
    fi
    echo "$HASH" > $STAMP
fi

if ((WANT_TEST)) && [[ -f tests/js/package.json ]]; then
    if [[ ! -d tests/js/node_modules ]]; then
        echo "[bootstrap] npm ci in tests/js"
        (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
    fi
fi
if ((WANT_TEST)) && [[ -f tests/ohif/package.json && ! -d tests/ohif/node_modules ]]; then (cd tests/ohif && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error); fi
echo "[bootstrap] ready"
