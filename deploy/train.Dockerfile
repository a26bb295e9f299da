# syntax=docker/dockerfile:1
# The retraining job: oogiri (export, gate, registry, promotion) in /opt/oogiri plus XTuner in its own
# venv, /opt/xtuner, because XTuner pins transformers 4.48 while serving needs a newer one.
# Needs a CUDA GPU at run time; the bot image (../Dockerfile) stays CUDA-free.
#
#   docker build -f deploy/train.Dockerfile -t oogiri-train:0.1.0 .
#
# The training venv is installed from ONE lock file, training/requirements-xtuner.txt, the same one
# `oogiri train setup` installs (--no-deps: XTuner's own pins, bitsandbytes 0.45 and opencv-python,
# do not work on current CUDA). torch and torchvision come from the base image. The build ends with
# `oogiri train setup --check`: it imports xtuner.dataset (scikit-image, matplotlib, OpenCV), timm
# and the model code and builds a one-sample XTuner data set, so an image that cannot train does
# not build.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# DeepSpeed initialises through MPI when NPROC_PER_NODE=1; OpenCV (headless) needs glib.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev libglib2.0-0 git \
 && rm -rf /var/lib/apt/lists/*

# XTuner's environment reuses the base image's CUDA torch (system site packages).
COPY training/requirements-xtuner.txt /opt/requirements-xtuner.txt
RUN python -m venv --system-site-packages /opt/xtuner \
 && grep -v '^deepspeed==' /opt/requirements-xtuner.txt > /tmp/pins.txt \
 && /opt/xtuner/bin/pip install --no-deps -r /tmp/pins.txt \
 && DS_BUILD_OPS=0 /opt/xtuner/bin/pip install --no-deps --no-build-isolation \
      "$(grep '^deepspeed==' /opt/requirements-xtuner.txt)" \
 && rm /tmp/pins.txt

# oogiri itself, without torch (the job drives XTuner through /opt/xtuner/bin/python).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY oogiri ./oogiri
COPY bot ./bot
COPY plugins ./plugins
COPY training ./training
RUN python -m venv /opt/oogiri \
 && /opt/oogiri/bin/pip install . \
 && ln -s /opt/oogiri/bin/oogiri /usr/local/bin/oogiri

RUN groupadd --system --gid 10001 oogiri \
 && useradd --system --uid 10001 --gid oogiri --home-dir /data --shell /usr/sbin/nologin oogiri \
 && mkdir -p /data /models && chown oogiri:oogiri /data

# The build's last step, the check: a tiny InternVL2 folder (config class and tokenizer, built by
# the training venv's own transformers) → imports + a one-sample XTuner data set; a problem fails
# the build.
RUN /opt/xtuner/bin/python -c "import sys; sys.path.append('/src'); \
from bot.engines.internvl.tinymodel import make_tiny_model; make_tiny_model('/tmp/check-model', layout='internvl2')" \
 && oogiri train setup --check --venv /opt/xtuner --model /tmp/check-model \
 && rm -rf /tmp/check-model /src
# XTuner's launcher runs a bare `python` for one GPU: that must be the XTuner venv's.
ENV PATH=/opt/xtuner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OOGIRI_DATA_DIR=/data \
    OOGIRI_TRAINING__XTUNER_PYTHON=/opt/xtuner/bin/python
USER 10001:10001
WORKDIR /data
ENTRYPOINT ["oogiri"]
CMD ["train", "run", "--if-due"]
