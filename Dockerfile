# syntax=docker/dockerfile:1.7
# One image for every role of promptbatch; the role is the command:
#   promptbatch migrate | api --host 0.0.0.0 | scheduler | worker -c N
#   celery -A workers.app flower --basic_auth=...
# The same steps the deployment test runs: install the wheel, run the migrations, start
# each role (tests/faults/test_deployment.py).
ARG PYTHON=3.11

# --- build: the project as a wheel, and the wheels of what it needs --------------------
FROM python:${PYTHON}-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip
COPY pyproject.toml README.md ./
COPY config ./config
COPY jobs ./jobs
COPY producers ./producers
COPY scheduler ./scheduler
COPY workers ./workers
COPY promptbatch ./promptbatch
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres]"

# --- runtime: the wheel installed, a non-root user, nothing else -----------------------
FROM python:${PYTHON}-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMPTBATCH_DATA_DIR=/var/lib/promptbatch \
    PROMPTBATCH_ROLE=api \
    PROMPTBATCH_PORT=8000
RUN useradd --system --uid 10001 --user-group --create-home \
        --home-dir /var/lib/promptbatch promptbatch
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "promptbatch[postgres]" \
    && rm -rf /wheels
USER promptbatch
WORKDIR /var/lib/promptbatch
EXPOSE 8000 5555 9464
# PROMPTBATCH_ROLE (api, scheduler, worker, flower) says what to check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["promptbatch", "health"]
CMD ["promptbatch", "api", "--host", "0.0.0.0", "--port", "8000"]
