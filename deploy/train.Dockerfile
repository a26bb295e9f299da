# syntax=docker/dockerfile:1
# The retraining job: oogiri (export, gate, registry, promotion) in /opt/oogiri plus XTuner in its own
# venv, /opt/xtuner, because XTuner pins transformers 4.48 while serving needs a newer one.
# Needs a CUDA GPU at run time; the bot image (../Dockerfile) stays CUDA-free.
#
#   docker build -f deploy/train.Dockerfile -t oogiri-train:0.1.0 .
#
# The XTuner pins are the ones that trained and merged InternVL2 on the device (shared field notes,
# 2026-11): bitsandbytes >= 0.48 (0.45 has no CUDA 13 build and imports triton.ops), deepspeed
# 0.16.2 built without ops. Keep them in step with `oogiri train setup`.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# DeepSpeed initialises through MPI when NPROC_PER_NODE=1.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev git \
 && rm -rf /var/lib/apt/lists/*

# XTuner's environment reuses the base image's CUDA torch (system site packages).
RUN python -m venv --system-site-packages /opt/xtuner \
 && /opt/xtuner/bin/pip install \
      "transformers==4.48.0" "tokenizers==0.21.0" "huggingface_hub==0.27.1" "peft==0.14.0" \
      "accelerate==1.2.1" "datasets==3.2.0" "mmengine==0.10.6" "pydantic>=2.10,<2.11" \
      "bitsandbytes>=0.48" "einops" "timm" "sentencepiece" "hjson" "loguru" "addict" "yapf" \
      "mpi4py" \
 && DS_BUILD_OPS=0 /opt/xtuner/bin/pip install --no-build-isolation "deepspeed==0.16.2" \
 && /opt/xtuner/bin/pip install --no-deps "xtuner==0.2.0" \
 && /opt/xtuner/bin/python -c "import xtuner, transformers; assert transformers.__version__ == '4.48.0'"

# oogiri itself, without torch (the job drives XTuner through /opt/xtuner/bin/python).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY plugins ./plugins
COPY training ./training
RUN python -m venv /opt/oogiri \
 && /opt/oogiri/bin/pip install . \
 && ln -s /opt/oogiri/bin/oogiri /usr/local/bin/oogiri \
 && rm -rf /src

RUN groupadd --system --gid 10001 oogiri \
 && useradd --system --uid 10001 --gid oogiri --home-dir /data --shell /usr/sbin/nologin oogiri \
 && mkdir -p /data /models && chown oogiri:oogiri /data
# XTuner's launcher runs a bare `python` for one GPU: that must be the XTuner venv's.
ENV PATH=/opt/xtuner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OOGIRI_DATA_DIR=/data \
    OOGIRI_TRAINING__XTUNER_PYTHON=/opt/xtuner/bin/python
USER 10001:10001
WORKDIR /data
ENTRYPOINT ["oogiri"]
CMD ["train", "run", "--if-due"]
