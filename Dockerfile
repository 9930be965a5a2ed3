# syntax=docker/dockerfile:1
# mnistgen-serve images, one build target each (docs/deployment.md):
#   gateway   gRPC/HTTP gateway, CPU only, holds no weights    docker build --target gateway  -t mnistgen/gateway:0.1.0 .
#   triton    NVIDIA Triton + the exported model repositories  docker build --target triton   -t mnistgen/triton:0.1.0 .
#   training  GPU training jobs (train_gan / train_ddpm)        docker build --target training -t mnistgen/training:0.1.0 .
# The code finds checkpoints/, data/ and model_repository/ relative to the source tree (mnistgen/files.py
# REPO_ROOT), so each CPython image keeps that layout under /opt/mnistgen and installs the project editable from it.
# Dependencies come from the locks (requirements/<role>.txt, `make lock`: pinned, with hashes): each CPython stage
# copies its role's lock alone and installs it with --require-hashes (a cached layer until the lock changes), then
# copies whole package directories (no hand-picked files) and installs the project itself with its extra, with
# --no-deps (the lock already holds everything, setuptools included, hence --no-build-isolation): the package
# metadata and the console scripts (mnistgen-gateway, mnistgen) are then there. numpy stays below 2 everywhere
# ([project].dependencies; the python-backend stub returns empty tensors with numpy 2).

# ---------------------------------------------------------------------------------------------------------
# python-base: shared settings for the CPython images (gateway, export, training).
FROM python:3.11-slim-bookworm AS python-base
# HOME=/tmp: the service users have no home directory, and /tmp is the one writable path under k8s.
ENV HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/mnistgen
# Python 3.11 is the project's floor (pyproject.toml requires-python; the gateway uses asyncio.timeout).
# Fixed numeric ids so Kubernetes' runAsNonRoot can verify the user (it cannot check a user name).
RUN groupadd --system --gid 10001 mnistgen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mnistgen

# ---------------------------------------------------------------------------------------------------------
# export: committed checkpoints -> ONNX in model_repository/ (python backend, CPU or GPU via ORT) and
# model_repository_gpu/ (native onnxruntime backend + TensorRT for NVIDIA's container). CPU-only work.
FROM python-base AS export
# The lock's torch is PyPI's CUDA build (several GB, as in the training image): a build stage only, nothing of it
# ships but the exported model repositories.
COPY requirements/export.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/export.txt
COPY pyproject.toml README.md ./
# training.export runs the mnistgen runtime core (checkpoints, registry, models, diffusion).
COPY mnistgen/ mnistgen/
COPY training/ training/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e "./[export]"
COPY checkpoints/ checkpoints/
COPY model_repository/ model_repository/
# --gpu-variant writes model_repository/ and model_repository_gpu/ (parity-checked against PyTorch at export).
RUN python -m training.export --gpu-variant

# ---------------------------------------------------------------------------------------------------------
# gateway: slim CPU image with the serving dependencies only (no torch: it samples latents with numpy).
FROM python-base AS gateway
COPY requirements/serve.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/serve.txt
# serving/ runs the gateway and the client CLI; mnistgen/ holds the model table, seeded latents and the CLI helper
# they import (its torch modules are never imported here: the serve lock has no torch).
COPY pyproject.toml README.md ./
COPY mnistgen/ mnistgen/
COPY serving/ serving/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e "./[serve]"
ENV MNISTGEN_TRITON_URL=triton:8001
USER 10001:10001
EXPOSE 50051 8080
# The gateway drains in-flight requests on SIGTERM, then stops (grace period in serving.gateway).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["mnistgen-gateway"]
CMD ["--grpc-port", "50051", "--http-port", "8080", "--triton-url", "triton:8001"]

