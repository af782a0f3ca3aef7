# kamiyo: small, non-root image. The runbook's commands work as written against it:
#   docker logs kamiyo | grep -i webhook
#   docker exec kamiyo env | grep STRIPE_WEBHOOK_SECRET
#   docker exec kamiyo sqlite3 /app/data/kamiyo.db
#   docker exec kamiyo python -c "from api.payments.stripe_client import sync_all_subscriptions; ..."

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --constraint requirements.lock --wheel-dir /wheels .

FROM python:3.11-slim
# sqlite3 for the runbook's Option 5; nothing else beyond the Python runtime.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends sqlite3=3.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 kamiyo \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin kamiyo \
    && mkdir -p /app/data \
    && chown kamiyo:kamiyo /app/data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
# The runbook's backfill imports api.payments.stripe_client with /app as the working directory.
COPY api ./api
# Option 5's sqlite3 waits for the service's write lock instead of failing with "database is locked".
COPY --chown=10001:10001 deploy/sqlite/sqliterc /home/kamiyo/.sqliterc
USER 10001:10001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000 \
    DATABASE_URL=sqlite:////app/data/kamiyo.db
EXPOSE 8000
VOLUME ["/app/data"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Migrate, then serve; exec so that `docker compose restart` stops uvicorn gracefully (SIGTERM).
CMD ["sh", "-c", "kamiyo db upgrade && exec kamiyo serve"]
