"""A slow, plain NumPy forward pass of the Llama architecture, independent of lmdecode.

Float64 throughout; tensors use lmdecode's engine names (see lmdecode.loaders) as float arrays.
"""
import numpy as np


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, theta, layout, freq_factors=None):
    """x (T, n_heads, hs) rotated by position pos (T,); frequency i divided by freq_factors[i]
    when given (RoPE scaling)."""
    hs = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hs, 2) / hs)  # (hs/2,)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    angle = pos[:, None, None] * inv_freq[None, None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    if layout == "adjacent":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : hs // 2], x[..., hs // 2:]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if layout == "adjacent":
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : hs // 2], out[..., hs // 2:] = ra, rb
    return out


def q8_0_inputs(x):
    """x (..., n) as a q8_0 matmul sees it (lmdecode's ops.h, lmd_dot_q8_0): in blocks of 32, a
    float32 scale amax/127 times the values rounded to nearest even; float64 out."""
    x32 = np.asarray(x, dtype=np.float32)
    blocks = x32.reshape(*x32.shape[:-1], -1, 32)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.float32(1) / np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(blocks * np.where(scale > 0, inv, np.float32(0))), -127, 127)
    return (q.astype(np.float64) * scale).reshape(x32.shape)


def as_f16(x):
    """x as an f16 KV cache holds it: the float32 value rounded to the nearest IEEE half."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


def llama_logits(cfg, w, tokens, quantized_inputs=(), kv_dtype="f32"):
    """cfg: dict of engine hyperparameters; w: engine name -> float array; tokens (T,) -> (T, V).
    Matrices named in quantized_inputs see their inputs as q8_0 storage quantizes them;
    kv_dtype "f16" rounds the keys (after rotary) and values to half precision."""
    T = len(tokens)

    def mm(h, name):
        return (q8_0_inputs(h) if name in quantized_inputs else h) @ w[name].T

    H, KV, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    pos = np.arange(T, dtype=np.float64)
    x = w["token_embedding"][np.asarray(tokens)].astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg["n_layers"]):
        p = f"layers.{l}."
        h = rmsnorm(x, w[p + "attn_norm"], cfg["norm_eps"])
        q = mm(h, p + "wq").reshape(T, H, hs)
        k = mm(h, p + "wk").reshape(T, KV, hs)
        v = mm(h, p + "wv").reshape(T, KV, hs)
        q = rope(q, pos, cfg["rope_theta"], cfg["rope_layout"], w.get("rope_freq_factors"))
        k = rope(k, pos, cfg["rope_theta"], cfg["rope_layout"], w.get("rope_freq_factors"))
        if kv_dtype == "f16":
            k, v = as_f16(k), as_f16(v)
        out = np.empty((T, H, hs))
        for head in range(H):
            kv = head // (H // KV)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hs) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, head] = s @ v[:, kv]
        x = x + mm(out.reshape(T, H * hs), p + "wo")
        h = rmsnorm(x, w[p + "ffn_norm"], cfg["norm_eps"])
        g = mm(h, p + "w_gate")
        u = mm(h, p + "w_up")
        x = x + mm(g / (1 + np.exp(-g)) * u, p + "w_down")
    x = rmsnorm(x, w["final_norm"], cfg["norm_eps"])
    return mm(x, "output")
