# One image for every role of promptbatch; the role is the command:
#   promptbatch migrate | api --host 0.0.0.0 | scheduler | worker -c N | flower ...
# Debian bookworm's slim image, Debian's own Python 3.11, and the project's wheel with its
# dependencies (PyPI's binary wheels: nothing is compiled) in a virtual environment.
# scripts/build-image.sh builds it with docker, or with buildah FROM a base it makes from
# Debian's packages where no image registry answers (BASE names that base).
ARG BASE=debian:bookworm-slim

# --- python: Debian's Python and the few packages every stage needs -------------------
FROM ${BASE} AS python
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# --- build: /opt/promptbatch, a virtual environment holding the wheel and what it needs --
FROM python AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3-venv binutils \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/promptbatch
WORKDIR /src
# The dependencies first (a layer Docker reuses while pyproject.toml does not change). A
# build secret pip_cert, if given, is the CA bundle pip trusts (a proxy's own CA).
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["postgres"]))' > requirements.txt \
    && /opt/promptbatch/bin/pip install --only-binary=:all: -r requirements.txt
COPY README.md ./
COPY config ./config
COPY jobs ./jobs
COPY producers ./producers
COPY scheduler ./scheduler
COPY workers ./workers
COPY promptbatch ./promptbatch
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/promptbatch/bin/pip wheel --no-deps --wheel-dir /dist . \
    && /opt/promptbatch/bin/pip install --no-deps /dist/promptbatch-*.whl \
    && /opt/promptbatch/bin/pip check \
    && /opt/promptbatch/bin/pip uninstall --yes --quiet pip setuptools
# Leaner: the dependencies' own test suites go (numpy's: 17 MB), and the debug symbols of
# the extension modules shipped unstripped (SQLAlchemy's: 8 MB). The libraries that
# auditwheel vendored (*.libs) are left as they are.
RUN cd /opt/promptbatch/lib/python3.11/site-packages \
    && find . -type d -name tests -prune -exec rm -rf {} + \
    && find . -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} +

# --- runtime: Python, the virtual environment, a non-root user; nothing else ------------
FROM python AS runtime
RUN groupadd --system --gid 10001 promptbatch \
    && useradd --system --uid 10001 --gid 10001 --create-home \
        --home-dir /var/lib/promptbatch --shell /usr/sbin/nologin promptbatch
COPY --from=build /opt/promptbatch /opt/promptbatch
ENV PATH=/opt/promptbatch/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMPTBATCH_DATA_DIR=/var/lib/promptbatch \
    PROMPTBATCH_ROLE=api \
    PROMPTBATCH_PORT=8000
USER 10001:10001
WORKDIR /var/lib/promptbatch
EXPOSE 8000 5555 9464
# tini as PID 1: passes SIGTERM on to the role (a worker's warm shutdown lets its running
# batches finish) and reaps what exits.
ENTRYPOINT ["/usr/bin/tini", "--"]
# PROMPTBATCH_ROLE (api, scheduler, worker, flower) says what to check; PROMPTBATCH_PORT
# is the API's (or Flower's) port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["promptbatch", "health"]
CMD ["promptbatch", "api", "--host", "0.0.0.0", "--port", "8000"]
