#!/usr/bin/env bash
# System packages the test suites need on a fresh Debian machine. Idempotent and quick when warm.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
# tcmalloc, which `finetune train` preloads for CPU jobs where it is installed (as in the trainer
# image); the trainer suite checks that its ranks run on it.
compgen -G '/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4' >/dev/null || need+=(libtcmalloc-minimal4)
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
