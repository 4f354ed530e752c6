"""A slow, plain NumPy forward pass of the Llama architecture, independent of lmdecode.

Float64 throughout; tensors use lmdecode's engine names (see lmdecode.loaders) as float arrays.
"""
import numpy as np


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, theta, layout):
    """x (T, n_heads, hs) rotated by position pos (T,)."""
    hs = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hs, 2) / hs)  # (hs/2,)
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


def llama_logits(cfg, w, tokens):
    """cfg: dict of engine hyperparameters; w: engine name -> float array; tokens (T,) -> (T, V)."""
    T = len(tokens)
    H, KV, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    pos = np.arange(T, dtype=np.float64)
    x = w["token_embedding"][np.asarray(tokens)].astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg["n_layers"]):
        p = f"layers.{l}."
        h = rmsnorm(x, w[p + "attn_norm"], cfg["norm_eps"])
        q = (h @ w[p + "wq"].T).reshape(T, H, hs)
        k = (h @ w[p + "wk"].T).reshape(T, KV, hs)
        v = (h @ w[p + "wv"].T).reshape(T, KV, hs)
        q = rope(q, pos, cfg["rope_theta"], cfg["rope_layout"])
        k = rope(k, pos, cfg["rope_theta"], cfg["rope_layout"])
        out = np.empty((T, H, hs))
        for head in range(H):
            kv = head // (H // KV)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hs) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, head] = s @ v[:, kv]
        x = x + out.reshape(T, H * hs) @ w[p + "wo"].T
        h = rmsnorm(x, w[p + "ffn_norm"], cfg["norm_eps"])
        g = h @ w[p + "w_gate"].T
        u = h @ w[p + "w_up"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "w_down"].T
    x = rmsnorm(x, w["final_norm"], cfg["norm_eps"])
    return x @ w["output"].T
