# The vitadapter image: the project installed (not editable) with the locked dependency set of
# deploy/image/requirements.lock, a non-root user (uid 1000), `vitadapter` as the entry point, and
# /opt/vitadapter/artifacts as a volume. No dataset and no weights are inside: they live in artifacts/
# (a persistent volume on Kubernetes, deploy/kubernetes/). Buildable by docker, podman and buildah:
#
#   docker build -t vitadapter:0.1.0 .
#   docker run --rm -v "$PWD/artifacts:/opt/vitadapter/artifacts" vitadapter:0.1.0 configs list
#
# Where no image registry can be reached, tools/build_image.py (`make image`) makes a Debian bookworm
# base with debootstrap, builds this file on it with buildah and runs a smoke test inside the image.
#
# Build arguments:
#   BASE    any image with python3.11 on PATH (default the official slim image). No CUDA base is needed:
#           torch==2.13.0 from PyPI carries its CUDA libraries (the lock pins them).
#   EXTRAS  a folder of the build context (default deploy/image/build-extras/, empty) for the build stage
#           only: its wheels pip takes before PyPI's (--find-links), e.g. a CPU build of torch 2.13.0 for
#           a CPU-only image; its ca-bundle.crt, when present, is what pip trusts (a TLS-inspecting
#           proxy). The final image holds what was installed, not these files.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG EXTRAS=deploy/image/build-extras
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_CONFIG_FILE=/tmp/extras/pip.conf
COPY deploy/image/requirements.lock deploy/image/check_lock.py /tmp/lock/
COPY ${EXTRAS}/ /tmp/extras/
# the build backend first, at the lock's versions (the project's wheel is built without isolation, so
# nothing unpinned enters the build either)
RUN printf '[global]\nfind-links = /tmp/extras\n' > /tmp/extras/pip.conf \
    && if [ -f /tmp/extras/ca-bundle.crt ]; then printf 'cert = /tmp/extras/ca-bundle.crt\n' >> /tmp/extras/pip.conf; fi \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q -c /tmp/lock/requirements.lock setuptools wheel
COPY pyproject.toml README.md /src/
COPY models /src/models
COPY data /src/data
COPY pipelines /src/pipelines
COPY cuda_ops /src/cuda_ops
# the lock is a constraints file: every package that gets installed is pinned by it (CUDA torch pulls
# the nvidia-* packages it pins; a CPU torch from EXTRAS pulls none), and check_lock.py fails the build
# when an installed distribution is missing from it or has another version
RUN /opt/venv/bin/pip wheel -q --no-deps --no-build-isolation --wheel-dir /tmp/dist /src \
    && /opt/venv/bin/pip install -q -c /tmp/lock/requirements.lock \
        "$(ls /tmp/dist/vitadapter-*.whl)[k8s]" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python /tmp/lock/check_lock.py /tmp/lock/requirements.lock

FROM ${BASE}
LABEL org.opencontainers.image.title="vitadapter" \
      org.opencontainers.image.description="ViT-Adapter semantic segmentation as a DVC + Prefect + MLflow pipeline" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 1000 --user-group --create-home --shell /bin/sh vitadapter \
    && mkdir -p /opt/vitadapter/artifacts /opt/vitadapter/metrics /home/vitadapter/.prefect \
    && chown -R 1000:1000 /opt/vitadapter /home/vitadapter
COPY --from=build /opt/venv /opt/venv
# the pipeline's working folder: params.yaml here, its outputs under artifacts/ and metrics/
WORKDIR /opt/vitadapter
COPY --chown=1000:1000 params.yaml /opt/vitadapter/params.yaml
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/vitadapter \
    PREFECT_HOME=/home/vitadapter/.prefect \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1
# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 1000:1000
VOLUME ["/opt/vitadapter/artifacts"]
ENTRYPOINT ["vitadapter"]
CMD ["--help"]
