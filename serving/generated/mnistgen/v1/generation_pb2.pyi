from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    RAW_FLOAT32: _ClassVar[ImageFormat]
    PNG: _ClassVar[ImageFormat]
    PNG_GRID: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
RAW_FLOAT32: ImageFormat
PNG: ImageFormat
PNG_GRID: ImageFormat

class Images(_message.Message):
    __slots__ = ("format", "count", "shape", "raw", "png", "grid_png")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    count: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    png: _containers.RepeatedScalarFieldContainer[bytes]
    grid_png: bytes
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., count: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ..., png: _Optional[_Iterable[bytes]] = ..., grid_png: _Optional[bytes] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("server_ms", "per_sample_ms", "triton_ms")
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_MS_FIELD_NUMBER: _ClassVar[int]
    TRITON_MS_FIELD_NUMBER: _ClassVar[int]
    server_ms: float
    per_sample_ms: float
    triton_ms: float
    def __init__(self, server_ms: _Optional[float] = ..., per_sample_ms: _Optional[float] = ..., triton_ms: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "num_samples", "seed", "steps", "sampler", "format", "digit", "guidance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_samples: int
    seed: int
    steps: int
    sampler: str
    format: ImageFormat
    digit: int
    guidance: float
    def __init__(self, model: _Optional[str] = ..., num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., sampler: _Optional[str] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., digit: _Optional[int] = ..., guidance: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("model", "model_version", "seed", "images", "timing", "steps", "sampler", "digit", "guidance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    seed: int
    images: Images
    timing: Timing
    steps: int
    sampler: str
    digit: int
    guidance: float
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., seed: _Optional[int] = ..., images: _Optional[_Union[Images, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., steps: _Optional[int] = ..., sampler: _Optional[str] = ..., digit: _Optional[int] = ..., guidance: _Optional[float] = ...) -> None: ...

class DenoiseRequest(_message.Message):
    __slots__ = ("png_images", "raw_images", "sigma", "steps", "sampler", "seed", "format")
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    raw_images: bytes
    sigma: float
    steps: int
    sampler: str
    seed: int
    format: ImageFormat
    def __init__(self, png_images: _Optional[_Iterable[bytes]] = ..., raw_images: _Optional[bytes] = ..., sigma: _Optional[float] = ..., steps: _Optional[int] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("model", "model_version", "seed", "noisy", "denoised", "timing", "sigma", "steps", "sampler")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISY_FIELD_NUMBER: _ClassVar[int]
    DENOISED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    seed: int
    noisy: Images
    denoised: Images
    timing: Timing
    sigma: float
    steps: int
    sampler: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., seed: _Optional[int] = ..., noisy: _Optional[_Union[Images, _Mapping]] = ..., denoised: _Optional[_Union[Images, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., sigma: _Optional[float] = ..., steps: _Optional[int] = ..., sampler: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "triton_model", "kind", "ready", "version", "latent_dim", "max_num_samples", "samplers", "supports_denoise", "accepts_digit", "default_guidance", "engines", "default_sampler")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRITON_MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_DENOISE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_DIGIT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    name: str
    triton_model: str
    kind: str
    ready: bool
    version: str
    latent_dim: int
    max_num_samples: int
    samplers: _containers.RepeatedScalarFieldContainer[str]
    supports_denoise: bool
    accepts_digit: bool
    default_guidance: float
    engines: str
    default_sampler: str
    def __init__(self, name: _Optional[str] = ..., triton_model: _Optional[str] = ..., kind: _Optional[str] = ..., ready: _Optional[bool] = ..., version: _Optional[str] = ..., latent_dim: _Optional[int] = ..., max_num_samples: _Optional[int] = ..., samplers: _Optional[_Iterable[str]] = ..., supports_denoise: _Optional[bool] = ..., accepts_digit: _Optional[bool] = ..., default_guidance: _Optional[float] = ..., engines: _Optional[str] = ..., default_sampler: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
