# splitserve image: one file for the CPU image and a CUDA image.
#
# CPU image (the default; PyTorch's CPU wheel index, nixl's CUDA 13 build
# only, the built-in tiny model at /models/tiny):
#   docker build -t splitserve:0.1.0 .
# CUDA 12 image (torch's CUDA wheel, nixl's CUDA 12 build, the Triton kernels;
# pick the cuXYZ index that matches the base image's CUDA):
#   docker build -t splitserve:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" \
#     --build-arg NIXL_DROP=nixl-cu13 --build-arg EXTRAS=triton --build-arg TINY_MODEL=0 .
# Without a registry (this project's machines): `make image` (scripts/image/build.sh)
# imports a debootstrap base and passes the local torch wheel and the host CA.
#
# Stages: base (Python + venv) -> requirements (the lists from pyproject.toml)
# -> deps (torch + those dependencies; cached until the lists change) ->
# build (gcc, the wheel, the C kernels for every portable ISA level) and
# runtime (FROM deps: the wheel installed --no-deps, the prebuilt kernels,
# the tiny model). A source edit rebuilds only build and the last runtime
# layers. The runtime has no compiler: a read-only root fs needs none (nor a
# writable cache) at start.
# It needs a writable /tmp (torch, `splitserve up`'s logs) and /dev/shm (UCX).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# A folder of local wheels (e.g. torch's): empty unless the build passes
# --build-context wheels=DIR and TORCH_PIP_ARGS="--find-links /wheels".
FROM scratch AS wheels

FROM ${BASE_IMAGE} AS base
# Python 3.11+ (tomllib) with venv; a bare Debian/Ubuntu base gets it from apt.
RUN if ! python3 -c "import ensurepip, tomllib, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    LANG=C.UTF-8

# The requirement lists alone: the deps layer below is cached on their
# content, so other edits of pyproject.toml (tool settings) do not reinstall.
FROM base AS requirements
# Optional dependency groups of pyproject.toml, comma-separated (e.g. triton).
ARG EXTRAS=
COPY pyproject.toml scripts/image/requirements.py /opt/deps/
RUN python3 /opt/deps/requirements.py runtime "$EXTRAS" > /opt/deps/runtime.txt \
    && python3 /opt/deps/requirements.py build > /opt/deps/build.txt

FROM base AS deps
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# A CA bundle for pip (a TLS-intercepting proxy), mounted into the build: empty = pip's own.
ARG PIP_CERT=
# nixl pulls its CUDA 12 and CUDA 13 builds; keep the one the image uses
# (without CUDA nixl loads the CUDA 13 one): ~250 MB saved.
ARG NIXL_DROP=nixl-cu12
COPY --from=requirements /opt/deps/runtime.txt /opt/deps/
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && python3 -m venv /opt/venv \
    && pip install $TORCH_PIP_ARGS "$TORCH_SPEC" \
    && pip install -r /opt/deps/runtime.txt "$TORCH_SPEC" \
    && if [ -n "$NIXL_DROP" ]; then pip uninstall -y $NIXL_DROP; fi

FROM deps AS build
ARG PIP_CERT=
RUN if ! command -v cc >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=requirements /opt/deps/build.txt /opt/deps/
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && pip install -r /opt/deps/build.txt
COPY . /src
# The wheel (its build generates the gRPC stubs), then the kernels from the
# installed package: the same sources the runtime hashes to find them.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src \
    && pip install --no-deps /dist/splitserve-*.whl \
    && splitserve kernels build --portable --cache-dir /opt/splitserve-cache \
    && chmod -R a+rX /opt/splitserve-cache

FROM deps AS runtime
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG VERSION=0.1.0
ARG REVISION=unknown
# 1 = write the built-in tiny model to /models/tiny (the CPU image's default).
ARG TINY_MODEL=1
ENV SPLITSERVE_CACHE_DIR=/opt/splitserve-cache \
    HOME=/home/splitserve
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-deps /dist/splitserve-*.whl
COPY --from=build /opt/splitserve-cache /opt/splitserve-cache
RUN if [ "$TINY_MODEL" = 1 ]; then splitserve model tiny --out /models/tiny; fi \
    && if ! getent passwd 1000 >/dev/null; then \
           useradd --uid 1000 --user-group --home-dir /home/splitserve --no-create-home \
                   --shell /usr/sbin/nologin splitserve; \
       fi \
    && mkdir -p /home/splitserve \
    && chown 1000:1000 /home/splitserve
USER 1000
WORKDIR /home/splitserve
EXPOSE 8000 8081 50051
ENTRYPOINT ["splitserve"]
CMD ["--help"]
LABEL org.opencontainers.image.title="splitserve" \
      org.opencontainers.image.description="Disaggregated prefill/decode LLM serving: engine pods (prefill, decode, unified) and the OpenAI router" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
