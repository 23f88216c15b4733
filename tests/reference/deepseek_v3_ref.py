"""PyTorch reference implementation of the DeepSeek-V3 architecture.

The math follows src/model/MODEL.md exactly (that page is the specification shared with the C++
model); the architecture is the published one (DeepSeek-V3 technical report, arXiv 2412.19437, and
DeepSeek's inference/model.py). Parameters carry their Hugging Face names, e.g.
``model.layers.3.self_attn.kv_b_proj.weight``; the MTP module k lives at ``model.layers.{L+k-1}``.

Usage::

    cfg = load_config("configs/deepseek_v3_tiny.yaml", overrides={"model.mtp.depth": 2})
    model = DeepSeekV3(cfg, dtype=torch.float64)
    init_parameters(model, seed=1234)            # std defaults to model.init_method_std
    out = model(tokens)                          # tokens: int64 [B, S + D + 1]
    out["total"].backward()

The module is a plain ``nn.Module``: ``model.parameters()`` feeds ``torch.optim.AdamW`` directly and
the router biases are buffers (``...mlp.gate.e_score_correction_bias``), not parameters.

Requires Debian's ``/usr/bin/python3`` with python3-torch, python3-numpy and python3-yaml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

__all__ = [
    "ModelConfig",
    "load_config",
    "config_from_dict",
    "fnv1a64",
    "splitmix64",
    "normal_scalar",
    "normal_stream",
    "init_values",
    "init_parameters",
    "set_router_biases",
    "router_bias_names",
    "rope_inv_freq",
    "rope_tables",
    "apply_rope",
    "softmax_scale",
    "route",
    "DeepSeekV3",
]

MASK64 = (1 << 64) - 1

# --------------------------------------------------------------------------------------------------
# Configuration (YAML keys of README.md "Configuration"; only the model section matters here)
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_dense_layers: int
    num_heads: int
    ffn_dim: int
    context_length: int
    norm_eps: float
    init_method_std: float
    # model.mla
    d_latent: int
    q_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # model.rope
    rope_theta: float
    rope_scaling: str
    rope_factor: float
    rope_original_context_length: int
    rope_beta_fast: float
    rope_beta_slow: float
    rope_mscale: float
    rope_mscale_all_dim: float
    # model.moe
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    expert_dim: int
    num_groups: int
    topk_groups: int
    score_func: str
    route_scale: float
    norm_topk_prob: bool
    aux_loss_free: bool
    bias_update_speed: float
    seq_aux_alpha: float
    capacity_factor: float
    # model.mtp
    mtp_depth: int
    mtp_loss_weight: float

    @property
    def yarn_active(self) -> bool:
        """YaRN is applied when configured and the context exceeds the original one."""
        return self.rope_scaling == "yarn" and self.context_length > self.rope_original_context_length

    def is_moe_layer(self, layer: int) -> bool:
        """HF layer index -> MoE block? (MTP blocks sit at indices >= num_layers.)"""
        return layer >= self.num_dense_layers

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError("invalid model config: " + msg)

        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        need(0 <= self.num_dense_layers <= self.num_layers, "num_dense_layers must be in [0, num_layers]")
        need(self.score_func in ("sigmoid", "softmax"), "score_func must be sigmoid or softmax")
        need(self.rope_scaling in ("none", "yarn"), "rope.scaling must be none or yarn")
        need(self.mtp_depth >= 0, "mtp.depth must be >= 0")
        if self.num_layers > self.num_dense_layers or self.mtp_depth > 0:
            need(self.num_experts > 0, "num_experts must be > 0")
            need(self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
                 "num_experts must be divisible by num_groups")
            need(1 <= self.topk_groups <= self.num_groups, "topk_groups must be in [1, num_groups]")
            need(self.num_experts_per_token <= self.topk_groups * (self.num_experts // self.num_groups),
                 "top-k not reachable inside the kept groups")


# YAML path -> ModelConfig field
_KEYMAP = {
    "model.vocab_size": "vocab_size",
    "model.d_model": "d_model",
    "model.num_layers": "num_layers",
    "model.num_dense_layers": "num_dense_layers",
    "model.num_heads": "num_heads",
    "model.ffn_dim": "ffn_dim",
    "model.context_length": "context_length",
    "model.norm_eps": "norm_eps",
    "model.init_method_std": "init_method_std",
    "model.mla.d_latent": "d_latent",
    "model.mla.q_lora_rank": "q_lora_rank",
    "model.mla.qk_nope_head_dim": "qk_nope_head_dim",
    "model.mla.qk_rope_head_dim": "qk_rope_head_dim",
    "model.mla.v_head_dim": "v_head_dim",
    "model.rope.theta": "rope_theta",
    "model.rope.scaling": "rope_scaling",
    "model.rope.factor": "rope_factor",
    "model.rope.original_context_length": "rope_original_context_length",
    "model.rope.beta_fast": "rope_beta_fast",
    "model.rope.beta_slow": "rope_beta_slow",
    "model.rope.mscale": "rope_mscale",
    "model.rope.mscale_all_dim": "rope_mscale_all_dim",
    "model.moe.num_experts": "num_experts",
    "model.moe.num_experts_per_token": "num_experts_per_token",
    "model.moe.num_shared_experts": "num_shared_experts",
    "model.moe.expert_dim": "expert_dim",
    "model.moe.num_groups": "num_groups",
    "model.moe.topk_groups": "topk_groups",
    "model.moe.score_func": "score_func",
    "model.moe.route_scale": "route_scale",
    "model.moe.norm_topk_prob": "norm_topk_prob",
    "model.moe.aux_loss_free": "aux_loss_free",
    "model.moe.bias_update_speed": "bias_update_speed",
    "model.moe.seq_aux_alpha": "seq_aux_alpha",
    "model.moe.capacity_factor": "capacity_factor",
    "model.mtp.depth": "mtp_depth",
    "model.mtp.loss_weight": "mtp_loss_weight",
}


def _get_path(d: dict, path: str):
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(path)
        cur = cur[part]
    return cur


def _set_path(d: dict, path: str, value) -> None:
    parts = path.split(".")
    cur = d
    for part in parts[:-1]:
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError("unknown config key '%s'" % path)
        cur = cur[part]
    if not isinstance(cur, dict) or parts[-1] not in cur:
        raise KeyError("unknown config key '%s'" % path)
    cur[parts[-1]] = value


def config_from_dict(raw: dict, overrides: Optional[Dict[str, object]] = None) -> ModelConfig:
    """Builds a ModelConfig from a parsed YAML document; overrides use dotted YAML keys."""
    import copy

    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        _set_path(raw, key, value)
    kwargs = {}
    types = {f.name: f.type for f in fields(ModelConfig)}
    for path, name in _KEYMAP.items():
        value = _get_path(raw, path)
        t = types[name]
        if t in ("int", int):
            value = int(value)
        elif t in ("float", float):
            value = float(value)
        elif t in ("bool", bool):
            value = bool(value)
        elif t in ("str", str):
            value = str(value)
        kwargs[name] = value
    cfg = ModelConfig(**kwargs)
    cfg.validate()
    return cfg


def load_config(path: str, overrides: Optional[Dict[str, object]] = None) -> ModelConfig:
    with open(path, "r", encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return config_from_dict(raw, overrides)


# --------------------------------------------------------------------------------------------------
# Deterministic initialisation (MODEL.md "Parameter names and initialisation")
# --------------------------------------------------------------------------------------------------

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_SM_GAMMA = 0x9E3779B97F4A7C15
_SM_M1 = 0xBF58476D1CE4E5B9
_SM_M2 = 0x94D049BB133111EB


def fnv1a64(name: str) -> int:
    h = _FNV_OFFSET
    for byte in name.encode("utf-8"):
        h ^= byte
        h = (h * _FNV_PRIME) & MASK64
    return h


def splitmix64(x: int) -> int:
    """Scalar splitmix64 finaliser on Python ints (mod 2^64)."""
    x = (x + _SM_GAMMA) & MASK64
    x = ((x ^ (x >> 30)) * _SM_M1) & MASK64
    x = ((x ^ (x >> 27)) * _SM_M2) & MASK64
    return x ^ (x >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 on uint64 arrays (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_SM_GAMMA)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_SM_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_SM_M2)
        return x ^ (x >> np.uint64(31))


def _stream_base(seed: int, name: str) -> int:
    return splitmix64((int(seed) & MASK64) ^ fnv1a64(name))


def normal_scalar(seed: int, name: str, j: int) -> float:
    """Standard normal number j of the stream (seed, name), scalar libm version."""
    base = _stream_base(seed, name)
    u1 = (splitmix64((base + 2 * j) & MASK64) >> 11) * 2.0 ** -53
    u2 = (splitmix64((base + 2 * j + 1) & MASK64) >> 11) * 2.0 ** -53
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


def normal_stream(seed: int, name: str, count: int, first: int = 0) -> np.ndarray:
    """Standard normal numbers first .. first+count-1 of the stream (seed, name), float64."""
    base = np.uint64(_stream_base(seed, name))
    j = np.arange(first, first + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        c = base + np.uint64(2) * j
        r1 = _splitmix64_np(c)
        r2 = _splitmix64_np(c + np.uint64(1))
    u1 = (r1 >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
    u2 = (r2 >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
    return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)


def init_values(seed: int, name: str, shape, std: float, chunk: int = 1 << 22) -> np.ndarray:
    """float32 array of `shape`: element j (row-major) = float32(std * z_j), z_j computed in float64.

    numpy's vectorised log/cos may differ from the C library's in the last bit of a double. That
    only matters when std * z_j lies within a few double ulps of a float32 rounding boundary; such
    elements are recomputed with the scalar libm path (normal_scalar), so the float32 result equals
    the one a plain C implementation (std::log, std::cos) produces.
    """
    std = float(std)
    n = int(np.prod(shape)) if len(shape) else 1
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        cnt = min(chunk, n - start)
        v = std * normal_stream(seed, name, cnt, start)
        lo = (v * (1.0 - 1e-13)).astype(np.float32)
        hi = (v * (1.0 + 1e-13)).astype(np.float32)
        vals = v.astype(np.float32)
        for i in np.nonzero(lo != hi)[0]:
            vals[i] = np.float32(std * normal_scalar(seed, name, start + int(i)))
        out[start:start + cnt] = vals
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------
# RoPE with YaRN (interleaved pairs)
# --------------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """f_i, i < R/2, float64 (MODEL.md "MLA")."""
    R = cfg.qk_rope_head_dim
    theta = cfg.rope_theta
    f = np.array([math.pow(theta, -2.0 * i / R) for i in range(R // 2)], dtype=np.float64)
    if cfg.yarn_active:
        orig = cfg.rope_original_context_length

        def corr(rot: float) -> float:
            return R * math.log(orig / (rot * 2.0 * math.pi)) / (2.0 * math.log(theta))

        low = max(math.floor(corr(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(corr(cfg.rope_beta_slow)), R - 1)
        low = float(low)
        high = float(high)
        if low == high:
            high += 0.001
        i = np.arange(R // 2, dtype=np.float64)
        ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
        smooth = 1.0 - ramp
        f = f / cfg.rope_factor * (1.0 - smooth) + f * smooth
    return f


def rope_tables(cfg: ModelConfig, seq: int) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [seq, R/2]: angles p * f_i in float64, cos/sin rounded to float32."""
    f = rope_inv_freq(cfg)
    p = np.arange(seq, dtype=np.float64)
    ang = p[:, None] * f[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (2i, 2i+1) of x [B, S, H, R] by cos/sin [S, R/2]."""
    shape = x.shape
    xp = x.reshape(*shape[:-1], shape[-1] // 2, 2)
    a = xp[..., 0]
    b = xp[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).reshape(shape)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.yarn_active:
        m = 0.1 * cfg.rope_mscale * math.log(cfg.rope_factor) + 1.0
        scale = scale * m * m
    return scale


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class Linear(nn.Module):
    """y = x W^T, W stored [out, in]; no bias."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class MLA(nn.Module):
    """Multi-head latent attention, explicit (non-absorbed) training form."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        d, H = cfg.d_model, cfg.num_heads
        n, R, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.H, self.n, self.R, self.dv = H, n, R, dv
        self.r_q, self.r_kv = cfg.q_lora_rank, cfg.d_latent
        if self.r_q > 0:
            self.q_a_proj = Linear(d, self.r_q, dtype)
            self.q_a_layernorm = RMSNorm(self.r_q, cfg.norm_eps, dtype)
            self.q_b_proj = Linear(self.r_q, H * (n + R), dtype)
        else:
            self.q_proj = Linear(d, H * (n + R), dtype)
        self.kv_a_proj_with_mqa = Linear(d, self.r_kv + R, dtype)
        self.kv_a_layernorm = RMSNorm(self.r_kv, cfg.norm_eps, dtype)
        self.kv_b_proj = Linear(self.r_kv, H * (n + dv), dtype)
        self.o_proj = Linear(H * dv, d, dtype)
        self.scale = softmax_scale(cfg)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = u.shape
        H, n, R, dv = self.H, self.n, self.R, self.dv
        if self.r_q > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(u)))
        else:
            q = self.q_proj(u)
        q = q.view(B, S, H, n + R)
        q_nope, q_pe = q[..., :n], q[..., n:]
        kv_a = self.kv_a_proj_with_mqa(u)
        c, k_pe = kv_a[..., : self.r_kv], kv_a[..., self.r_kv:]
        kvb = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, S, H, n + dv)
        k_nope, v = kvb[..., :n], kvb[..., n:]
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.view(B, S, 1, R), cos, sin)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(B, S, H, R)), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, .]
        att = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        causal = torch.ones(S, S, dtype=torch.bool, device=u.device).triu(1)
        att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
        o = torch.matmul(att, v).transpose(1, 2).reshape(B, S, H * dv)
        return self.o_proj(o)


class SwiGLU(nn.Module):
    def __init__(self, d: int, width: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = Linear(d, width, dtype)
        self.up_proj = Linear(d, width, dtype)
        self.down_proj = Linear(width, d, dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u))


def route(scores: torch.Tensor, bias: Optional[torch.Tensor], num_groups: int, topk_groups: int,
          top_k: int, norm_topk_prob: bool, route_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k selection (MODEL.md "MoE").

    scores [T, E] (differentiable); bias [E] or None (selection only). Returns idx [T, K] (int64,
    ordered by descending selection score) and weights w [T, K] built from the unbiased scores.
    """
    sel = scores.detach()
    if bias is not None:
        sel = sel + bias
    T, E = sel.shape
    if num_groups > 1:
        gsize = E // num_groups
        grouped = sel.view(T, num_groups, gsize)
        if bias is not None:
            gscore = grouped.topk(min(2, gsize), dim=-1).values.sum(dim=-1)
        else:
            gscore = grouped.amax(dim=-1)
        keep = gscore.topk(topk_groups, dim=-1).indices
        drop = torch.ones(T, num_groups, dtype=torch.bool, device=sel.device).scatter(1, keep, False)
        sel = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(T, E)
    idx = sel.topk(top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * route_scale
    return idx, w


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model, dtype=dtype))
        if cfg.aux_loss_free:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=dtype))
        else:
            self.e_score_correction_bias = None

    def forward(self, u: torch.Tensor):
        """u [T, d] -> (scores [T, E], idx [T, K], w [T, K])."""
        cfg = self.cfg
        logits = F.linear(u, self.weight)
        if cfg.score_func == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        idx, w = route(scores, self.e_score_correction_bias, cfg.num_groups, cfg.topk_groups,
                       cfg.num_experts_per_token, cfg.norm_topk_prob, cfg.route_scale)
        return scores, idx, w


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, B: int, S: int, E: int, K: int,
                          alpha: float) -> torch.Tensor:
    """alpha * mean_b sum_i f_i P_i (MODEL.md "Losses"); scores [B*S, E], idx [B*S, K]."""
    sn = scores / scores.sum(dim=-1, keepdim=True)
    P = sn.view(B, S, E).mean(dim=1)  # [B, E]
    hits = torch.zeros(B * S, E, dtype=scores.dtype, device=scores.device)
    hits.scatter_(1, idx, 1.0)
    f = hits.view(B, S, E).sum(dim=1) * (E / (K * S))  # [B, E], no gradient
    return alpha * (f * P).sum(dim=-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg, dtype)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.expert_dim, dtype) for _ in range(cfg.num_experts))
        if cfg.num_shared_experts > 0:
            self.shared_experts = SwiGLU(cfg.d_model, cfg.num_shared_experts * cfg.expert_dim, dtype)
        else:
            self.shared_experts = None

    def forward(self, u: torch.Tensor):
        """u [B, S, d] -> (y [B, S, d], info dict with scores/idx/w/balance)."""
        cfg = self.cfg
        B, S, d = u.shape
        T = B * S
        x = u.reshape(T, d)
        scores, idx, w = self.gate(x)
        y = torch.zeros_like(x)
        cap = None
        if cfg.capacity_factor > 0:
            cap = int(math.ceil(cfg.capacity_factor * T * cfg.num_experts_per_token / cfg.num_experts))
        counts = torch.bincount(idx.flatten(), minlength=cfg.num_experts)
        for e in range(cfg.num_experts):
            if int(counts[e]) == 0:
                continue
            tok, slot = torch.where(idx == e)  # row-major: ascending token order
            if cap is not None:
                tok, slot = tok[:cap], slot[:cap]
            out = self.experts[e](x[tok]) * w[tok, slot].unsqueeze(-1)
            y = y.index_add(0, tok, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if cfg.seq_aux_alpha > 0:
            bal = sequence_balance_loss(scores, idx, B, S, cfg.num_experts, cfg.num_experts_per_token,
                                        cfg.seq_aux_alpha)
        else:
            bal = torch.zeros((), dtype=u.dtype, device=u.device)
        info = {"scores": scores, "idx": idx, "w": w, "balance": bal, "load": counts.detach()}
        return y.view(B, S, d), info


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.self_attn = MLA(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg, dtype) if self.is_moe else SwiGLU(cfg.d_model, cfg.ffn_dim, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        u = self.post_attention_layernorm(h)
        if self.is_moe:
            y, info = self.mlp(u)
        else:
            y, info = self.mlp(u), None
        return h + y, info


class SharedHead(nn.Module):
    """The MTP module's own final norm; its head is the main lm_head (not a separate parameter)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)


class MTPLayer(Block):
    """MTP module k at HF index L+k-1: enorm, hnorm, eh_proj, shared_head.norm + a full block."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__(cfg, layer, dtype)
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.eh_proj = Linear(2 * cfg.d_model, cfg.d_model, dtype)
        self.shared_head = SharedHead(cfg, dtype)


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, dtype)
        layers: List[nn.Module] = [Block(cfg, l, dtype) for l in range(cfg.num_layers)]
        layers += [MTPLayer(cfg, cfg.num_layers + k, dtype) for k in range(cfg.mtp_depth)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)


class DeepSeekV3(nn.Module):
    """Main model + D MTP modules + losses. forward(tokens [B, S+D+1]) -> dict (see forward)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.model = _Backbone(cfg, dtype)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, dtype)
        self._rope_cache: Dict[Tuple[int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_loads: Dict[int, torch.Tensor] = {}

    def rope(self, seq: int, device: torch.device):
        key = (seq, device)
        if key not in self._rope_cache:
            cos, sin = rope_tables(self.cfg, seq)
            self._rope_cache[key] = (torch.from_numpy(cos).to(device=device, dtype=self.dtype),
                                     torch.from_numpy(sin).to(device=device, dtype=self.dtype))
        return self._rope_cache[key]

    def forward(self, tokens: torch.Tensor, collect: bool = False) -> dict:
        """tokens: integer [B, S + D + 1].

        Returns a dict: total, main, mtp (list of D scalars), balance (scalar), logits [B, S, V],
        mtp_logits (list of D [B, S, V]); with collect=True also hidden ([B, S, d], the last main
        block's output before the final norm) and router ({HF layer: (idx, w, bias)}).
        """
        cfg = self.cfg
        D = cfg.mtp_depth
        tokens = tokens.long()
        B, W = tokens.shape
        S = W - D - 1
        if S <= 0:
            raise ValueError("tokens must be [B, S + D + 1] with S > 0")
        V = cfg.vocab_size
        cos, sin = self.rope(S, tokens.device)
        layers = self.model.layers
        embed = self.model.embed_tokens

        balance = torch.zeros((), dtype=self.dtype, device=tokens.device)
        router = {}
        loads = {}

        def note(layer: int, info):
            nonlocal balance
            if info is None:
                return
            balance = balance + info["balance"]
            loads[layer] = info["load"]
            if collect:
                bias = layers[layer].mlp.gate.e_score_correction_bias
                router[layer] = (info["idx"].detach(), info["w"].detach(),
                                 None if bias is None else bias.detach().clone())

        h = embed(tokens[:, :S])
        for l in range(cfg.num_layers):
            h, info = layers[l](h, cos, sin)
            note(l, info)
        hidden = h
        logits = self.lm_head(self.model.norm(h))
        main = F.cross_entropy(logits.reshape(B * S, V), tokens[:, 1:S + 1].reshape(B * S))

        mtp_losses, mtp_logits = [], []
        hk = hidden
        for k in range(1, D + 1):
            layer = layers[cfg.num_layers + k - 1]
            e = layer.enorm(embed(tokens[:, k:k + S]))
            g = layer.hnorm(hk)
            hp = layer.eh_proj(torch.cat((e, g), dim=-1))
            hk, info = layer(hp, cos, sin)
            note(cfg.num_layers + k - 1, info)
            lk = self.lm_head(layer.shared_head.norm(hk))
            mtp_logits.append(lk)
            mtp_losses.append(F.cross_entropy(lk.reshape(B * S, V), tokens[:, k + 1:k + 1 + S].reshape(B * S)))

        total = main + balance
        if D > 0:
            total = total + (cfg.mtp_loss_weight / D) * torch.stack(mtp_losses).sum()
        self.last_loads = loads
        out = {"total": total, "main": main, "mtp": mtp_losses, "balance": balance,
               "logits": logits, "mtp_logits": mtp_logits}
        if collect:
            out["hidden"] = hidden
            out["router"] = router
        return out

    @torch.no_grad()
    def update_router_biases(self, loads: Optional[Dict[int, torch.Tensor]] = None) -> None:
        """Aux-loss-free balancing step: b_i += speed * sign(mean load - load_i) per MoE layer.

        `loads` defaults to the expert counts of the last forward (sum them over micro-batches and
        ranks before calling for a global-batch update).
        """
        loads = self.last_loads if loads is None else loads
        speed = self.cfg.bias_update_speed
        for layer, load in loads.items():
            bias = self.model.layers[layer].mlp.gate.e_score_correction_bias
            if bias is None:
                continue
            load = load.to(bias.dtype)
            bias.add_(speed * torch.sign(load.mean() - load))


# --------------------------------------------------------------------------------------------------
# Initialisation of a built model
# --------------------------------------------------------------------------------------------------


def router_bias_names(model: DeepSeekV3) -> List[str]:
    return [name for name, _ in model.named_buffers() if name.endswith("mlp.gate.e_score_correction_bias")]


@torch.no_grad()
def init_parameters(model: DeepSeekV3, seed: int, std: Optional[float] = None) -> Dict[str, np.ndarray]:
    """Initialises every parameter by its HF name (RMSNorm weights = 1, router biases = 0).

    Returns {name: float32 numpy array} of the values written (the float32 initial parameters).
    """
    if std is None:
        std = model.cfg.init_method_std
    norm_ids = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    written = {}
    for name, p in model.named_parameters():
        if id(p) in norm_ids:
            vals = np.ones(tuple(p.shape), dtype=np.float32)
        else:
            vals = init_values(seed, name, tuple(p.shape), std)
        p.copy_(torch.from_numpy(vals).to(dtype=p.dtype, device=p.device))
        written[name] = vals
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return written


@torch.no_grad()
def set_router_biases(model: DeepSeekV3, seed: int, std: float) -> Dict[str, np.ndarray]:
    """Sets every router bias to float32(std * z) from the generator under the bias's own name."""
    written = {}
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            vals = init_values(seed, name, tuple(b.shape), std)
            b.copy_(torch.from_numpy(vals).to(dtype=b.dtype, device=b.device))
            written[name] = vals
    return written
