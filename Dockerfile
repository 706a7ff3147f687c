# Three images from one tree:
#
#   docker build --target operator   -t finetune-operator:0.1.0   .  # kopf operator, no torch
#   docker build --target trainer    -t finetune-trainer:0.1.0    .  # torch/transformers/peft
#   docker build --target hub-double -t finetune-hub-double:0.1.0 .  # Hub-API test double (tests)
#
# (hack/images.sh builds them.) Build args:
#   BASE_IMAGE       any Debian-like image with python3 (3.11+) and the venv module.
#                    Default: the official python:3.11-slim. Where no registry is reachable, use
#                    the debootstrap base from hack/kind/build-base-image.sh:
#                    --build-arg BASE_IMAGE=finetune-local/python-base:bookworm
#   TORCH_INDEX_URL  empty (default): torch comes from PyPI, whose Linux wheels pull in the CUDA
#                    libraries (a 7.3 GB trainer image). For CPU-only clusters pass
#                    https://download.pytorch.org/whl/cpu: its torch wheel is ~200 MB with no
#                    CUDA libraries. That index must be reachable from the build; in this
#                    project's sandbox only PyPI is, so the images built here carry CUDA.
#   EXTRA_CA_CERTS   PEM text of extra CA certificates that pip must trust (a TLS-intercepting
#                    proxy); used by the build stages only.
#   VERSION, VCS_REF, BUILD_DATE   go into the org.opencontainers.image.* labels.
#
# All images run as UID/GID 1000 with a read-only root filesystem: nothing writes outside
# /tmp (an emptyDir in the pod), and all bytecode is compiled here, at build time.
#
# No "# syntax=" line and no BuildKit-only features (RUN --mount, COPY --link): the legacy
# builder must work too, and a syntax line would make BuildKit pull a frontend image from a
# registry. The legacy builder builds every stage above the target, so the trainer's dependency
# stage comes last and `--target operator` or `--target hub-double` never touches torch.

ARG BASE_IMAGE=python:3.11-slim

# ---- build base: an empty venv and pyproject.toml ------------------------------------------------
FROM ${BASE_IMAGE} AS build-base
# The base may not declare PATH (an imported rootfs does not), so spell it out in full.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Extra CA certificates (PEM) for a TLS-intercepting proxy between the build and PyPI. Only
# build stages see them; the final images do not inherit this stage.
# pip reads /opt/venv/pip.conf; it is deleted again before the venv leaves the build stage.
ARG EXTRA_CA_CERTS=""
# Debian's python3 has no pip on PATH; the venv brings its own.
RUN python3 -m venv /opt/venv \
 && if [ -n "${EXTRA_CA_CERTS}" ]; then \
      cat /etc/ssl/certs/ca-certificates.crt >/opt/ca-bundle.pem 2>/dev/null || :; \
      printf '%s\n' "${EXTRA_CA_CERTS}" >>/opt/ca-bundle.pem; \
      printf '[global]\ncert = /opt/ca-bundle.pem\n' >/opt/venv/pip.conf; \
    fi
WORKDIR /src
# Only pyproject.toml and the installer first: the dependency layers stay cached until they change.
COPY pyproject.toml ./
COPY hack/docker/install-deps.sh /usr/local/bin/

# ---- dependencies: one venv per image, cached until pyproject.toml changes ----------------------
# install-deps.sh installs the pinned requirements plus one extra, then drops the installers
# (nothing installs at run time) and compiles everything.
FROM build-base AS operator-deps
RUN install-deps.sh operator

# ---- our code: one small layer per product image ------------------------------------------------
# Installed under its own prefix and merged into /opt/venv by the image's last COPY, so a code
# change rebuilds a layer of a few hundred KB, never the multi-GB dependency layer beneath it.
# Each image installs only the packages it runs (pyproject.toml's packages.find skips the
# folders a stage leaves out), so an operator-only change neither rebuilds the trainer image
# nor sends its ~7 GB to kind again, and a trainer or CLI change leaves the operator image be.
# The pycs are unchecked-hash (valid whatever mtimes the COPY gives) and name their installed
# paths in tracebacks (-s/-p).
FROM build-base AS app-base
# pyproject.toml names README.md as the package's long description, which nothing in an image
# reads: a stub stands in, so README.md stays out of the build context and a docs edit neither
# rebuilds the images nor sends the multi-GB trainer image to kind again.
RUN echo "finetune-operator" >README.md

# The operator: the contract package and the operator's own. The project's `finetune` script
# would point at the CLI, which this image does not carry.
FROM app-base AS operator-app
COPY api ./api
COPY operator ./operator
RUN pip install --no-deps --prefix /opt/app . \
 && rm /opt/app/bin/finetune \
 && python -m compileall -q -f --invalidation-mode unchecked-hash -s /opt/app -p /opt/venv /opt/app/lib

