"""Request validation for the gateway: every bad input becomes an ApiError naming the field and the allowed range."""
from __future__ import annotations

import reprlib
import secrets
from dataclasses import dataclass

import numpy as np

from mnistgen import catalog
from mnistgen.catalog import DIGITS, MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SAMPLERS, Model  # noqa: F401 (re-exported)

from .images import PIXELS, PNG_SIGNATURE, SIDE, decode_png, from_uint8

# ---- limits and choices: the model table, its limits and defaults are mnistgen.catalog's ----------------
RANDOM_SEED_BITS = 32  # an absent seed is drawn from 0..2^32-1 (exact in JSON numbers too)
RAW_TOLERANCE = 1e-3  # raw pixels may overshoot [-1, 1] by this much (float rounding), no more
# ImageFormat enum values (mirrors mnistgen.v1.ImageFormat; kept here so validation needs no generated code)
FORMATS = {0: "RAW_FLOAT32", 1: "RAW_FLOAT32", 2: "PNG", 3: "PNG_GRID"}
FORMAT_NAMES = ("RAW_FLOAT32", "PNG", "PNG_GRID")
PNG_MODES = ("L", "1", "P", "LA", "RGB", "RGBA", "I;16", "I;16B", "I")  # colour -> L (ITU-R 601-2 luma), alpha dropped
CONDITIONAL_MODELS = [m.name for m in catalog.GENERATORS.values() if m.conditional]
DIFFUSION_MODELS = [m.name for m in catalog.GENERATORS.values() if m.kind != catalog.GAN]


# ---- echoing user input -------------------------------------------------------------------------------
ECHO_CHARS = 64  # at most this much of any user-supplied value goes into an error message or a log line
CLIP_CHARS = 240  # free text that may hold user input (a library's error message): cut to this
_REPR = reprlib.Repr()  # containers from JSON: a few items, two levels, no recursion into hostile depth
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = ECHO_CHARS, ECHO_CHARS, ECHO_CHARS


def escape(text: str) -> str:
    """Control and other non-printable characters (NUL, newlines, ESC, bidi overrides, lone surrogates) as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def echo(value, limit: int = ECHO_CHARS) -> str:
    """A user-supplied value for an error message or a log line: quoted like repr(), non-printables escaped, at
    most `limit` characters of it, with the original length when cut: `'aaaa…' (10000 chars)`.

    Every message that repeats user input goes through here (or clip()), so an error stays small: a gRPC status
    carries its message in a trailer, and a client drops a stream whose trailers pass its metadata limit (8 KB).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
    if isinstance(value, (str, bytes)):
        r = escape(repr(value[:limit]))
        if len(r) > 4 * limit + 2:  # mostly escapes (\U000e0001 is 10 characters): keep the message small anyway
            r = r[:4 * limit + 1] + r[-1]
        elif len(value) <= limit:
            return r
        return f"{r[:-1]}…{r[-1]} ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile object's repr (an int over Python's 4300-digit str limit, ...)
        text = f"<{type(value).__name__}>"
    return clip(text, 2 * limit)


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """Free text that may contain user input: non-printables escaped, cut to `limit` characters (+ the length)."""
    text = str(text)
    cut = escape(text[:limit])
    if len(text) <= limit and len(cut) <= limit:
        return cut
    return f"{cut[:limit]}… ({len(text)} chars)"


# ---- errors ---------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error with a gRPC status code name; the gateway maps it to gRPC and HTTP."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after  # whole seconds until a retry may fit (Retry-After), when the gateway knows
        if code is not None:
            self.code = code


