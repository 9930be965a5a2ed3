"""The gRPC + HTTP/JSON gateway: validates requests, samples GAN latents, calls Triton over gRPC, returns images
and metrics. Run it with `python -m serving.gateway` (see `--help`).

Modules:
- config: GatewayConfig and its CLI + MNISTGEN_* environment (parse_args, through mnistgen.cli).
- triton_client: TritonClient (reused aio channels, model configs cached, ModelInfer requests built from numpy),
  TritonModelInfo, triton_error (tritonclient errors -> ApiError), tensor() and the Triton tensor names.
- admission: Admission (a Limiter pool per Triton model: cost budget, concurrency, a FIFO queue per tenant class
  served by deficit round robin by cost, deadline-aware refusal), Cost and the per-request cost functions.
- service: GenerationServicer (mnistgen.v1.GenerationService over gRPC; its `run` is the transport-independent
  core the HTTP routes share) and its pure helpers (fill_images, images_array, set_timing, ...).
- http_api: HttpApi (aiohttp routes transcoded onto the servicer) and the HTTP helpers (error_response, ...).
- auth: TokenAuth (optional bearer tokens, re-read token file), AuthInterceptor (gRPC), TlsMaterial (TLS on both
  ports), ConfigError; the HTTP side is http_api.auth_middleware.
- json_body: JSON bodies bounded (depth, size, UTF-8, duplicate keys) and typed before protobuf parses them.
- app: GatewayState (readiness, gRPC health, draining), start(), RunningGateway, serve() and main().
"""
from .admission import Admission, Limiter  # noqa: F401  (the names tests and tools reach through the package)
from .config import GatewayConfig, parse_args  # noqa: F401
