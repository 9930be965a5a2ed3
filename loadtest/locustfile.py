"""Locust load test of the gateway: gRPC and HTTP users calling Generate/Denoise, every request's raw latency to a CSV.

Usage, options, and why each request's unrounded latency goes to --raw-csv (Locust rounds below 100 ms) for
loadtest/report.py: docs/loadtest.md.
"""
from __future__ import annotations

import csv
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from locust import User, constant, events, task  # imports gevent and monkey-patches the stdlib first
from locust.contrib.fasthttp import FastHttpUser

import grpc  # noqa: E402  (after the monkey patching, as gRPC's gevent integration requires)
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()  # gRPC's sync API now yields to gevent instead of blocking the whole process

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: `serving` without an install
from loadtest.report import CSV_COLUMNS  # noqa: E402  (the raw CSV layout the report reads)
from mnistgen import catalog  # noqa: E402
from serving.generated.mnistgen.v1 import generation_pb2 as pb  # noqa: E402
from serving.generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from serving.pb_json import message_json  # noqa: E402  (the HTTP API's JSON: protobuf's mapping)

RPCS = ("generate", "denoise")
SAMPLERS = ("",) + catalog.SAMPLERS  # "" = the gateway's default
FORMATS = ("RAW_FLOAT32", "PNG", "PNG_GRID")
MAX_MESSAGE_BYTES = 64 << 20  # 1024 raw samples are 3.2 MB
SIDE = 28


@dataclass
class LoadConfig:
    mix: dict[str, float] = field(default_factory=lambda: {"generate": 4.0, "denoise": 1.0})  # relative weights
    model: str = catalog.DEFAULT_MODEL  # Generate's model (the gateway validates the name)
    num_samples: tuple[int, ...] = (1, 64)  # Generate batch sizes; each request picks one uniformly
    sampler: str = ""  # Generate with a diffusion model: one of SAMPLERS ("" = default)
    steps: int = 0  # Generate with a diffusion model: 0 = the sampler's default
    denoise_images: tuple[int, ...] = (1, 4)  # Denoise batch sizes; each request picks one uniformly
    sigma: float = 0.5  # Denoise noise level, 0 < sigma <= 1
    denoise_sampler: str = "dpm-solver++"  # one of SAMPLERS
    denoise_steps: int = 20  # 0 = the gateway's default
    format: str = "RAW_FLOAT32"  # one of FORMATS
    timeout_s: float = 60.0  # per request: gRPC deadline / X-Request-Timeout
    raw_csv: Path = Path("out/loadtest/requests.csv")  # one row per request (CSV_COLUMNS)


