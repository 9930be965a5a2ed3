"""The gRPC + HTTP/JSON gateway: validates requests, samples GAN latents, calls Triton over gRPC, returns images
and metrics. Run it with `python -m serving.gateway` (see `--help`).

Modules:
- config: GatewayConfig, MNISTGEN_* environment defaults (env_defaults) and the CLI (parse_args).
- triton_client: TritonClient (reused aio channels, model configs cached, ModelInfer requests built from numpy),
  TritonModelInfo, triton_error (tritonclient errors -> ApiError), tensor() and the Triton tensor names.
- admission: Limiter, the admission control by cost (model evaluations x samples running at once, bounded
  concurrency and FIFO queue; beyond: RESOURCE_EXHAUSTED), Cost and the per-request cost functions.
- service: GenerationServicer (mnistgen.v1.GenerationService over gRPC; its `run` is the transport-independent
  core the HTTP routes share) and its pure helpers (images_message, images_array, timing_message, ...).
- http_api: HttpApi (aiohttp routes transcoded onto the servicer) and the HTTP helpers (error_response, ...).
- auth: TokenAuth (optional bearer tokens, re-read token file), AuthInterceptor (gRPC), TlsMaterial (TLS on both
  ports), ConfigError; the HTTP side is http_api.auth_middleware.
- json_body: JSON bodies bounded (depth, size, UTF-8, duplicate keys) and typed before protobuf parses them.
- app: GatewayState (readiness, gRPC health, draining), start(), RunningGateway, serve() and main().
"""
from .admission import Cost, Limiter, denoise_cost, generate_cost
from .app import SERVICE_NAME, GatewayState, RunningGateway, main, serve, start
from .auth import AuthInterceptor, ConfigError, TlsMaterial, TokenAuth
from .config import ENV_PREFIX, LOG_LEVELS, GatewayConfig, env_defaults, parse_args
from .http_api import (
    HTTP_STATUS, PNG_VIEWS, TIMEOUT_HEADER, HttpApi, decode_any, error_response, http_timeout, message_json,
    png_headers, query_number, wants_png,
)
from .json_body import parse_error, parse_json_body
from .service import (
    GenerationServicer, deadline_remaining, encode, images_array, images_message, model_label, timing_message,
)
from .triton_client import (
    DENOISED, IMAGE, LATENT, NOISY, NUM_SAMPLES, SAMPLER, SEED, SIGMA, STEPS, TritonClient, TritonModelInfo, tensor,
    triton_error,
)

__all__ = [
    "AuthInterceptor", "ConfigError", "Cost", "TlsMaterial", "TokenAuth", "denoise_cost", "generate_cost",
    "DENOISED", "ENV_PREFIX", "HTTP_STATUS", "IMAGE", "LATENT", "LOG_LEVELS", "NOISY", "NUM_SAMPLES", "PNG_VIEWS",
    "SAMPLER", "SEED", "SERVICE_NAME", "SIGMA", "STEPS", "TIMEOUT_HEADER", "GatewayConfig", "GatewayState",
    "GenerationServicer", "HttpApi", "Limiter", "RunningGateway", "TritonClient", "TritonModelInfo",
    "deadline_remaining", "decode_any", "encode", "env_defaults", "error_response", "http_timeout", "images_array",
    "images_message", "main", "message_json", "model_label", "parse_args", "parse_error", "parse_json_body", "png_headers",
    "query_number", "serve", "start", "tensor", "timing_message", "triton_error", "wants_png",
]
