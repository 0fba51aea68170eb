"""CLIP text encoders: velodiff's ``CLIPTextModel`` and ``CLIPTextModelWithProjection``, the text encoders of
SD 1.x / 2.x / SDXL, built from a folder's transformers ``config.json`` without importing transformers.

Parameter names are transformers' classic ones, so a text-encoder folder (or a single file's converted weights)
loads with a plain ``load_state_dict``::

    text_model.embeddings.{token_embedding, position_embedding}.weight
    text_model.encoder.layers.N.self_attn.{k,v,q,out}_proj.{weight,bias}
    text_model.encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                                  (CLIPTextModelWithProjection only, no bias)

(transformers >= 5.6 saves ``CLIPTextModel`` without the ``text_model.`` prefix; the loader adds it.)

The arithmetic is transformers' (5.x) op for op, so outputs are bit-identical to transformers' on the same
weights in fp32 (``tests/models/test_clip_text.py``): pre-LayerNorm blocks, separate q/k/v projections, attention
through ``torch.nn.functional.scaled_dot_product_attention`` called exactly as transformers' default ("sdpa")
attention calls it (``is_causal=True`` without a padding mask; with one, a boolean [B, 1, L, L] mask of
causal-and-not-padding), the activation named by ``hidden_act`` written as transformers writes it, a final
LayerNorm, and the pooled output taken at the end-of-text token: the position of the largest id when
``eos_token_id == 2`` (configs written before transformers PR #24773), else the first position holding
``eos_token_id``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: ``hidden_act`` values supported, each computed exactly as transformers' ``ACT2FN[name]`` computes it
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu, "gelu": F.gelu, "gelu_new": _gelu_new, "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu, "silu": F.silu, "swish": F.silu,
}

#: transformers' CLIPTextConfig defaults (used for keys a config.json leaves out)
CONFIG_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
}
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def clip_text_config(config: Mapping[str, Any], *, projection: bool = False, source: str = "config") -> ModelConfig:
    """A CLIP text config (transformers' ``CLIPTextConfig`` fields, its defaults for absent ones) checked for
    what the model needs; every key of ``config`` stays readable (``config.use_attention_mask``, ...).

    Raises ValueError naming ``source`` and the key for a wrong value: a size that is not a positive integer,
    ``hidden_size`` not divisible by ``num_attention_heads``, an unsupported ``hidden_act``, a non-positive
    ``layer_norm_eps``, a non-integer ``eos_token_id``, ``projection_dim`` (with ``projection=True``), a
    ``model_type`` other than ``clip_text_model`` or ``is_causal: false``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{source}: a CLIP text config must be a dict, got {type(config).__name__}")
    cfg = ModelConfig({**CONFIG_DEFAULTS, **config})
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(f"{source}: model_type {model_type!r} is not a CLIP text encoder config "
                         "('clip_text_model' expected)")
    for key in _POSITIVE_INTS + (("projection_dim",) if projection else ()):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ValueError(f"{source}: {key} must be a positive integer, got {cfg[key]!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                         f"{cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {cfg.hidden_act!r} is not supported; supported: "
                         f"{', '.join(ACTIVATIONS)}")
    eps = cfg.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(f"{source}: layer_norm_eps must be a positive number, got {eps!r}")
    if not _is_int(cfg.eos_token_id):
        raise ValueError(f"{source}: eos_token_id must be an integer (the pooled output is read at the end-of-text "
                         f"token), got {cfg.eos_token_id!r}")
    if cfg.get("is_causal", True) is not True:
        raise ValueError(f"{source}: is_causal={cfg['is_causal']!r}: velodiff's CLIP text encoder is causal only")
    return cfg


class _Output:
    """transformers' ModelOutput behaviour for a dataclass: ``out.name``, ``out["name"]``, and ``out[i]`` /
    ``to_tuple()`` over the fields that are not None, in order."""

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutputWithPooling(_Output):
    """What ``CLIPTextModel`` returns. last_hidden_state: [B, L, D] after the final LayerNorm; pooler_output:
    [B, D], last_hidden_state at each row's end-of-text token; hidden_states (with ``output_hidden_states=True``):
    num_hidden_layers + 1 tensors [B, L, D], the embeddings then each layer's output (before the final norm)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class CLIPTextModelOutput(_Output):
    """What ``CLIPTextModelWithProjection`` returns. text_embeds: [B, projection_dim], the projected pooled
    output; last_hidden_state and hidden_states as in :class:`BaseModelOutputWithPooling`."""

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``, without its N(0, 1) initialisation when built on the meta device (the loader
    then assigns the weights): torch's meta ``normal_`` runs through torch._refs, whose first use imports
    torch._dynamo, about 1 s of start-up."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] int64 -> [B, L, D] token plus position embeddings."""
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.hidden_size
        self.head_dim = dim // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, L, D]; mask None (causal) or bool [B, 1, L, L] (True: attend) -> [B, L, D]."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scale,
                                             is_causal=mask is None and x.shape[1] > 1)
        out = out.transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class CLIPMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """Embeddings, the causal pre-norm encoder, the final LayerNorm and the end-of-text pooling."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _check(self, input_ids, attention_mask) -> Optional[torch.Tensor]:
        """Argument checks; returns the attention mask as transformers builds it (None, or bool [B, 1, L, L])."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex \
                or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor [batch, length], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        limit = self.config.max_position_embeddings
        if not 1 <= length <= limit:
            raise ValueError(f"input_ids has {length} tokens per row; this text encoder reads 1 to {limit} "
                             "(max_position_embeddings)")
        if batch and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids holds ids outside [0, {self.config.vocab_size}) (vocab_size): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a tensor [batch, length] = {(batch, length)} of 1 (token) / "
                             f"0 (padding), got {got}")
        keep = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if bool(keep.all()):
            return None  # transformers then relies on is_causal, as without a mask
        causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
        return (causal[None, None] & keep[:, None, None, :]).expand(batch, 1, length, length)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False):
        """input_ids [B, L] integer ids; attention_mask optional [B, L] (1 token, 0 padding).
        Returns (last_hidden_state [B, L, D], pooled [B, D], hidden_states tuple or None)."""
        mask = self._check(input_ids, attention_mask)
        x = self.embeddings(input_ids)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask)
            if states is not None:
                states.append(x)
        x = self.final_layer_norm(x)
        rows = torch.arange(x.shape[0], device=x.device)
        ids = input_ids.to(dtype=torch.int, device=x.device)
        eos = self.config.eos_token_id
        if eos == 2:  # legacy configs (before transformers PR #24773): the largest id is the end-of-text token
            pooled = x[rows, ids.argmax(dim=-1)]
        else:  # the first position holding eos_token_id
            pooled = x[rows, (ids == eos).int().argmax(dim=-1)]
        return x, pooled, (tuple(states) if states is not None else None)


