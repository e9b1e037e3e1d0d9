# imgsvc: one image for `serve`, `worker` and `migrate`.
#   docker build -t imgsvc .
#   docker run --rm -e DATABASE_URL=... imgsvc migrate
#   docker run -p 5000:5000 -e DATABASE_URL=... -e AWS_BUCKET_NAME=... imgsvc serve --no-worker
#   docker run -e DATABASE_URL=... -e AWS_BUCKET_NAME=... imgsvc worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMGSVC_HOST=0.0.0.0 \
    PORT=5000

WORKDIR /app
# Pinned dependencies first, so code changes do not reinstall them.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY imgsvc ./imgsvc
COPY sql ./sql
RUN pip install --no-deps . && rm -rf /app/imgsvc /app/sql

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin imgsvc
USER imgsvc
EXPOSE 5000
ENTRYPOINT ["imgsvc"]
CMD ["serve", "--no-worker"]
