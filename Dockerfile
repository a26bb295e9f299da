# syntax=docker/dockerfile:1
# The bot: a slim, non-root image with the web, Telegram and Discord channels and no CUDA stack.
# Inference runs elsewhere (LMDeploy's own image, see deploy/compose.yaml); the bot talks HTTP to it.
#
#   docker build -t oogiri:0.1.0 .
#   docker run --rm -p 8000:8000 -e OOGIRI_ENGINE__NAME=lmdeploy \
#     -e OOGIRI_ENGINE__BASE_URLS='["http://lmdeploy:23333"]' oogiri:0.1.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/oogiri
WORKDIR /src
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p bot plugins training \
 && touch bot/__init__.py plugins/__init__.py training/__init__.py \
 && /opt/oogiri/bin/pip install '.[telegram,discord]' \
 && /opt/oogiri/bin/pip uninstall -y oogiri \
 && rm -rf build ./*.egg-info bot plugins training
COPY bot ./bot
COPY plugins ./plugins
COPY training ./training
# The bot image must stay free of torch/CUDA: fail the build if a dependency pulled it in.
RUN /opt/oogiri/bin/pip install --no-deps . \
 && /opt/oogiri/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && /opt/oogiri/bin/oogiri --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="oogiri" \
      org.opencontainers.image.description="A chat bot that tells jokes about pictures" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 oogiri \
 && useradd --system --uid 10001 --gid oogiri --home-dir /data --shell /usr/sbin/nologin oogiri \
 && mkdir -p /data && chown oogiri:oogiri /data
COPY --from=build /opt/oogiri /opt/oogiri
ENV PATH=/opt/oogiri/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OOGIRI_DATA_DIR=/data \
    OOGIRI_WEB__HOST=0.0.0.0 \
    OOGIRI_WEB__PORT=8000
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# SIGTERM drains the channels (App.serve_forever); give it time before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["oogiri"]
CMD ["serve"]