class ValidationError(ApiError):
    """A bad request field: INVALID_ARGUMENT / HTTP 400; the message starts with the field name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field)


# ---- validated requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateParams:
    model: Model
    num_samples: int
    seed: int
    steps: int  # 0 for GANs
    sampler: str  # "" for GANs
    format: str  # one of FORMAT_NAMES
    digit: int = -1  # conditional models: 0..9, -1 = any digit
    guidance: float = 0.0  # conditional models: the classifier-free guidance scale; 0.0 otherwise

    @property
    def guided(self) -> bool:
        """Each sampling step evaluates the UNet twice (the digit's pass and the null pass, batched together)."""
        return self.model.conditional and self.digit >= 0 and self.guidance != 1.0


@dataclass(frozen=True)
class DenoiseParams:
    images: np.ndarray  # (K, 1, 28, 28) float32 in [-1, 1]
    sigma: float
    steps: int
    sampler: str
    seed: int
    format: str


def check_model(model: str) -> Model:
    try:
        return catalog.generator(model)
    except KeyError:
        raise ValidationError("model", f"unknown model {echo(model)}: expected one of {list(catalog.GENERATORS)}"
                              ) from None


def check_int(field: str, value, lo: int, hi: int) -> int:
    """An integer (not a bool, not a float); its range is catalog.check_request's to check, `lo..hi` only says it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValidationError(field, f"must be an integer in {lo}..{hi}, got {echo(value)}")
    return int(value)


def check_number(field: str, value, bounds: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValidationError(field, f"must be a number {bounds}, got {echo(value)}")
    return float(value)


def check_format(fmt) -> str:
    """ImageFormat enum number (0 = RAW_FLOAT32) or its name -> the name."""
    if isinstance(fmt, str) and fmt.isascii() and fmt.upper() in FORMAT_NAMES:  # ASCII only: "png_grıd" is no name
        return fmt.upper()
    if isinstance(fmt, (int, np.integer)) and not isinstance(fmt, bool) and int(fmt) in FORMATS:
        return FORMATS[int(fmt)]
    raise ValidationError("format", f"unknown image format {echo(fmt)}: expected one of {list(FORMAT_NAMES)}")


def diffusion_args(spec: Model, steps, sampler: str) -> tuple[int, str]:
    """steps 0 -> the model's default for the sampler, sampler "" -> the model's default. The sampler is checked
    here before catalog.check_request does: the default steps depend on it, and user text is echoed bounded."""
    if not isinstance(sampler, str) or (sampler and sampler not in SAMPLERS):
        raise ValidationError("sampler", f"unknown sampler {echo(sampler)}: expected one of {list(SAMPLERS)}")
    s = sampler or spec.sampler
    st = check_int("steps", steps, 1, MAX_STEPS)
    return (st or spec.default_steps(s)), s


def check_limits(spec: Model, n: int, seed: int | None, **values) -> int:
    """catalog.check_request (the one limits check, shared with the Triton models) as a ValidationError; an absent
    seed becomes a fresh random one in 0..2^32-1."""
    seed = secrets.randbits(RANDOM_SEED_BITS) if seed is None else check_int("seed", seed, 0, MAX_SEED)
    try:
        catalog.check_request(spec, n, seed=seed, **values)
    except catalog.LimitError as e:
        raise ValidationError(e.field, e.message) from None
    return seed


def validate_generate(model: str, num_samples: int, seed: int | None, steps: int, sampler: str, fmt,
                      digit: int | None = None, guidance: float | None = None) -> GenerateParams:
    """Check a Generate request (proto3 defaults: model "" -> the catalog's first, num_samples 0 -> 1; digit and
    guidance None when absent)."""
    spec = check_model(model)
    n = check_int("num_samples", num_samples, 1, spec.max_samples) or 1
    if spec.kind == catalog.GAN:
        for field, value, what in (("steps", steps, f"steps (1..{MAX_STEPS}); leave it 0"),
                                   ("sampler", sampler, f"a sampler {list(SAMPLERS)}; leave it empty")):
            if value:
                raise ValidationError(field, f"only the ddpm models {DIFFUSION_MODELS} take {what} for {spec.name!r}, "
                                             f"got {echo(value)}")
        st, s = 0, ""
    else:
        st, s = diffusion_args(spec, steps, sampler)
    for field, value, allowed in (("digit", digit, f"0..{DIGITS - 1}"), ("guidance", guidance, f"0..{MAX_GUIDANCE:g}")):
        if value is not None and not spec.conditional:
            raise ValidationError(field, f"model {spec.name!r} is unconditional; only {CONDITIONAL_MODELS} take a "
                                         f"{field} ({allowed}); leave it out")
    d = -1 if digit is None else check_int("digit", digit, 0, DIGITS - 1)
    if digit is not None and not 0 <= d < DIGITS:  # (-1, "any digit", is Triton's encoding of an absent digit)
        raise ValidationError("digit", f"must be in 0..{DIGITS - 1}, got {d}")
    g = spec.guidance if guidance is None else check_number("guidance", guidance, f"in 0..{MAX_GUIDANCE:g}")
    seed = check_limits(spec, n, seed, steps=st, sampler=s, digit=d, guidance=g)
    return GenerateParams(spec, n, seed, st, s, check_format(fmt), d, g)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk without decoding pixels; None when the header is not a PNG's."""
    if len(data) >= 24 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def decode_png_image(data: bytes, index: int) -> np.ndarray:
    """One PNG -> (1, 28, 28) float32 in [-1, 1]; 28x28 only, grayscale or colour (converted to L)."""
    field = f"png_images[{index}]"
    size = png_size(data)
    if size in (None, (SIDE, SIDE)):  # else refused from the header: a tiny PNG can declare gigapixels
        try:
            img = decode_png(data)
        except ValueError as e:
            raise ValidationError(field, clip(str(e))) from None
        size = img.size
    if size != (SIDE, SIDE):
        raise ValidationError(field, f"image is {size[0]}x{size[1]}, expected {SIDE}x{SIDE} "
                                     "(resize it first; the service does not rescale)")
    if img.mode not in PNG_MODES:
        raise ValidationError(field, f"unsupported PNG mode {echo(img.mode)}: expected one of {list(PNG_MODES)}")
    if img.mode.startswith("I"):  # 16-bit grayscale: keep the top 8 bits
        u8 = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
    else:
        u8 = np.asarray(img.convert("L"), dtype=np.uint8)  # (28, 28)
    return from_uint8(u8)[0]  # (1, 28, 28)


def decode_raw_images(raw: bytes) -> np.ndarray:
    """k*784 little-endian float32 -> (k, 1, 28, 28); finite values in [-1, 1] only."""
    per = PIXELS * 4
    if len(raw) == 0 or len(raw) % per:
        raise ValidationError("raw_images", f"length must be a positive multiple of {per} bytes "
                                            f"(k images x 784 float32), got {len(raw)} bytes")
    x = np.frombuffer(raw, dtype="<f4").reshape(-1, 1, SIDE, SIDE).astype(np.float32)  # (K, 1, 28, 28)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(-1)))[0])
        raise ValidationError("raw_images", f"values must be finite (no NaN/Inf): image {bad // PIXELS}, "
                                            f"pixel {bad % PIXELS} is {x.reshape(-1)[bad]}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RAW_TOLERANCE or hi > 1 + RAW_TOLERANCE:
        raise ValidationError("raw_images", f"values must be in [-1, 1], got min {lo:.4g}, max {hi:.4g}")
    return np.clip(x, -1.0, 1.0)


def validate_denoise(png_images: list[bytes], raw_images: bytes, sigma, steps, sampler: str,
                     seed: int | None, fmt) -> DenoiseParams:
    """Check a Denoise request: PNGs or raw floats (exactly one), 1..max images, 0 < sigma <= 1."""
    spec = catalog.DENOISER
    if png_images and raw_images:
        raise ValidationError("images", "give either png_images or raw_images, not both")
    if not png_images and not raw_images:
        raise ValidationError("images", f"no images: give 1..{spec.max_samples} 28x28 images in png_images "
                                        "(PNG bytes) or raw_images (k*784 float32 in [-1, 1])")
    count = len(png_images) if png_images else len(raw_images) // (PIXELS * 4)
    if count > spec.max_samples:
        field = "png_images" if png_images else "raw_images"
        raise ValidationError(field, f"image count must be in 1..{spec.max_samples}, got {count}")
    if png_images:
        x = np.stack([decode_png_image(b, i) for i, b in enumerate(png_images)])  # (K, 1, 28, 28)
    else:
        x = decode_raw_images(raw_images)
    sig = check_number("sigma", sigma, "with 0 < sigma <= 1")
    st, s = diffusion_args(spec, steps, sampler)
    seed = check_limits(spec, len(x), seed, steps=st, sampler=s, sigma=sig)
    return DenoiseParams(x, sig, st, s, seed, check_format(fmt))
