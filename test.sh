#!/usr/bin/env bash
# Install what the tests need (once) and run them: ./test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-dev
if [ ! -f "$stamp" ] || ! cat requirements.txt requirements-dev.txt | cmp -s - "$stamp"; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt
    cat requirements.txt requirements-dev.txt > "$stamp"
fi
cmp -s requirements-ray.txt .venv/.installed-ray || { .venv/bin/python -m pip install --quiet -r requirements-ray.txt && cp requirements-ray.txt .venv/.installed-ray; }  # the Ray executor's tests
if [ -f package-lock.json ]; then
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
        npm ci --no-audit --no-fund --loglevel=error
    fi
fi
# The browser tests drive Debian's Chromium (Playwright cannot download its own browser here).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is not installed: install Debian's chromium package (apt-get install chromium)" >&2
        exit 1
    fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
node --test tests/js/
exec .venv/bin/python -m pytest "$@"
