"""LlamaConfig: the model's hyper-parameters, read from explicit files, never guessed from names.

Field names follow HF's config.json so a config compares 1:1 with a published checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from awq_ref.files import parse_json


@dataclass(frozen=True)
class Architecture:
    """What a model_type changes in Llama's computation; everything not named here is Llama's."""

    hf_class: str  # config.json's "architectures" entry, written back into saved checkpoints
    # q, k and v carry a bias, o does not (Qwen2), whatever attention_bias says
    qkv_bias: bool = False
    qk_norm: bool = False  # each head's q and k are RMS-normalised before RoPE (Qwen3)
    # config.json may set a sliding attention window (LlamaConfig.sliding_window)
    window: bool = False
    window_switch: bool = False  # config.json has Qwen's use_sliding_window (off: written so)
    bias_keys: tuple[str, ...] = ()  # which of Llama's attention_bias / mlp_bias switches it has
    # transformers' value for a field config.json leaves out, where it is not Llama's
    defaults: tuple[tuple[str, Any], ...] = ()


# The architectures we run, as data, by config.json's model_type. Mistral's window is null from
# Mistral 7B v0.2 on (left out, it is transformers' 4096); Qwen2's is off unless
# use_sliding_window says otherwise (then refused).
QWEN_DEFAULTS = (("num_key_value_heads", 32), ("max_position_embeddings", 32768),
                 ("sliding_window", 4096))  # used only where use_sliding_window is set
ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", bias_keys=("attention_bias", "mlp_bias")),
    "mistral": Architecture("MistralForCausalLM", window=True,
                            defaults=(("num_key_value_heads", 8),
                                      ("max_position_embeddings", 131072),
                                      ("sliding_window", 4096))),
    "qwen2": Architecture("Qwen2ForCausalLM", qkv_bias=True, window_switch=True,
                          defaults=QWEN_DEFAULTS),
    "qwen3": Architecture("Qwen3ForCausalLM", qk_norm=True, bias_keys=("attention_bias",),
                          window_switch=True, defaults=(*QWEN_DEFAULTS, ("head_dim", 128))),
}


INT_LIMIT = 2**31  # sizes and ids beyond int32 are no real model's, and overflow torch's kernels


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3") frequency scaling; see `awq_ref.model.rope_frequencies`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if not _is_positive_finite(value) or value >= INT_LIMIT:
                raise ValueError(f"rope_scaling.{name} must be a positive finite number below "
                                 f"2**31, got {_short(value)}")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, the MLP width
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv (GQA when Hkv < H)
    head_dim: int = 0  # Dh; 0 means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    model_type: str = "llama"  # a key of ARCHITECTURES
    # Mistral's window: a query sees the last `sliding_window` positions only. Not implemented:
    # the model refuses sequences longer than it (awq_ref.model), within which it changes nothing.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or self.model_type not in ARCHITECTURES:
            raise ValueError(f"LlamaConfig.model_type must be one of {sorted(ARCHITECTURES)}, "
                             f"got {_short(self.model_type)}")
        arch = ARCHITECTURES[self.model_type]
        window = self.sliding_window
        if window is not None and (not _is_int(window) or not 0 < window < INT_LIMIT
                                   or not arch.window):
            raise ValueError(f"LlamaConfig.sliding_window must be null or (mistral only) a "
                             f"positive integer below 2**31, got {_short(window)}")
        for name in ("attention_bias", "mlp_bias"):
            if name not in arch.bias_keys and getattr(self, name) is not False:
                raise ValueError(f"LlamaConfig: {self.model_type} has no {name} switch; its "
                                 "biases are fixed by its architecture")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings")
        for name in positive:  # head_dim checked after it is derived from checked values
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 and (name != "head_dim" or value != 0) \
                    or value >= INT_LIMIT:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer below 2**31, "
                                 f"got {_short(value)}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            if self.head_dim == 0:
                raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is smaller than "
                                 f"num_attention_heads={self.num_attention_heads}")
        special = () if self.bos_token_id is None else (self.bos_token_id,)
        if not all(_is_int(i) and i >= 0 for i in (*special, *self.eos_token_ids)):
            raise ValueError(f"LlamaConfig: bos/eos token ids must be non-negative integers, got "
                             f"{self.bos_token_id!r} and {self.eos_token_ids!r}")
        if self.bos_token_id is not None and self.bos_token_id >= self.vocab_size:
            # (an EOS past the table is only never generated; a BOS is the first input token)
            raise ValueError(f"LlamaConfig: bos_token_id {self.bos_token_id} is past the "
                             f"vocabulary (vocab_size {self.vocab_size})")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_positive_finite(value):
                raise ValueError(f"LlamaConfig.{name} must be a positive finite number, got "
                                 f"{_short(value)}")

    def weight_count(self) -> int:
        """Elements of the weight matrices and norms (biases left out): a lower bound on what a
        file holding this model stores, checked before anything of that size is built."""
        d, f, dh = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * dh, self.num_key_value_heads * dh
        layer = 2 * d + 2 * d * q + 2 * d * kv + 3 * d * f  # (N, K) of q, o, k, v, gate, up, down
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * d + self.num_hidden_layers * layer + d

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj carry a bias (o_proj: attention_bias)."""
        return self.attention_bias or ARCHITECTURES[self.model_type].qkv_bias

    @property
    def qk_norm(self) -> bool:
        """Whether attention RMS-normalises each head's q and k before RoPE (q_norm, k_norm)."""
        return ARCHITECTURES[self.model_type].qk_norm

    @property
    def n_rep(self) -> int:
        """How many query heads share one KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json content (transformers 4.x style keys) describing this model."""
        d = asdict(self)
        eos = d.pop("eos_token_ids")
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (list(eos) or None)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        model_type = d.pop("model_type")
        arch = ARCHITECTURES[model_type]
        if not arch.window:  # only what the architecture's own config.json has
            del d["sliding_window"]
        for name in ("attention_bias", "mlp_bias"):
            if name not in arch.bias_keys:
                del d[name]
        if arch.window_switch:  # said outright: transformers 4.x warns of a window otherwise
            d.update(use_sliding_window=False, sliding_window=None)
        return {"architectures": [arch.hf_class], "model_type": model_type, **d,
                "hidden_act": "silu"}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Read an HF config.json dict; ValueError naming `source` on anything we can't run."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or []
        if not isinstance(archs, list):
            raise ValueError(f"{source}: architectures must be a list, got {archs!r}")
        model_type = d.get("model_type")
        known = isinstance(model_type, str) and model_type in ARCHITECTURES
        if not known or (archs and archs[0] != ARCHITECTURES[model_type].hf_class):
            raise ValueError(
                f"{source}: unsupported architecture (model_type={_short(model_type)}, "
                f"architectures={_short(archs)}); supported: "
                + ", ".join(f"{t} ({a.hf_class})" for t, a in ARCHITECTURES.items()))
        arch = ARCHITECTURES[model_type]
        d = {**dict(arch.defaults), **d}
        sliding = _sliding_layers(d, arch, source)
        if sliding:
            raise ValueError(f"{source}: layers {_short(sliding)} use sliding-window attention "
                             "(use_sliding_window / max_window_layers / layer_types): sliding-"
                             "window layers are not supported")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' ACT2FN: "swish" is SiLU
            raise ValueError(f"{source}: hidden_act={_short(act)} is not supported (only "
                             "'silu', also named 'swish')")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        theta, scaling = _read_rope(d, source)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=(d["num_attention_heads"] if d.get("num_key_value_heads")
                                     is None else d["num_key_value_heads"]),  # None: MHA; 0: bad
                head_dim=d.get("head_dim") or 0,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=(d.get("attention_bias", False)
                                if "attention_bias" in arch.bias_keys else False),
                mlp_bias=d.get("mlp_bias", False) if "mlp_bias" in arch.bias_keys else False,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                model_type=model_type,
                sliding_window=d.get("sliding_window") if arch.window else None,
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        try:
            d = parse_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        return cls.from_hf_dict(d, source=str(path))


