# mnistgen-serve: `make help` lists what you can do. Two commands on a fresh machine: `make run`, `make test`.
SHELL := /bin/bash
PY ?= .venv/bin/python
PIP := .venv/bin/pip
CONFIG ?= baseline
MODEL ?= dcgan-baseline
STAMP := .venv/.installed

.DEFAULT_GOAL := help
.PHONY: help setup lock test test-busy run demo gateway proto export triton bench-triton prometheus-install browser-install screenshot openapi loadtest bench bench-mixed monitor train-gan train-recipe train-ddpm train-ddpm-cond report-ddpm-cond controlled-failures report-ddpm quality-goals train-classifier evaluate report clean deploy-check k8s-render images soak reliability reliability-report

help: ## this menu
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv: the dev lock (requirements/dev.txt, hash-checked), then the project itself (editable)

# The lock holds every package (setuptools included), so the project installs with --no-deps and no build isolation.
$(STAMP): pyproject.toml requirements/dev.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --require-hashes -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

# requirements/<role>.txt: one lock per pyproject.toml extra plus the build requirements (requirements/build.in), with
# hashes, for CPython 3.11 on x86_64 Linux (glibc 2.35+: nvidia-pytriton's floor). dev is locked first and bounds the
# others, so a package has one version everywhere.
# Existing pins are kept unless UPGRADE=1; tests/deploy/test_locks.py fails when a lock no longer matches pyproject.toml.
UV ?= .venv/bin/uv
LOCK_ROLES := serve triton export train loadtest
LOCK = $(UV) pip compile pyproject.toml requirements/build.in -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_35 \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)
lock: ## re-lock requirements/*.txt from pyproject.toml's extras (needs PyPI; UV=uv without a .venv) [UPGRADE=1]
	$(LOCK) --extra dev -o requirements/dev.txt
	for role in $(LOCK_ROLES); do $(LOCK) --extra $$role -c requirements/dev.txt -o requirements/$$role.txt || exit 1; done

run: setup ## export stale models, start Triton + gateway (gRPC :50051, HTTP :8080, Triton gRPC :8001 + metrics :8002 on 127.0.0.1); Ctrl-C stops both [TRITON_REPLICAS=N]
	$(PY) -m serving.run --triton-replicas $(or $(TRITON_REPLICAS),1)

demo: ## with `make run` up in another terminal: out/generate.png, out/denoise.png, out/digits.png via the client
	$(PY) -m serving.demo

gateway: setup ## only the gateway, against a running Triton: make gateway TRITON_URL=127.0.0.1:8001
	$(PY) -m serving.gateway --triton-url $(or $(TRITON_URL),127.0.0.1:8001)

proto: ## regenerate serving/generated/ from serving/proto/ (output committed; never edit it)
	$(PY) -m serving.proto.gen

openapi: ## rewrite docs/openapi.json, the committed copy of the gateway's GET /openapi.json (a test checks it)
	$(PY) -m serving.gateway.openapi

export: setup ## export checkpoints to ONNX/TorchScript for Triton (skips fresh ones): make export [FORCE=1] [GPU=1]
	$(PY) -m training.export $(if $(FORCE),--force) $(if $(GPU),--gpu-variant)

triton: export ## Triton alone in the foreground: HTTP :8000, gRPC :8001, metrics :8002
	$(PY) -m serving.triton_server

bench-triton: setup ## per-sample latency: eager PyTorch vs ONNX Runtime vs Triton gRPC (make bench's in-process and Triton rows) -> bench/triton/
	$(PY) -m loadtest.bench --paths pytorch-eager pytorch-eager-bf16 onnxruntime triton-grpc --concurrency 0 --out-dir bench/triton

prometheus-install: ## install Debian's prometheus + promtool where missing (make monitor, make test)
	@command -v prometheus >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
		|| echo "note: apt-get install prometheus failed; the Prometheus tests will skip"; \
	else echo "note: prometheus missing and not root (sudo apt-get install -y prometheus); the Prometheus tests will skip"; fi; }

