"""What a server allows (:class:`ServeConfig`) and the checked form of one image request (:class:`ImageRequest`,
:func:`parse_request`).

The request is OpenAI's images request (``prompt``, ``n``, ``size`` "WxH", ``response_format`` "b64_json",
``model``) plus velodiff's extensions (``negative_prompt``, ``steps``, ``sampler``, ``guidance``, ``seed``,
``class_label``, ``lora`` {name: strength}, ``optimize`` [technique specs the server allows], ``stream`` for
server-sent progress events). Every field is checked here, before anything reaches the engine; a bad one is a
:class:`RequestError` naming the field (the HTTP layer answers 400 with it).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

#: request fields the server reads; anything else is an error (a typo must not be silently ignored)
REQUEST_FIELDS = ("prompt", "n", "size", "response_format", "model", "negative_prompt", "steps", "sampler", "guidance",
                  "seed", "class_label", "lora", "optimize", "stream", "user")


#: the largest value each integer limit of ServeConfig may take (every batch runs at max_batch images when padded;
#: the training schedule has 1000 steps)
LIMITS = {"max_batch": 256, "max_queue": 100000, "max_n": 256, "max_steps": 1000, "max_prompt_chars": 1 << 20,
          "max_body_bytes": 1 << 30, "default_steps": 1000}


class RequestError(ValueError):
    """A request field is missing or invalid: ``param`` names it, the message says what to send instead."""

    def __init__(self, param: Optional[str], message: str):
        super().__init__(message)
        self.param = param


@dataclass
class ServeConfig:
    """A server's limits and defaults.

    Attributes:
        model: the model folder or built-in name; ``model_id`` the id ``/v1/models`` lists (default: the name).
        max_batch: images per engine batch (requests with compatible settings share a batch).
        max_wait_ms: how long the first request of a batch waits for company.
        max_queue: requests waiting at most; one more is answered 429.
        max_n: images per request (default: max_batch); max_side: largest image side in pixels (None: the pipeline's own maximum);
        max_steps: denoising steps per request; max_prompt_chars: prompt length; max_body_bytes: request size (413).
        allowed_optimize: technique specs (``velodiff.accel`` NAME[:k=v]) a request may name in ``optimize``.
        pad_batches: run every batch at ``max_batch`` images (unused rows repeat the first image and are dropped),
            so that an image does not depend on what it was batched with: bit for bit the same alone or batched
            (kernels choose their blocking by batch size, so a smaller batch would differ in the last bits).
        default_steps: steps when a request gives none.
    """

    model: str = "digits"
    model_id: Optional[str] = None
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 64
    max_n: Optional[int] = None
    max_side: Optional[int] = None
    max_steps: int = 100
    max_prompt_chars: int = 2000
    max_body_bytes: int = 1 << 20
    allowed_optimize: Tuple[str, ...] = ()
    pad_batches: bool = True
    default_steps: int = 20

    def __post_init__(self):
        if self.max_n is None:
            self.max_n = self.max_batch
        for name, highest in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= highest:
                raise ValueError(f"{name} must be an integer from 1 to {highest}, got {value!r}")
        if not isinstance(self.max_wait_ms, numbers.Real) or not 0 <= self.max_wait_ms <= 60000:
            raise ValueError(f"max_wait_ms must be a number from 0 to 60000, got {self.max_wait_ms!r}")
        if self.max_n > self.max_batch:
            raise ValueError(f"max_n ({self.max_n}) cannot exceed max_batch ({self.max_batch})")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 8):
            raise ValueError(f"max_side must be an integer >= 8, got {self.max_side!r}")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) cannot exceed max_steps ({self.max_steps})")
        self.allowed_optimize = tuple(self.allowed_optimize)
        if self.model_id is None:
            self.model_id = str(self.model).rstrip("/").split("/")[-1]


@dataclass(frozen=True)
class ImageRequest:
    """One checked request. ``batch_key`` holds what requests must share to run in one batch."""

    prompt: Optional[str]
    class_label: Optional[int]
    n: int
    height: int
    width: int
    negative_prompt: Optional[str]
    steps: int
    sampler: Optional[str]
    guidance: Optional[float]
    seed: int
    lora: Tuple[Tuple[str, float], ...] = ()
    optimize: Tuple[str, ...] = ()
    stream: bool = False

    @property
    def batch_key(self) -> tuple:
        return (self.height, self.width, self.steps, self.sampler, self.guidance, self.lora, self.optimize,
                self.negative_prompt is None, self.class_label is None)


def _integer(body, name: str, default, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(name, f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _text(body, name: str, limit: int, required: bool = False) -> Optional[str]:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(name, f"{name} is required (a string)")
        return None
    if not isinstance(value, str):
        raise RequestError(name, f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(name, f"{name} has {len(value)} characters; at most {limit} are accepted")
    return value


def parse_size(value, native: Tuple[int, int], multiple: int, max_side: int) -> Tuple[int, int]:
    """(height, width) from OpenAI's ``size`` "WIDTHxHEIGHT" (None: the model's native size)."""
    if value is None:
        return native
    if not isinstance(value, str) or value.count("x") != 1:
        raise RequestError("size", f"size must be \"WIDTHxHEIGHT\" such as \"{native[1]}x{native[0]}\", got {value!r}")
    try:
        width, height = (int(v) for v in value.split("x"))
    except ValueError:
        raise RequestError("size", f"size must be \"WIDTHxHEIGHT\" with integers, got {value!r}") from None
    if not (0 < width <= max_side and 0 < height <= max_side) or width % multiple or height % multiple:
        raise RequestError("size", f"size {value} is not allowed: each side a multiple of {multiple} from {multiple} "
                                   f"to {max_side} pixels")
    return height, width


def parse_request(body: Any, config: ServeConfig, model: Mapping[str, Any]) -> ImageRequest:
    """Check a decoded JSON body against ``config`` and the served ``model``'s facts (``native`` (h, w),
    ``multiple``, ``max_side``, ``class_conditional``, ``num_classes``, ``samplers``, ``loras``); RequestError
    naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(None, "the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in REQUEST_FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field(s) {unknown}; the accepted fields are {list(REQUEST_FIELDS)}")
    if body.get("model") not in (None, config.model_id):
        raise RequestError("model", f"model {body['model']!r} is not served here; this server serves "
                                    f"{config.model_id!r}")
    if body.get("response_format", "b64_json") != "b64_json":
        raise RequestError("response_format", f"response_format {body['response_format']!r} is not supported; use "
                                              "\"b64_json\" (images are returned inline)")
    limit = config.max_prompt_chars
    prompt, negative = _text(body, "prompt", limit), _text(body, "negative_prompt", limit)
    class_label = body.get("class_label")
    if model["class_conditional"]:
        if class_label is None:
            raise RequestError("class_label", f"{config.model_id} is class-conditional: send class_label (an "
                                              f"integer from 0 to {model['num_classes'] - 1}) instead of a prompt")
        class_label = _integer(body, "class_label", None, 0, model["num_classes"] - 1)
        if prompt is not None or negative is not None:
            raise RequestError("prompt", f"{config.model_id} is class-conditional and takes no text; send class_label")
    else:
        if class_label is not None:
            raise RequestError("class_label", f"class_label is for class-conditional models; {config.model_id} takes "
                                              "a prompt")
        if prompt is None:
            raise RequestError("prompt", "prompt is required (a string)")
    n = _integer(body, "n", 1, 1, config.max_n)
    steps = _integer(body, "steps", config.default_steps, 1, config.max_steps)
    seed = _integer(body, "seed", 0, 0, 2 ** 63 - 1 - config.max_n)
    max_side = min(config.max_side or model["max_side"], model["max_side"])
    height, width = parse_size(body.get("size"), model["native"], model["multiple"], max_side)
    sampler = body.get("sampler")
    if sampler is not None and sampler not in model["samplers"]:
        raise RequestError("sampler", f"unknown sampler {sampler!r}; choose one of {sorted(model['samplers'])}")
    guidance = body.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or not 0 <= guidance <= 100):
        raise RequestError("guidance", f"guidance must be a number from 0 to 100, got {guidance!r}")
    lora = body.get("lora") or {}
    if not isinstance(lora, dict) or any(not isinstance(k, str) for k in lora):
        raise RequestError("lora", "lora must be an object {name: strength}")
    for name, strength in lora.items():
        if name not in model["loras"]:
            raise RequestError("lora", f"no LoRA named {name!r} is loaded on this server (loaded: "
                                       f"{sorted(model['loras']) or 'none'})")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or abs(strength) > 10:
            raise RequestError("lora", f"lora strength of {name!r} must be a number from -10 to 10, got {strength!r}")
    optimize = body.get("optimize") or []
    if not isinstance(optimize, list) or any(not isinstance(o, str) for o in optimize):
        raise RequestError("optimize", "optimize must be a list of technique specs")
    refused = [o for o in optimize if o not in config.allowed_optimize]
    if refused:
        raise RequestError("optimize", f"optimize {refused} not allowed on this server (allowed: "
                                       f"{list(config.allowed_optimize) or 'none'})")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be true or false, got {stream!r}")
    return ImageRequest(prompt=prompt, class_label=class_label, n=n, height=height, width=width,
                        negative_prompt=negative, steps=steps, sampler=sampler,
                        guidance=None if guidance is None else float(guidance), seed=seed,
                        lora=tuple(sorted((k, float(v)) for k, v in lora.items())), optimize=tuple(optimize),
                        stream=stream)