def _sliding_layers(d: dict[str, Any], arch: Architecture, source: str) -> list[int]:
    """The layers whose attention slides, as transformers runs them. Only Qwen's switch makes a
    layer slide (Llama has no window; Mistral's covers every layer and is `sliding_window`):
    with use_sliding_window set and a window, the layers that 5.x's `layer_types` marks, else
    the layers from max_window_layers on (Qwen2Config's default 28); without both, no layer
    slides whatever layer_types says (Qwen2Attention's window is then None)."""
    if not arch.window_switch:
        return []
    if not d.get("use_sliding_window") or d.get("sliding_window") is None:
        return []
    layer_types = d.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ValueError(f"{source}: layer_types must be a list, got {_short(layer_types)}")
        # "attention": the older name transformers maps to full_attention
        return [i for i, kind in enumerate(layer_types)
                if kind not in ("full_attention", "attention")]
    first, count = d.get("max_window_layers", 28), d.get("num_hidden_layers")
    if not (_is_int(first) and _is_int(count)) or not 0 <= count < INT_LIMIT:
        raise ValueError(f"{source}: max_window_layers={_short(first)} and num_hidden_layers="
                         f"{_short(count)} must be integers")
    return list(range(max(first, 0), count))


def _read_rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE's theta and scaling, read as transformers 5 reads them (its
    `convert_rope_params_to_dict`): one object, config.json's rope_scaling (4.x) if set, else
    rope_parameters (5.x); its kind is "rope_type" or the older "type"; a rope_theta inside it
    wins over the top-level one (default 10000); llama3's original_max_position_embeddings
    defaults to max_position_embeddings."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    scaling = d.get(key) or {}
    if not isinstance(scaling, dict):
        raise ValueError(f"{source}: {key} must be an object, got {_short(scaling)}")
    if any(isinstance(v, dict) for v in scaling.values()):
        raise ValueError(f"{source}: {key} per layer type ({_short(list(scaling))}) is not "
                         "supported")
    theta = scaling.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
    scaling = {"original_max_position_embeddings": d.get("max_position_embeddings", 2048),
               **scaling}
    try:
        return theta, RopeScaling(  # checked in RopeScaling.__post_init__
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
    except KeyError as e:
        raise ValueError(f"{source}: llama3 rope scaling lacks field {e}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_finite(value: Any) -> bool:
    try:  # an int past float's range (10**400 in a JSON file) overflows in isfinite
        return _is_number(value) and math.isfinite(value) and value > 0
    except OverflowError:
        return False


def _short(value: Any) -> str:
    """repr of a config value, cut short (a hostile file's 5000-digit number)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
