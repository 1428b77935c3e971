# ctid daemon image. Used by docker-compose.yml (`build: .`); runs
# `ctid run -c /etc/ctid/ctid.toml`, so mount a config file there.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs; everything else in the repo stays out.
COPY pyproject.toml ./
COPY ctid ./ctid
RUN pip install . \
    && useradd --system --no-create-home --shell /usr/sbin/nologin ctid

# The daemon needs no root: its ports (8080 HTTP, 4573 FastAGI) are above 1024.
USER ctid
WORKDIR /
EXPOSE 8080 4573
CMD ["ctid", "run", "-c", "/etc/ctid/ctid.toml"]