class _CLIPTextBase(nn.Module):
    _projection = False

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = clip_text_config(config, projection=self._projection, source=type(self).__name__)
        self.text_model = CLIPTextTransformer(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """Build from a transformers ``config.json`` dict (see :func:`clip_text_config`)."""
        return cls(config)

    def _hidden_states(self, requested: Optional[bool]) -> bool:
        """``output_hidden_states``: the argument, else the config's (as transformers decides)."""
        return bool(self.config.get("output_hidden_states", False) if requested is None else requested)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device


class CLIPTextModel(_CLIPTextBase):
    """transformers' ``CLIPTextModel``: ``model(input_ids)`` -> :class:`BaseModelOutputWithPooling`
    (``[0]`` is last_hidden_state [B, L, hidden_size]); in the parameters' dtype and device."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: bool = True):
        last, pooled, states = self.text_model(input_ids, attention_mask, self._hidden_states(output_hidden_states))
        out = BaseModelOutputWithPooling(last, pooled, states)
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(_CLIPTextBase):
    """transformers' ``CLIPTextModelWithProjection`` (SDXL's second encoder): ``model(input_ids)`` ->
    :class:`CLIPTextModelOutput` (``[0]`` is text_embeds [B, projection_dim], the pooled output times
    ``text_projection``)."""

    _projection = True

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.text_projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: bool = True):
        last, pooled, states = self.text_model(input_ids, attention_mask, self._hidden_states(output_hidden_states))
        out = CLIPTextModelOutput(self.text_projection(pooled), last, states)
        return out if return_dict else out.to_tuple()


#: transformers class name -> velodiff's class
CLIP_TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