def parse_mix(text: str) -> dict[str, float]:
    """"generate=4,denoise=1" -> {"generate": 4.0, "denoise": 1.0}; names from RPCS, weights >= 0, sum > 0."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip().lower()
        if name not in RPCS:
            raise ValueError(f"--mix: unknown rpc {name!r}: expected names from {RPCS} as name=weight")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--mix: weight of {name!r} must be a number >= 0, got {weight!r}") from None
        if not w >= 0:
            raise ValueError(f"--mix: weight of {name!r} must be >= 0, got {w}")
        mix[name] = w
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"--mix: give at least one positive weight, e.g. generate=4,denoise=1 (got {text!r})")
    return mix


def parse_sizes(text: str, option: str, high: int) -> tuple[int, ...]:
    """"1,64,256" -> (1, 64, 256), each in 1..high."""
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers in 1..{high}, got {text!r}") from None
    bad = [s for s in sizes if not 1 <= s <= high]
    if not sizes or bad:
        raise ValueError(f"{option}: every size must be in 1..{high}, got {text!r}")
    return sizes


def load_config(o) -> LoadConfig:
    """LoadConfig from Locust's parsed options (the custom arguments added below)."""
    for prefix, steps, sampler, sigma in (("--", o.steps, o.sampler, None),
                                          ("--denoise-", o.denoise_steps, o.denoise_sampler, o.sigma)):
        try:  # the gateway's own limits (0 steps and "" sampler: its defaults), before the first request
            catalog.check_request(catalog.DENOISER, 1, steps or 1, sampler or catalog.SAMPLERS[0], sigma=sigma)
        except catalog.LimitError as e:
            raise ValueError(f"{'--' if e.field == 'sigma' else prefix}{e.field}: {e.message}") from None
    if not o.request_timeout > 0:
        raise ValueError(f"--request-timeout: must be > 0 seconds, got {o.request_timeout}")
    return LoadConfig(
        mix=parse_mix(o.mix), model=o.model, num_samples=parse_sizes(o.num_samples, "--num-samples", 1024),
        sampler=o.sampler, steps=o.steps, denoise_images=parse_sizes(o.denoise_images, "--denoise-images", 64),
        sigma=o.sigma, denoise_sampler=o.denoise_sampler, denoise_steps=o.denoise_steps, format=o.image_format,
        timeout_s=o.request_timeout, raw_csv=Path(o.raw_csv))


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    d = LoadConfig()
    g = parser.add_argument_group("mnistgen", "what the gateway users send (loadtest/locustfile.py)")
    g.add_argument("--grpc-host", default="127.0.0.1:50051", help="gateway gRPC host:port (GrpcGatewayUser)")
    g.add_argument("--http-host", default="http://127.0.0.1:8080", help="gateway HTTP base URL (HttpGatewayUser)")
    g.add_argument("--mix", default=",".join(f"{k}={v:g}" for k, v in d.mix.items()),
                   help=f"relative weights of the rpcs {RPCS}, e.g. generate=4,denoise=1")
    g.add_argument("--model", default=d.model, help=f"Generate's model: one of {list(catalog.GENERATORS)}")
    g.add_argument("--num-samples", default=",".join(map(str, d.num_samples)),
                   help="Generate batch sizes (1..1024), comma-separated; one is picked per request")
    g.add_argument("--sampler", default=d.sampler, help=f"Generate with a diffusion --model: one of {SAMPLERS}")
    g.add_argument("--steps", type=int, default=d.steps, help="Generate with a diffusion --model: steps, 0 = default")
    g.add_argument("--denoise-images", default=",".join(map(str, d.denoise_images)),
                   help="Denoise batch sizes (1..64), comma-separated; one is picked per request")
    g.add_argument("--sigma", type=float, default=d.sigma, help="Denoise noise level, 0 < sigma <= 1")
    g.add_argument("--denoise-sampler", default=d.denoise_sampler, help=f"Denoise sampler: one of {SAMPLERS}")
    g.add_argument("--denoise-steps", type=int, default=d.denoise_steps, help="Denoise steps, 0 = default")
    g.add_argument("--image-format", default=d.format, type=str.upper, choices=FORMATS, help="response images")
    g.add_argument("--request-timeout", type=float, default=d.timeout_s, help="seconds per request")
    g.add_argument("--flood-samples", type=int, default=catalog.DENOISER.max_samples,
                   help=f"DiffusionFloodUser: samples / images per request, 1..{catalog.DENOISER.max_samples}")
    g.add_argument("--flood-steps", type=int, default=100, help="DiffusionFloodUser: ddpm steps per request")
    g.add_argument("--raw-csv", default=str(d.raw_csv), help=f"one row per request: {', '.join(CSV_COLUMNS)}")


