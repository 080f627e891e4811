#!/usr/bin/env bash
# End-to-end tests: real `ferrum serve` processes driven by the official `openai` Python SDK and
# raw HTTP (tests/e2e). Extra arguments go to pytest (e.g. `scripts/e2e.sh -k streaming -x`).
#
# The binary is $FERRUM_BIN when set (used as it is), else target/debug/ferrum, built here first
# (`cargo build -p ferrum`, quick when up to date). The tests find the gpt-4.1-nano weights with
# `ferrum pull gpt-4.1-nano` (or $FERRUM_NANO_WEIGHTS). Python packages live in target/e2e-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/e2e-venv
requirements=tests/e2e/requirements.txt
stamp=$venv/.requirements.installed

if [[ ! -x $venv/bin/python ]]; then
    if ! python3 -m venv "$venv"; then
        # Debian ships venv (and its pip) in a separate package.
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            echo "installing python3-venv (Debian) for the end-to-end tests"
            rm -rf "$venv"
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -q python3-venv >/dev/null ||
                { apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; }
            python3 -m venv "$venv"
        else
            echo "python3 -m venv failed: install Python's venv module (Debian: python3-venv)" >&2
            exit 1
        fi
    fi
fi
# The console's tests drive a real browser: Debian's chromium (installed here when missing and
# running as root; elsewhere set CHROMIUM or install it).
if [[ -z ${CHROMIUM:-} ]] && ! command -v chromium >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing chromium (Debian) for the console's browser tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    else
        echo "chromium not found: install it (Debian: apt-get install chromium) or set CHROMIUM" >&2
        exit 1
    fi
fi
# Install only when the requirements changed since the last successful install.
if ! cmp -s "$requirements" "$stamp"; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi

if [[ -z ${FERRUM_BIN:-} ]]; then
    cargo build -p ferrum
    FERRUM_BIN=$PWD/target/debug/ferrum
fi
export FERRUM_BIN

exec "$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider "$@"
