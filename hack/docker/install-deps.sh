#!/bin/sh
# Runs inside the Dockerfile's *-deps stages: install pyproject.toml's pinned dependencies plus
# one extra into /opt/venv, then make that venv final.
#
#   install-deps.sh operator|trainer
#
# TORCH_INDEX_URL (build arg): when set and torch is required, the pinned torch comes from that
# index first (it mirrors torch's own dependencies); the PyPI install then finds e.g. 2.x.y+cpu
# already satisfying torch==2.x.y.
set -eu
extra="$1"
python3 - "$extra" >/tmp/requirements.txt <<'PY'
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"][sys.argv[1]]))
PY
torch_pin=$(grep -E '^torch([=<>~! ]|$)' /tmp/requirements.txt || :)
if [ -n "${TORCH_INDEX_URL:-}" ] && [ -n "$torch_pin" ]; then
  pip install --index-url "$TORCH_INDEX_URL" "$torch_pin"
fi
pip install -r /tmp/requirements.txt
# Nothing installs at run time, and the CA bundle's pip.conf must not reach an image. The
# trainer keeps setuptools: torch.compile on CPU (training.compile) builds its C++ kernels
# through torch.utils.cpp_extension, which imports it.
if [ "$extra" = trainer ]; then
  pip uninstall -y -q pip
else
  pip uninstall -y -q pip setuptools
fi
rm -f /opt/venv/pip.conf /tmp/requirements.txt
# Unchecked-hash pycs stay valid whatever mtimes the COPY into the image gives. Failures are
# tolerated: wheels ship files for newer Pythons (e.g. torch's
# testing/_internal/py312_intrinsics.py), never importable on 3.11 anyway.
python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv/lib >/dev/null || :
