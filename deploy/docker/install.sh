#!/bin/sh
# Installs meshpush from a source tree into a fresh virtualenv: the only install step of the
# image (Dockerfile, build stage). tests/test_image.py runs this same script in a clean venv.
#
#   install.sh VENV_DIR SOURCE_DIR
#
# pip's usual environment applies (PIP_NO_CACHE_DIR, PIP_INDEX_URL, ...). Bytecode is compiled
# here, at build time, because the container runs with a read-only root filesystem. The
# `tracing` extra (OpenTelemetry SDK + OTLP exporters) is installed so OTEL_* variables can turn
# tracing on in the image (docs/operations.md, "Tracing"); it is not imported while tracing is off.
set -eu

venv="${1:?usage: install.sh VENV_DIR SOURCE_DIR}"
src="${2:?usage: install.sh VENV_DIR SOURCE_DIR}"

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input --compile "$src[tracing]"
"$venv/bin/python" -m compileall -q "$venv/lib"
"$venv/bin/meshpush" --version