# ---------------------------------------------------------------------------------------------------------
# triton: NVIDIA's Triton 24.10 (= Triton 2.51, the server nvidia-pytriton 0.7.0 ships and the tests run).
# Release 25.10 (Triton 2.62): releases before 25.07 carry published unauthenticated flaws (CVE-2025-23310/23311 in
# the HTTP chunked parser, CVE-2025-23319/23320/23334 through the python backend's shared memory; docs/security.md);
# move on with NVIDIA's security bulletins. Its python backend runs the image's Python 3.12 (Ubuntu 24.04, an
# externally managed install: PIP_BREAK_SYSTEM_PACKAGES, as it is the backend's own interpreter).
# This stage lists the `triton` extra's packages itself, at pyproject.toml's pins
# (tests/deploy/test_dockerfile.py checks they match), with these exceptions, kept from the 3.10 images:
# onnxruntime-gpu 1.23.2 instead of onnxruntime (the newest release with Python 3.10 wheels; CUDA 12 +
# cuDNN 9, as in this container), diffusers 0.41.0 (0.42 needs 3.11), and no nvidia-pytriton (it only
# ships the tritonserver this image already is). The code these models import stays Python 3.10 (tested).
# torch is the CPU wheel (about 200 MB instead of several GB): the DDPM loop keeps only the scheduler
# arithmetic in torch; the UNet runs in ONNX Runtime on the GPU.
FROM nvcr.io/nvidia/tritonserver:25.10-py3 AS triton
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONPATH=/opt/mnistgen
RUN python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 \
    && python3 -m pip install --no-cache-dir numpy==1.26.4 onnxruntime-gpu==1.23.2 diffusers==0.41.0 \
        safetensors==0.8.0 \
    && groupadd --system --gid 10001 mnistgen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mnistgen
WORKDIR /opt/mnistgen
# model.py files import serving.triton_backend (shared backend code) and mnistgen.diffusion (the shared DDPM
# loop, with mnistgen's checkpoint, files, registry and models); checkpoints/ carries the configs beside the
# weights. Nothing from training/ runs in Triton.
COPY mnistgen/ mnistgen/
COPY serving/__init__.py serving/triton_backend.py serving/
COPY checkpoints/ checkpoints/
# /models: GPU variant (native onnxruntime backend + TensorRT); /models-cpu: python backend on ONNX Runtime.
# The k8s cpu overlay points --model-repository at /models-cpu; a mounted volume can replace either.
COPY --from=export /opt/mnistgen/model_repository_gpu/ /models/
COPY --from=export /opt/mnistgen/model_repository/ /models-cpu/
USER 10001:10001
# HTTP listens inside the container only (the HEALTHCHECK's); k8s turns it off (k8s/base/triton.yaml)
EXPOSE 8001 8002
# Triton finishes in-flight requests on SIGTERM for up to --exit-timeout-secs.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
# NVIDIA's entrypoint script sets up CUDA forward compatibility on older drivers, then runs the command.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "tritonserver"]
CMD ["--model-repository=/models", "--http-port=8000", "--http-address=127.0.0.1", "--grpc-port=8001", \
     "--metrics-port=8002", "--exit-timeout-secs=30"]

# ---------------------------------------------------------------------------------------------------------
# training: GPU training jobs. PyPI's torch 2.14.1 is a CUDA build that carries its own CUDA runtime
# (several GB), so the node needs only the NVIDIA driver. Outputs go to /opt/mnistgen/runs (mount a volume).
FROM python-base AS training
ENV MPLCONFIGDIR=/tmp/matplotlib
COPY requirements/train.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/train.txt
COPY pyproject.toml README.md ./
COPY mnistgen/ mnistgen/
COPY training/ training/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e "./[train]"
COPY data/mnist/ data/mnist/
COPY --chown=10001:10001 checkpoints/ checkpoints/
RUN mkdir -p runs && chown 10001:10001 runs
USER 10001:10001
ENTRYPOINT ["python", "-m"]
CMD ["training.train_gan", "--config", "baseline"]
