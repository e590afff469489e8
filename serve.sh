#!/usr/bin/env bash
# Install what the server needs (once) and start it: ./serve.sh [--host H] [--port P]
# Settings come from TRAINING_SERVER_* environment variables or a .env file (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-requirements
if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    cp requirements.txt "$stamp"
fi
# Ray (requirements-ray.txt) only when the stages run on a Ray cluster (TRAINING_SERVER_EXECUTOR=ray,
# from the environment or .env).
executor=${TRAINING_SERVER_EXECUTOR:-}
if [ -z "$executor" ] && [ -f .env ]; then
    executor=$(sed -n 's/^TRAINING_SERVER_EXECUTOR=//p' .env | tail -n 1)
fi
if [ "$(echo "$executor" | tr -d "\"' ")" = ray ] && ! cmp -s requirements-ray.txt .venv/.installed-ray; then
    .venv/bin/python -m pip install --quiet -r requirements-ray.txt
    cp requirements-ray.txt .venv/.installed-ray
fi
# The in-page 3D viewers (three.js, Spark) come from npm; the page works without them.
if [ -f package-lock.json ] && command -v npm >/dev/null 2>&1; then
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
        npm ci --no-audit --no-fund --loglevel=error || echo "npm ci failed: the page's 3D viewers will be missing" >&2
    fi
fi
# Training: on a machine with an NVIDIA GPU the first start installs gaussian-splatting-lightning,
# its CUDA extensions and PyTorch into third_party/ (later starts skip what is done; README.md,
# "Training on a GPU"). TRAINING_SERVER_INSTALL_TRAINER=never skips this, and an explicit
# TRAINING_SERVER_TRAINER_PATH wins. A failed install does not stop the server: /health says why.
if ! .venv/bin/python training_server_install.py --root third_party; then
    echo "serve.sh: the trainer is not installed; starting without training (see /health)" >&2
fi
eval "$(.venv/bin/python training_server_install.py --root third_party --exports)"
exec .venv/bin/python training_server.py "$@"