browser-install: ## install Debian's chromium + chromium-driver where missing (the web page's browser test in make test)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "note: apt-get install chromium chromium-driver failed; the browser test will skip"; \
	else echo "note: chromium missing and not root (sudo apt-get install -y chromium chromium-driver); the browser test will skip"; fi; }

screenshot: setup browser-install ## docs/screenshot.png: the page at / in headless Chromium, after Generate and Denoise (starts Triton + gateway)
	$(PY) -m pytest -q tests/serving/test_web_page.py
	cp out/web/page.png docs/screenshot.png

test: setup prometheus-install browser-install ## run the test suite (starts real Triton, gateway and Prometheus on 127.0.0.1)
	$(PY) -m pytest -q

test-busy: setup prometheus-install browser-install ## the test suite beside two CPU-bound busy loops (.ci/busy; they stop with it) [TESTS=tests/test_process.py]
	.ci/busy 2 $(PY) -m pytest -q $(TESTS)

train-gan: setup ## train a GAN: make train-gan CONFIG=baseline|modified|mlp|vanishing-gradient|mode-collapse|d-overfit [MITIGATIONS=all]
	$(PY) -m training.train_gan --config $(CONFIG) $(if $(MITIGATIONS),--mitigations $(MITIGATIONS))

train-recipe: setup ## retrain a committed model stage by stage, resumable: make train-recipe RECIPE=dcgan-baseline|ddpm [ARGS="--plan" or trainer options, e.g. --threads 2]
	$(PY) -m training.recipe $(RECIPE) $(ARGS)

train-ddpm: setup ## train the DDPM UNet (60k images, 20,000 steps: ~80 min on 1 CPU thread; the committed one: make train-recipe RECIPE=ddpm) -> checkpoints/ddpm.safetensors + runs/ddpm/ [ARGS=--resume]
	$(PY) -m training.train_ddpm --max-steps 20000 --epochs 40 --time-budget-min 100 --lr-min-ratio 0.2 --ema-decay 0.999 $(ARGS)

train-ddpm-cond: setup ## train the class-conditional DDPM (digits 0-9 + null class, label dropout 0.1; ~100 min on 1 CPU thread) -> checkpoints/ddpm-cond.safetensors + runs/ddpm-cond/ [ARGS=--resume]
	$(PY) -m training.train_ddpm --unet-num-class-embeds 11 --run-dir runs/ddpm-cond --checkpoint checkpoints/ddpm-cond.safetensors --max-steps 24000 --epochs 40 --time-budget-min 100 --lr-min-ratio 0.2 $(ARGS)

report-ddpm-cond: setup ## guidance sweep of ddpm-cond (agreement with the digit, FID per scale) -> reports/ddpm-cond/ [ARGS=--from-json: re-render only]
	$(PY) -m training.experiments.report_cond $(ARGS)

controlled-failures: setup ## re-run the controlled GAN failures (+ all mitigations; ~65 min on 1 CPU thread) -> reports/gan/controlled_failures.{json,md} [ARGS="--runs d-overfit,d-overfit+all"]
	$(PY) -m training.experiments.controlled_failures $(ARGS)

report-ddpm: setup ## DDPM quality table + figures (samplers x steps, denoise at sigma 0.3/0.5/0.7) into reports/ddpm/ [ARGS=--from-json]
	$(PY) -m training.experiments.report_ddpm $(ARGS)

quality-goals: setup ## the 60k quality goals in one run (floor, GAN FID, DDPM samplers, denoise; ~15-40 min) -> reports/quality/ [ARGS=--ddpm PATH | --reuse | --from-json]
	$(PY) -m training.experiments.quality_goals $(ARGS)

train-classifier: setup ## train the evaluation classifier (weights committed in checkpoints/)
	$(PY) -m training.classifier

evaluate: setup ## metrics for one model: make evaluate MODEL=dcgan-baseline|dcgan-modified|mlp|real-test|path.safetensors
	$(PY) -m training.evaluate --model $(MODEL)

