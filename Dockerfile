# syntax=docker/dockerfile:1
# One image for the control plane and every Ray node: Ray needs the same Python and packages on
# all of them. Built on Ray's official image; CPU by default.
#   docker build -t ghcr.io/raysft/raysft:0.1.0-cpu .
#   docker build -t ghcr.io/raysft/raysft:0.1.0-gpu --build-arg RAY_VARIANT=py311-cu128 --build-arg EXTRAS=gpu,wandb .
# (the Helm chart runs `<appVersion>-gpu` by default, `-cpu` with image.flavor=cpu)
# Where no registry can be reached, `make image` bootstraps a Debian base (Python 3.11 and its
# headers) with mmdebstrap and builds this same file on it with podman: --build-arg BASE=...
# GPU images: the cu* base brings CUDA; torch==2.13.0 from PyPI is the CUDA build there. For
# flash_attention_2, add flash-attn to the build stage (it compiles against the CUDA toolkit, or
# install its prebuilt wheel matching torch and CUDA).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=py311-cpu
ARG BASE=rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}

FROM ${BASE} AS build
# Every extra the jobs use is in the image: experiment tracking (wandb) by default, `gpu,wandb` for GPU images.
ARG EXTRAS="wandb"
# Where pip finds packages, handed over by the builder (a local wheel house, a mirror, its CA
# bundle): only for this stage's installs, never kept in the image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ninja-build \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
# The README's and CI's install commands, into a virtualenv the final stage copies: first every
# dependency, from the project's metadata alone (its packages empty for now), so that a change to
# the sources rebuilds only the layer after this one. DeepSpeed's CPU shared-memory op is compiled
# here, ahead of time, so nothing compiles at run time.
RUN mkdir jobs service && touch jobs/__init__.py service/__init__.py \
 && python3 -m venv /opt/raysft \
 && /opt/raysft/bin/pip install --no-cache-dir -U pip setuptools wheel \
 && /opt/raysft/bin/pip install --no-cache-dir torch==2.13.0 \
 && DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 /opt/raysft/bin/pip install --no-cache-dir \
      --no-build-isolation -c requirements/constraints.txt ".${EXTRAS:+[$EXTRAS]}"
COPY jobs/ jobs/
COPY service/ service/
RUN /opt/raysft/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
 && find /opt/raysft -name "__pycache__" -prune -exec rm -rf {} +

FROM ${BASE}
ARG RAY_VERSION
LABEL org.opencontainers.image.title="raysft" \
      org.opencontainers.image.description="Supervised fine-tuning jobs on Ray: control plane and Ray nodes" \
      org.opencontainers.image.source="https://github.com/raysft/raysft" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="rayproject/ray:${RAY_VERSION}"
# Ray's image has its user `ray` (uid 1000, group users); a bare base gets the same one.
USER root
RUN id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
COPY --from=build --chown=1000:100 /opt/raysft /opt/raysft
COPY --chown=1000:100 configs/ /opt/raysft/configs/
ENV PATH=/opt/raysft/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    RAYSFT_DATA_DIR=/tmp/raysft \
    RAY_AUTH_MODE=token
# Never root.
USER 1000:100
WORKDIR /home/ray
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["raysft", "serve", "--host", "0.0.0.0", "--port", "8000"]
