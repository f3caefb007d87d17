"""Scaled rotary embeddings by name: each variant is a function that gives the inverse frequencies.

The rotation itself is the same for every variant (rope.py); what a variant decides is the inverse
frequencies theta_i, and for YaRN a factor on cos and sin. Each variant is one function
``(args, seq_len) -> (inv_freq, attention_scaling)`` registered under its name, as transformers
keeps them in ``ROPE_INIT_FUNCTIONS`` (modeling_rope_utils.py); the model looks one up from
``args.rope_scaling["rope_type"]`` (the loaders map transformers' ``rope_type`` / older ``type``,
Meta's ``use_scaled_rope`` and GGUF's ``rope.scaling.type`` onto that key). Built in:

    default   theta_i = base ** (-2i / d)                                 RoFormer
    linear    theta_i / factor                                            position interpolation
    dynamic   base grows with the length once it passes max_seq_len      dynamic NTK
    llama3    theta_i / factor for long wavelengths, kept for short ones  Llama 3.1
    yarn      per-dimension blend of theta_i and theta_i / factor, and    YaRN
              an attention factor on cos and sin

(d = rotary_dim, i in [0, d/2).) Register your own without editing npllama::

    @npllama.rope_scaling.register("my_variant")
    def my_variant(args, seq_len):
        inv_freq = default_inv_freq(args.rope_theta, args.rotary_dim) / rope_param(args, "factor")
        return inv_freq, 1.0

and put ``"rope_type": "my_variant"`` in the config's rope_scaling. The Torch backend reads the
same registry, so a variant registered once works in both.

Length and the KV cache. ``seq_len`` is one past the largest position the current forward call
rotates. The model calls ``rope_init(args, seq_len)`` once per call and rotates only the new
positions; keys already in the cache were rotated when they were written and keep that rotation.
Only ``dynamic`` depends on seq_len, so only there does a cached run differ from recomputing the
whole sequence (see :func:`rope_dynamic`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .checks import is_number
from .config import ModelArgs
from .errors import ConfigError
from .rope import default_inv_freq

RopeInit = Callable[[ModelArgs, int], "tuple[np.ndarray, float]"]
ROPE_INIT_FUNCTIONS: dict[str, RopeInit] = {}


def register(name: str, *, replace: bool = False) -> Callable[[RopeInit], RopeInit]:
    """Decorator: make ``fn(args, seq_len) -> (inv_freq, attention_scaling)`` the rope variant ``name``.

    inv_freq: (args.rotary_dim // 2,) positive and finite; attention_scaling multiplies cos and
    sin (1.0 for most variants). Registering a name that exists is an error unless replace=True,
    so a plug-in cannot silently change what "llama3" means.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a rope variant needs a non-empty string name, got {name!r}")

    def decorate(fn: RopeInit) -> RopeInit:
        if name in ROPE_INIT_FUNCTIONS and not replace and ROPE_INIT_FUNCTIONS[name] is not fn:
            raise ConfigError(f"rope type {name!r} is already registered; pass replace=True to "
                              f"npllama.rope_scaling.register to override it")
        ROPE_INIT_FUNCTIONS[name] = fn
        return fn
    return decorate


def rope_init(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Look up the variant named by the config and compute its inverse frequencies.

    seq_len: one past the largest position the current forward call rotates (cache length + new
    tokens); only variants that depend on the length (dynamic NTK) use it.
    Returns inv_freq: (rotary_dim // 2,) float64, and the attention scaling applied to cos and sin.
    """
    name = args.rope_type
    try:
        fn = ROPE_INIT_FUNCTIONS[name]
    except KeyError:
        known = ", ".join(sorted(ROPE_INIT_FUNCTIONS))
        raise ConfigError(f"unknown rope type {name!r}; known types: {known} "
                          f"(add one with npllama.rope_scaling.register)") from None
    try:
        inv_freq, scaling = fn(args, int(seq_len))
        inv_freq = np.asarray(inv_freq, dtype=np.float64)
        scaling = float(scaling)
    except ConfigError:
        raise
    except (ArithmeticError, ValueError, TypeError) as e:   # a division by zero, a log of a negative number ...
        raise ConfigError(f"rope type {name!r} cannot compute its frequencies from rope_scaling={args.rope_scaling} "
                          f"and rope_theta={args.rope_theta} ({type(e).__name__}: {e}); check the parameters") from None
    want = (args.rotary_dim // 2,)
    if inv_freq.shape != want:
        raise ConfigError(f"rope type {name!r} returned inv_freq of shape {inv_freq.shape}; "
                          f"rotary_dim {args.rotary_dim} needs {want}")
    if not (np.all(np.isfinite(inv_freq)) and np.all(inv_freq > 0)):
        raise ConfigError(f"rope type {name!r} gave non-finite or non-positive frequencies for "
                          f"rope_scaling={args.rope_scaling} and rope_theta={args.rope_theta}; "
                          f"check the parameters")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ConfigError(f"rope type {name!r} gave attention scaling {scaling!r}; it must be positive")
    return inv_freq, scaling


_REQUIRED = object()


def rope_param(args: ModelArgs, key: str, default=_REQUIRED, positive: bool = False) -> float:
    """The number ``args.rope_scaling[key]`` (a missing or null key gives ``default``).

    Raises ConfigError naming the key when it is required and missing, or not a finite number
    (or, with positive, not above zero: a length or a ratio that a formula divides by).
    """
    value = args.rope_scaling.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"rope type {args.rope_type!r} needs rope_scaling[{key!r}] in the config "
                              f"(got rope_scaling={args.rope_scaling})")
        return default
    try:
        if not is_number(value):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"rope_scaling[{key!r}] must be a number, got {value!r:.80}") from None
    if not math.isfinite(number):
        raise ConfigError(f"rope_scaling[{key!r}] must be finite, got {value!r:.80}")
    if positive and number <= 0:
        raise ConfigError(f"rope_scaling[{key!r}] must be positive for rope type {args.rope_type!r}, got {value!r:.80}")
    return number


def _factor(args: ModelArgs, default=_REQUIRED) -> float:
    factor = rope_param(args, "factor", default)
    if factor is not None and factor <= 0:
        raise ConfigError(f"rope_scaling['factor'] must be positive, got {factor!r}")
    return factor


# ------------------------------------------------------------------------------ the variants
@register("default")
def rope_default(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Standard RoPE: theta_i = rope_theta ** (-2i / d), d = rotary_dim.

    Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. 15.
    """
    return default_inv_freq(args.rope_theta, args.rotary_dim), 1.0


@register("linear")
def rope_linear(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Position interpolation: theta_i / factor.

    Rotating position m by theta_i / factor is rotating position m / factor by theta_i: a context
    of factor x the trained length is squeezed into the trained range of angles.
    Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
    Interpolation" (and kaiokendev's SuperHOT); transformers' ``_compute_linear_scaling_rope_parameters``.
    Parameters: factor.
    """
    return default_inv_freq(args.rope_theta, args.rotary_dim) / _factor(args), 1.0


def dynamic_ntk_base(base: float, factor: float, seq_len: int, max_seq_len: int, dim: int) -> float:
    """base' = base * (factor * L / max_seq_len - (factor - 1)) ** (d / (d - 2)), L = max(seq_len, max_seq_len).

    Equal to base while L <= max_seq_len; grows with L after that ("NTK-aware" scaling: the
    lowest frequency is stretched by about factor * L / max_seq_len, the highest is kept).
    """
    if dim <= 2:
        raise ConfigError(f"dynamic NTK rope needs a rotary dimension above 2 (its exponent is "
                          f"d / (d - 2)), got rotary_dim={dim}")
    length = max(seq_len, max_seq_len)
    return base * ((factor * length / max_seq_len) - (factor - 1)) ** (dim / (dim - 2))


@register("dynamic")
def rope_dynamic(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Dynamic NTK: default frequencies with the base of :func:`dynamic_ntk_base`.

    With L = seq_len (cache length + new tokens) and max_seq_len = max_position_embeddings:
    L <= max_seq_len gives exactly the default frequencies; past it every position of this call
    (old ones included) is rotated with the base for L.

    Source: /u/emozilla and /u/bloc97, "Dynamically Scaled RoPE further increases performance of
    long context LLaMA with zero fine-tuning" (r/LocalLLaMA, 2023); transformers'
    ``_compute_dynamic_ntk_parameters`` (which reads max_position_embeddings, not
    original_max_position_embeddings). Parameters: factor.

    With a KV cache, the base is computed per forward call from that call's L, and keys already
    in the cache keep the rotation they were written with (what transformers' ``generate`` does),
    so a cached run that crosses max_seq_len differs from one full forward over the same tokens.
    docs/rope.md compares this with transformers' stateful rotary module.
    """
    factor = _factor(args)
    base = dynamic_ntk_base(args.rope_theta, factor, seq_len, args.max_seq_len, args.rotary_dim)
    return default_inv_freq(base, args.rotary_dim), 1.0


@register("llama3")
def rope_llama3(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Llama 3.1 scaling: by wavelength lambda_i = 2 pi / theta_i against the original context.

        lambda_i < old_ctx / high_freq_factor     keep theta_i                (high frequencies)
        lambda_i > old_ctx / low_freq_factor      theta_i / factor            (low frequencies)
        otherwise                                 (1 - s) theta_i / factor + s theta_i,
                                                  s = (old_ctx / lambda_i - low_freq_factor)
                                                      / (high_freq_factor - low_freq_factor)

    s runs from 0 to 1 across the middle band, so the result is continuous in lambda.
    old_ctx = original_max_position_embeddings (default max_position_embeddings, as transformers).
    Source: Meta's ``apply_scaling`` in llama3 / llama-models (factor 8, low 1, high 4,
    old_ctx 8192 for Llama 3.1; factor 32 for Llama 3.2); transformers' ``_compute_llama3_parameters``.
    Parameters: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings.
    """
    factor = _factor(args)
    low = rope_param(args, "low_freq_factor", positive=True)
    high = rope_param(args, "high_freq_factor", positive=True)
    old_ctx = rope_param(args, "original_max_position_embeddings", args.max_seq_len, positive=True)
    inv_freq = default_inv_freq(args.rope_theta, args.rotary_dim)
    wavelen = 2 * math.pi / inv_freq
    with np.errstate(divide="ignore", invalid="ignore"):   # the middle band is empty when high == low
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > old_ctx / low, inv_freq / factor,
                   np.where(wavelen < old_ctx / high, inv_freq, blended))
    return out, 1.0


def yarn_correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: float) -> float:
    """The (fractional) frequency index i whose wavelength fits num_rotations times in max_seq_len.

    Solves max_seq_len / (2 pi base ** (2i / dim)) = num_rotations for i (theta_i, i in [0, dim/2)).
    """
    return (dim * math.log(max_seq_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          max_seq_len: float, truncate: bool = True) -> tuple[float, float]:
    """(low, high): the ramp starts at beta_fast rotations and ends at beta_slow, clipped to [0, dim-1].

    truncate: floor low and ceil high to whole indices (the YaRN paper and transformers' default).
    """
    low = yarn_correction_dim(beta_fast, dim, base, max_seq_len)
    high = yarn_correction_dim(beta_slow, dim, base, max_seq_len)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_linear_ramp(low: float, high: float, n: int) -> np.ndarray:
    """gamma_i = clip((i - low) / (high - low), 0, 1) for i in [0, n); high == low is nudged by 0.001."""
    if low == high:
        high += 0.001
    return np.clip((np.arange(n, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(scale) + 1 for scale > 1, else 1 (YaRN's "sqrt(1/t)", eq. 22)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@register("yarn")
def rope_yarn(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """YaRN: NTK-by-parts interpolation plus an attention factor.

    Each frequency index i gets a blend of the original theta_i (extrapolation) and theta_i / factor
    (interpolation) by how many turns its wavelength makes in the original context
    (old_ctx = original_max_position_embeddings):

        gamma_i = clip((i - low) / (high - low), 0, 1)          (yarn_linear_ramp)
        inv_freq_i = theta_i * (1 - gamma_i) + theta_i / factor * gamma_i

    low, high = the indices where a wavelength fits beta_fast (default 32) and beta_slow (default
    1) times in old_ctx (yarn_correction_range; floored/ceiled unless truncate is false). Below
    low: fast dimensions keep their frequency; above high: slow ones are interpolated.

    Attention factor (multiplies cos and sin, so attention logits scale by its square):
    attention_factor if given; else with mscale and mscale_all_dim both set (DeepSeek),
    get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim); else
    get_mscale(factor) = 0.1 ln(factor) + 1.

    factor defaults to max_position_embeddings / old_ctx when null; old_ctx defaults to
    max_position_embeddings. Source: Peng et al. 2023, "YaRN: Efficient Context Window Extension
    of Large Language Models" (sec. 3.2-3.4); transformers' ``_compute_yarn_parameters``.
    Parameters: factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor,
    mscale, mscale_all_dim, truncate.
    """
    d, base = args.rotary_dim, args.rope_theta
    if base <= 1:
        raise ConfigError(f"rope type 'yarn' needs rope_theta above 1 (its ramp divides by log(rope_theta)), "
                          f"got {base!r}")
    old_ctx = rope_param(args, "original_max_position_embeddings", args.max_seq_len, positive=True)
    factor = _factor(args, None)
    if factor is None:
        factor = args.max_seq_len / old_ctx
    attention_factor = rope_param(args, "attention_factor", None)
    if attention_factor is None:
        mscale = rope_param(args, "mscale", None)
        mscale_all_dim = rope_param(args, "mscale_all_dim", None)
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    # `or`: like transformers, a 0 (or null) beta means the default
    beta_fast = rope_param(args, "beta_fast", None) or 32.0
    beta_slow = rope_param(args, "beta_slow", None) or 1.0
    if beta_fast < 0 or beta_slow < 0:
        raise ConfigError(f"rope_scaling's beta_fast and beta_slow must be positive (rotations), got "
                          f"{beta_fast!r} and {beta_slow!r}")
    truncate = bool(args.rope_scaling.get("truncate", True))   # transformers: a null is false

    inv_freq = default_inv_freq(base, d)                     # extrapolation: theta_i
    low, high = yarn_correction_range(beta_fast, beta_slow, d, base, old_ctx, truncate)
    gamma = yarn_linear_ramp(low, high, d // 2)             # 0: keep, 1: interpolate
    return inv_freq * (1 - gamma) + (inv_freq / factor) * gamma, attention_factor


def context_window(args: ModelArgs) -> int:
    """How many positions the model may run: max_seq_len, or factor x max_seq_len where the variant
    exists to run past the trained context (dynamic NTK, whose base grows with the length)."""
    if args.rope_type == "dynamic":
        return max(args.max_seq_len, int(args.max_seq_len * _factor(args)))
    return args.max_seq_len
