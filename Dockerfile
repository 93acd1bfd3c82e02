# meshpush node image. Build and push (docs/operations.md, "The image"):
#   docker build -t registry.example.com/meshpush:0.1.0 .
#   docker push registry.example.com/meshpush:0.1.0
# The container runs `meshpush node` as uid 10001 and works with a read-only root filesystem
# (all bytecode is compiled at build time; nothing is written outside /tmp).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build stage: a virtualenv with meshpush and its dependencies (wheels only) ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshpush ./meshpush
COPY chaos ./chaos
COPY deploy/docker/install.sh /usr/local/bin/meshpush-install
RUN ["/bin/sh", "/usr/local/bin/meshpush-install", "/opt/meshpush", "/src"]

# --- final stage: the slim base, the virtualenv, a non-root user; no compilers, no pip cache --
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 meshpush \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin meshpush
COPY --from=build /opt/meshpush /opt/meshpush
ENV PATH=/opt/meshpush/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MESHPUSH_WS_HOST=0.0.0.0 \
    MESHPUSH_HTTP_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 8800 8900
ENTRYPOINT ["meshpush"]
CMD ["node"]
