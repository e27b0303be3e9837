# llava-worker on a CUDA machine.
#
# Build:
#   docker build -t llava-worker .
#
# Run (the controller runs elsewhere; the worker must tell it an address it can dial back):
#   docker run --gpus all -p 21002:21002 \
#     -v "$HOME/.cache/huggingface:/home/worker/.cache/huggingface" \
#     llava-worker \
#       --host 0.0.0.0 --port 21002 \
#       --controller-address http://<controller-host>:21001 \
#       --worker-address http://<this-host>:21002 \
#       --model-path llava-hf/llava-1.5-7b-hf
#
# Arguments after the image name replace the default CMD below entirely, so repeat
# `--host 0.0.0.0 --port 21002` when adding others. `--worker-address` must be reachable from the
# controller (and from clients it hands the address to): the host's name or IP and the published
# port, not `localhost`. For a local checkpoint, mount it and pass its path in the container:
#   -v /models/my-llava:/models/my-llava:ro ... --model-path /models/my-llava
# The Hugging Face cache mount keeps downloaded weights across containers; the container user
# (uid 10001) must be able to write to it (e.g. `chown -R 10001 ~/.cache/huggingface`, or mount
# a named volume: `-v hf-cache:/home/worker/.cache/huggingface`). 4-bit/8-bit: add --load-4bit
# or --load-8bit (bitsandbytes is installed).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# Matching pair; torchvision enables the fast image processors (and InternVL's processor).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

# torch first, in its own layer: it is by far the largest and changes least. The Linux x86_64
# wheels on PyPI are CUDA builds that carry their own CUDA libraries; the host needs an NVIDIA
# driver recent enough for the CUDA version that torch release was built with.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY llava_worker ./llava_worker
RUN pip install '.[quant]'

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin worker \
    && mkdir -p /home/worker/.cache/huggingface \
    && chown -R worker:worker /home/worker
USER worker
ENV HF_HOME=/home/worker/.cache/huggingface
WORKDIR /home/worker

EXPOSE 21002
# Readiness: the model is loaded and the generation engine answers (GET /ready; /health is plain
# liveness). Loading a large model takes minutes, hence the long start period. The probe assumes
# the default port; with another --port, override it (`docker run --health-cmd ...`).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:21002/ready', timeout=8).status != 200)"]
# SIGTERM drains: running requests finish within --shutdown-grace (30 s), then the worker exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "llava_worker"]
# Listen on every interface inside the container; the defaults of every other flag apply
# (--model-path facebook/opt-350m, --controller-address http://localhost:21001, ...), so a real
# deployment passes its own flags as shown at the top of this file.
CMD ["--host", "0.0.0.0", "--port", "21002"]
