# mnistgen-serve: `make help` lists what you can do. Two commands on a fresh machine: `make run`, `make test`.
SHELL := /bin/bash
PY ?= .venv/bin/python
PIP := .venv/bin/pip
CONFIG ?= baseline
MODEL ?= dcgan-baseline
STAMP := .venv/.installed

.DEFAULT_GOAL := help
.PHONY: help setup test run demo gateway proto export triton bench-triton train-gan train-classifier evaluate report clean deploy-check k8s-render images

help: ## this menu
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the project with its pinned dependencies

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

run: setup ## export stale models, start Triton + gateway (gRPC :50051, HTTP :8080, Triton :8000-8002); Ctrl-C stops both
	$(PY) -m serving.run

demo: ## with `make run` up in another terminal: out/generate.png and out/denoise.png via the client
	$(PY) -m serving.demo

gateway: setup ## only the gateway, against a running Triton: make gateway TRITON_URL=127.0.0.1:8001
	$(PY) -m serving.gateway --triton-url $(or $(TRITON_URL),127.0.0.1:8001)

proto: ## regenerate serving/generated/ from serving/proto/ (output committed; never edit it)
	$(PY) -m serving.proto.gen

export: setup ## export checkpoints to ONNX/TorchScript for Triton (skips fresh ones): make export [FORCE=1] [GPU=1]
	$(PY) -m training.export $(if $(FORCE),--force) $(if $(GPU),--gpu-variant)

triton: export ## Triton alone in the foreground: HTTP :8000, gRPC :8001, metrics :8002
	$(PY) -m serving.triton_server

bench-triton: export ## per-sample latency: eager PyTorch vs ONNX Runtime vs Triton gRPC -> bench/triton.json
	$(PY) -m serving.bench_triton

test: setup ## run the test suite (starts real Triton, gateway and Prometheus on 127.0.0.1)
	$(PY) -m pytest -q

train-gan: setup ## train a GAN: make train-gan CONFIG=baseline|modified|mlp|vanishing-gradient|mode-collapse|d-overfit [MITIGATIONS=all]
	$(PY) -m training.train_gan --config $(CONFIG) $(if $(MITIGATIONS),--mitigations $(MITIGATIONS))

train-classifier: setup ## train the evaluation classifier (weights committed in checkpoints/)
	$(PY) -m training.classifier

evaluate: setup ## metrics for one model: make evaluate MODEL=dcgan-baseline|dcgan-modified|mlp|real-test|path.safetensors
	$(PY) -m training.evaluate --model $(MODEL)

report: setup ## GAN comparison report (markdown + PNGs) into reports/gan/
	$(PY) -m training.report

deploy-check: setup ## lint the Dockerfile, validate + cross-check the k8s manifests (offline)
	$(PY) -m pytest -q tests/deploy

k8s-render: ## print an overlay's manifests: make k8s-render OVERLAY=cpu|gpu (needs kubectl)
	kubectl kustomize k8s/overlays/$(or $(OVERLAY),cpu)

REGISTRY ?= mnistgen
TAG ?= 0.1.0
images: ## build the gateway/triton/training images (needs a Docker engine): make images REGISTRY=... TAG=...
	for t in gateway triton training; do docker build --target $$t -t $(REGISTRY)/$$t:$(TAG) . || exit 1; done

clean: ## remove generated files (exports, runs, outputs); keeps .venv and committed checkpoints
	rm -rf runs out bench model_repository_gpu .pytest_cache
	find model_repository -path '*/1/*' \( -name '*.onnx' -o -name '*.pt' \) -delete