report: setup ## GAN comparison report (markdown + PNGs) into reports/gan/ [ARGS=--from-json]
	$(PY) -m training.experiments.report $(ARGS)

deploy-check: setup ## lint the Dockerfile, validate + cross-check the k8s manifests (offline)
	$(PY) -m pytest -q tests/deploy

k8s-render: ## print an overlay's manifests: make k8s-render OVERLAY=cpu|gpu|tls (needs kubectl)
	kubectl kustomize k8s/overlays/$(or $(OVERLAY),cpu)

REGISTRY ?= mnistgen
TAG ?= 0.1.0
images: ## build the gateway/triton/training images (needs a Docker engine): make images REGISTRY=... TAG=...
	for t in gateway triton training; do docker build --target $$t -t $(REGISTRY)/$$t:$(TAG) . || exit 1; done

LOADTEST_USERS ?= 8
LOADTEST_RATE ?= 4
LOADTEST_TIME ?= 30s
LOADTEST_ARGS ?=
MONITOR_ARGS ?=
LOADTEST_CLASSES ?= GrpcGatewayUser HttpGatewayUser
GRPC_TARGET ?= 127.0.0.1:50051
HTTP_TARGET ?= http://127.0.0.1:8080

loadtest: setup ## Locust (gRPC + HTTP users) against a running `make run`, report into out/loadtest/ [LOADTEST_ARGS="--mix generate=1 --num-samples 64"]
	@mkdir -p out/loadtest
	$(PY) -m locust -f loadtest/locustfile.py --headless -u $(LOADTEST_USERS) -r $(LOADTEST_RATE) -t $(LOADTEST_TIME) \
		--grpc-host $(GRPC_TARGET) --http-host $(HTTP_TARGET) --raw-csv out/loadtest/requests.csv \
		--stop-timeout 30 --csv out/loadtest/locust --html out/loadtest/locust.html --only-summary $(LOADTEST_ARGS) $(LOADTEST_CLASSES); \
	rc=$$?; $(PY) -m loadtest.report out/loadtest/requests.csv --out out/loadtest && exit $$rc

BENCH_ARGS ?=
bench: setup ## serving paths side by side + batch-1 concurrency sweep -> bench/results.{json,md} [DEVICE=cuda] [BENCH_ARGS=--quick]
	$(PY) -m loadtest.bench $(if $(DEVICE),--device $(DEVICE)) $(BENCH_ARGS)

bench-mixed: setup ## batch-1 GAN beside 2 / 8 clients flooding the heaviest diffusion requests (~9 min) -> reports/bench/mixed.{json,md,png} [BENCH_ARGS="--isolation" | --render]
	$(PY) -m loadtest.mixed $(BENCH_ARGS)

monitor: setup prometheus-install ## Prometheus on :9090 scraping `make run`'s gateway :8080 and Triton :8002 [MONITOR_ARGS="--gateway H:P --triton H:P --port N"]
	$(PY) -m serving.monitor --storage out/prometheus $(MONITOR_ARGS)

soak: setup ## ~10 min at 70% of measured capacity, Generate + Denoise mixed: errors, per-minute p99, gateway/Triton RSS -> out/soak/ (not in make test) [DURATION=600]
	$(PY) -m loadtest.soak $(if $(DURATION),--duration $(DURATION))

reliability: setup ## only the fault / overload / bad-input / drain tests (part of make test too); they write out/reliability/*.json (`python -m loadtest.reliability_report collect` keeps them)
	$(PY) -m pytest -q tests/reliability

reliability-report: ## render docs/reliability.md from the committed reports/reliability/*.json (to refresh those: python -m loadtest.reliability_report -h)
	$(PY) -m loadtest.reliability_report

clean: ## remove generated files (exports, runs, outputs); keeps .venv and committed checkpoints
	rm -rf runs out bench model_repository_gpu .pytest_cache
	find model_repository -path '*/1/*' \( -name '*.onnx' -o -name '*.pt' \) -delete
