#!/usr/bin/env bash
# Build the local base images from a debootstrap rootfs (no registry needed):
#   finetune-local/debian-base:bookworm  minbase Debian
#   finetune-local/python-base:bookworm  + python3 (3.11), python3-venv, ca-certificates
#                                         (stands in for python:3.11-slim)
# Rootfs tarballs are cached under $FINETUNE_CACHE/rootfs/<suite>/. Idempotent.
source "$(dirname "$0")/common.sh"

BASE_PKGS=ca-certificates,procps,iproute2,netbase
PY_PKGS=$BASE_PKGS,python3,python3-venv,python3-pip

base_tar=$(debootstrap_rootfs debian-base "$BASE_PKGS")
import_rootfs "$base_tar" "$BASE_IMAGE" --change 'CMD ["/bin/bash"]'

py_tar=$(debootstrap_rootfs python-base "$PY_PKGS")
import_rootfs "$py_tar" "$PYTHON_IMAGE" \
  --change 'ENV LANG=C.UTF-8' --change 'ENV PYTHONUNBUFFERED=1' --change 'CMD ["python3"]'

$DOCKER run --rm "$PYTHON_IMAGE" python3 -c 'import sys, venv, ssl; print("python", sys.version.split()[0])'
