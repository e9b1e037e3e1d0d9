# syntax=docker/dockerfile:1
# imgsvc: one image for `serve`, `worker` and `migrate`.
#   docker build -t imgsvc .
#   docker run --rm -e DATABASE_URL=... imgsvc migrate
#   docker run -p 5000:5000 -e DATABASE_URL=... -e AWS_BUCKET_NAME=... imgsvc serve --no-worker
#   docker run -e DATABASE_URL=... -e AWS_BUCKET_NAME=... imgsvc worker
# compose.yaml runs the whole set with PostgreSQL and MinIO.

# Build stage: a wheel of imgsvc, and every pinned dependency as a wheel.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY imgsvc ./imgsvc
COPY sql ./sql
RUN pip wheel --no-deps --wheel-dir /wheels .

# Run stage: the wheels installed into a virtualenv, run by a user without privileges.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/imgsvc/bin:$PATH \
    IMGSVC_HOST=0.0.0.0 \
    PORT=5000
COPY --from=build /wheels /wheels
RUN python -m venv /opt/imgsvc \
    && /opt/imgsvc/bin/pip install --no-cache-dir --no-index --find-links /wheels imgsvc \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin imgsvc
USER 10001
WORKDIR /tmp
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '5000')}/healthz\", timeout=4)"]
ENTRYPOINT ["imgsvc"]
CMD ["serve", "--no-worker"]