# ---- the per-request record ----------------------------------------------------------------------------
class RawRecorder:
    """Writes every request event (unrounded latency, samples, outcome) as a CSV row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="")
        self._w = csv.writer(self._fh)
        self._w.writerow(CSV_COLUMNS)
        self.rows = 0

    def on_request(self, request_type, name, response_time, response_length, exception=None, context=None,
                   start_time=None, **_kw) -> None:
        ctx = context or {}
        start = start_time if start_time is not None else time.time() - response_time / 1e3
        err = "" if exception is None else " ".join(str(exception).split())[:200]
        self._w.writerow((f"{start:.6f}", ctx.get("transport", request_type), ctx.get("rpc", ""), name,
                          f"{response_time:.4f}", ctx.get("samples", 0), int(exception is None), err))
        self.rows += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


STATE: dict = {}  # "config": LoadConfig, "recorder": RawRecorder (set at init)


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    o = environment.parsed_options
    if o is None:  # locust used as a library without our arguments
        STATE["config"] = LoadConfig()
        return
    try:
        STATE["config"] = load_config(o)
        STATE["flood"] = (o.flood_samples, o.flood_steps)
        catalog.check_request(catalog.DENOISER, o.flood_samples, o.flood_steps, "ddpm")
    except catalog.LimitError as e:
        raise SystemExit(f"error: --flood-{e.field.replace('images', 'samples')}: {e.message}") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    GrpcGatewayUser.host = o.grpc_host
    HttpGatewayUser.host = o.http_host  # (and its subclasses: the mixed scenario's users)
    recorder = STATE["recorder"] = RawRecorder(STATE["config"].raw_csv)
    environment.events.request.add_listener(recorder.on_request)


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    if "recorder" in STATE:
        STATE["recorder"].close()
        print(f"raw per-request latencies: {STATE['recorder'].path} ({STATE['recorder'].rows} requests)",
              file=sys.stderr)


# ---- request bodies -------------------------------------------------------------------------------------
def clean_images(k: int, rng: random.Random) -> np.ndarray:
    """k synthetic digit-like strokes (a ring of random radius and centre), (k, 1, 28, 28) float32 in [-1, 1]."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)  # (28, 28)
    out = np.empty((k, 1, SIDE, SIDE), np.float32)
    for i in range(k):
        cy, cx, r = 14 + rng.uniform(-3, 3), 14 + rng.uniform(-3, 3), rng.uniform(5, 9)
        d = np.abs(np.hypot(yy - cy, xx - cx) - r)  # distance to the ring
        out[i, 0] = np.clip(2.0 * np.exp(-(d / 1.2) ** 2) - 1.0, -1.0, 1.0)
    return out


def is_diffusion(model: str) -> bool:
    """A catalog model that takes a sampler and steps (an unknown name is sent as it is, for the gateway to refuse)."""
    m = catalog.GENERATORS.get(model)
    return m is not None and m.kind != catalog.GAN


def generate_request(c: LoadConfig, rng: random.Random) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(model=c.model, num_samples=rng.choice(c.num_samples),
                             format=pb.ImageFormat.Value(c.format))
    if is_diffusion(c.model):
        msg.sampler, msg.steps = c.sampler, c.steps
    return msg


def denoise_request(c: LoadConfig, rng: random.Random) -> pb.DenoiseRequest:
    x = clean_images(rng.choice(c.denoise_images), rng)  # (K, 1, 28, 28)
    return pb.DenoiseRequest(raw_images=x.astype("<f4").tobytes(), sigma=c.sigma, steps=c.denoise_steps,
                             sampler=c.denoise_sampler, format=pb.ImageFormat.Value(c.format))


def request_samples(msg) -> int:
    """Samples a request asks for: Generate's num_samples (0 means 1), Denoise's image count."""
    if isinstance(msg, pb.GenerateRequest):
        return max(msg.num_samples, 1)
    return len(msg.png_images) or len(msg.raw_images) // (4 * SIDE * SIDE)


def request_name(msg) -> str:
    """Locust's stats key: one row per rpc, model/sampler and batch size."""
    if isinstance(msg, pb.GenerateRequest):
        extra = f" {msg.sampler or 'default'}-{msg.steps or 'default'}" if is_diffusion(msg.model) else ""
        return f"Generate {msg.model}{extra} n={request_samples(msg)}"
    return f"Denoise {msg.sampler or 'default'}-{msg.steps or 'default'} n={request_samples(msg)}"


def pick_rpc(c: LoadConfig, rng: random.Random) -> str:
    names = list(c.mix)
    return rng.choices(names, weights=[c.mix[n] for n in names])[0]