# ---- runtime base: the non-root, read-only-friendly environment ----------------------------------
FROM ${BASE_IMAGE} AS runtime
# A passwd entry for UID 1000: getpass.getuser() (torch caches, some HF code) fails without one.
# The home is /tmp, the only writable place.
# The official python image strips the standard library's .pyc files; with a read-only root
# they could never be written, so every start would recompile. Compile them once here
# (test data with deliberately broken syntax excluded).
RUN groupadd --gid 1000 finetune \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin finetune \
 && python3 -m compileall -q -j 0 -x '/(test|tests|lib2to3|idlelib)/' \
      "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/hf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.source="https://github.com/finetune-operator/finetune-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="finetune-operator"
WORKDIR /tmp
USER 1000:1000

# ---- operator image ------------------------------------------------------------------------------
FROM runtime AS operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="kopf operator reconciling FineTuneJob (finetune.dev/v1alpha1) into Indexed Jobs"
# Root-owned and so read-only for UID 1000, even without readOnlyRootFilesystem.
COPY --from=operator-deps /opt/venv /opt/venv
COPY --from=operator-app /opt/app /opt/venv
# 8000: Prometheus /metrics; 8080: kopf liveness /healthz.
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "finetune_operator"]
# Per-build labels last, so a new BUILD_DATE or VCS_REF only rebuilds this layer.
ARG VERSION=0.1.0
ARG VCS_REF=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}"

# ---- Hub-API test double -------------------------------------------------------------------------
# The in-cluster Hugging Face Hub double of the kind e2e (tests/kind/manifests/hub.yaml). A
# distribution of its own (hub-double/, standard library only): none of our product code, no
# torch, no dependencies. Installed into the build stage's venv, whose installers then go as in
# install-deps.sh; its code changes rebuild only these few-KB layers. Above trainer-deps, so
# `--target hub-double` builds no torch either.
FROM build-base AS hub-double-build
COPY hub-double ./hub-double
RUN pip install --no-deps ./hub-double \
 && pip uninstall -y -q pip setuptools \
 && rm -f /opt/venv/pip.conf \
 && python -m compileall -q -f --invalidation-mode unchecked-hash /opt/venv/lib

FROM runtime AS hub-double
LABEL org.opencontainers.image.title="finetune-hub-double" \
      org.opencontainers.image.description="Hugging Face Hub-API test double for finetune-operator's end-to-end tests (not a Hub)"
COPY --from=hub-double-build /opt/venv /opt/venv
EXPOSE 8080
ENTRYPOINT ["python", "-m", "finetune_hub_double"]
CMD ["--help"]
# Per-build labels last, so a new BUILD_DATE or VCS_REF only rebuilds this layer.
ARG VERSION=0.1.0
ARG VCS_REF=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}"

# ---- trainer dependencies ------------------------------------------------------------------------
# Last, so that the legacy builder (which builds every stage above the target) never installs
# torch for `--target operator` or `--target hub-double`.
FROM build-base AS trainer-deps
ARG TORCH_INDEX_URL=""
RUN install-deps.sh trainer

# The trainer: the contract package, the trainer's own and the CLI, since its pods run
# `finetune train` (and `finetune serve-prepare`). Down here, since the legacy builder builds every
# stage above its target: an operator build does not build this one.
FROM app-base AS trainer-app
COPY api ./api
COPY trainer ./trainer
COPY cli ./cli
RUN pip install --no-deps --prefix /opt/app . \
 && python -m compileall -q -f --invalidation-mode unchecked-hash -s /opt/app -p /opt/venv /opt/app/lib

# ---- trainer image -------------------------------------------------------------------------------
FROM runtime AS trainer
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="LoRA/QLoRA fine-tuning worker (PyTorch, Accelerate, PEFT) started by finetune-operator"
# training.compile: torch.compile builds Triton's GPU launcher (C) and, on CPU, inductor's kernels
# (C++, through setuptools, which install-deps.sh leaves in this venv) with the system compiler
# when a pod starts, against Python's headers. tcmalloc: CPU jobs' pods preload it
# (finetune_api.pod.CPU_ALLOCATOR). Before the venv, so that a new venv does not reinstall them.
USER 0:0
RUN set -e; pkgs="gcc g++ libc6-dev libtcmalloc-minimal4"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || pkgs="$pkgs python3-dev"; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; \
    rm -rf /var/lib/apt/lists/*
USER 1000:1000
COPY --from=trainer-deps /opt/venv /opt/venv
COPY --from=trainer-app /opt/app /opt/venv
# 9400: trainer Prometheus metrics; 29500: torch.distributed rendezvous (MASTER_PORT).
EXPOSE 9400 29500
# The operator's pods run `finetune train /etc/finetune/job.yaml`.
ENTRYPOINT ["finetune"]
CMD ["--help"]
# Per-build labels last, so a new BUILD_DATE or VCS_REF only rebuilds this layer.
ARG VERSION=0.1.0
ARG VCS_REF=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}"