# ---- gRPC -------------------------------------------------------------------------------------------------
class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times each unary call and fires Locust's request event (with the sample count in the context)."""

    def __init__(self, environment):
        self.env = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        start_wall, start = time.time(), time.perf_counter()
        call = continuation(client_call_details, request)
        exception, length = None, 0
        try:
            length = call.result().ByteSize()
        except grpc.RpcError as e:
            exception = e
        rpc = client_call_details.method.rsplit("/", 1)[-1].lower()
        self.env.events.request.fire(
            request_type="grpc", name=request_name(request), response_time=(time.perf_counter() - start) * 1e3,
            response_length=length, response=call, exception=exception, start_time=start_wall,
            context={"transport": "grpc", "rpc": rpc, "samples": request_samples(request)})
        return call


class GrpcGatewayUser(User):
    """Calls the gateway's GenerationService over gRPC (one channel per user)."""

    host = "127.0.0.1:50051"
    wait_time = constant(0)  # closed loop: the next request as soon as the last one answered

    def __init__(self, environment):
        super().__init__(environment)
        self.rng = random.Random(id(self))
        self.config: LoadConfig = STATE.get("config") or LoadConfig()
        channel = grpc.insecure_channel(self.host.removeprefix("grpc://"), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._channel = grpc.intercept_channel(channel, LocustInterceptor(environment))
        self.stub = pb_grpc.GenerationServiceStub(self._channel)

    def on_stop(self) -> None:
        self._channel.close()

    @task
    def call(self) -> None:
        c = self.config
        try:
            if pick_rpc(c, self.rng) == "generate":
                self.stub.Generate(generate_request(c, self.rng), timeout=c.timeout_s)
            else:
                self.stub.Denoise(denoise_request(c, self.rng), timeout=c.timeout_s)
        except grpc.RpcError:
            pass  # already recorded as a failure by the interceptor


# ---- HTTP -------------------------------------------------------------------------------------------------
class HttpGatewayUser(FastHttpUser):
    """Calls the gateway's HTTP/JSON API (POST /v1/generate, /v1/denoise)."""

    host = "http://127.0.0.1:8080"
    wait_time = constant(0)
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        self.config: LoadConfig = STATE.get("config") or LoadConfig()

    def request(self) -> tuple[str, object]:
        """(rpc, message) of the next request: by --mix."""
        c, rpc = self.config, pick_rpc(self.config, self.rng)
        return rpc, generate_request(c, self.rng) if rpc == "generate" else denoise_request(c, self.rng)

    @task
    def call(self) -> None:
        c = self.config
        rpc, msg = self.request()
        ctx = {"transport": "http", "rpc": rpc, "samples": request_samples(msg)}
        with self.client.post(f"/v1/{rpc}", json=message_json(msg), name=request_name(msg), context=ctx,
                              headers={"X-Request-Timeout": str(c.timeout_s)}, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            else:
                r.success()


# ---- the mixed scenario (docs/loadtest.md, "Mixed load"): name both classes, e.g. -u 3 -> 1 GAN user, 2 flooding --
class MixedGanUser(HttpGatewayUser):
    """The cheap class: batch-1 Generate of the default GAN over HTTP, closed loop."""

    weight = 1

    def request(self) -> tuple[str, object]:
        return "generate", pb.GenerateRequest(model=catalog.DEFAULT_MODEL, num_samples=1,
                                              format=pb.ImageFormat.Value(self.config.format))


class DiffusionFloodUser(HttpGatewayUser):
    """The heavy class: the heaviest allowed diffusion requests, DDPM Generate and Denoise alternating, each of
    --flood-samples samples / images x --flood-steps ddpm steps (defaults: the catalog's max_samples x 100)."""

    weight = 2

    def request(self) -> tuple[str, object]:
        c, o = self.config, STATE.get("flood", (catalog.DENOISER.max_samples, 100))
        self.turn = not getattr(self, "turn", True)
        fmt = pb.ImageFormat.Value(c.format)
        if self.turn:
            return "generate", pb.GenerateRequest(model=catalog.DENOISER.name, num_samples=o[0], steps=o[1],
                                                  sampler="ddpm", format=fmt)
        x = clean_images(o[0], self.rng)  # (K, 1, 28, 28)
        return "denoise", pb.DenoiseRequest(raw_images=x.astype("<f4").tobytes(), sigma=c.sigma, steps=o[1],
                                            sampler="ddpm", format=fmt)
