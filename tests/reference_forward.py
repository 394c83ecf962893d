"""An independent re-computation of the published Atlas-MAG forward pass (TTL off) and of its Newton–Schulz
iteration, written from the formulas in `../shared/reference/atlas_mag_reference.md` and reading tensors by the
*published checkpoint's* key names.

It uses full T x T masks, explicit loops over the Q-K window and `torch.triu_indices` pairs, so it shares no code
with the model.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, positions, theta=10000.0):
    """x [T, H, D]; rotate-half over all D dims."""
    half = x.shape[-1] // 2
    freqs = torch.tensor([1.0 / theta ** (2 * i / x.shape[-1]) for i in range(half)])
    angles = positions[:, None].float() * freqs[None]  # [T, half]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def newton_schulz(g, steps):
    """The reference doc's Newton–Schulz iteration of one matrix, on X X^T whatever the shape."""
    x = g / (g.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x


def memory(z, sd, prefix, eps=1e-5):
    u = z @ sd[prefix + "proj_down.weight"].T
    rows, cols = torch.triu_indices(u.shape[-1], u.shape[-1])
    phi = torch.cat([u, u[:, rows] * u[:, cols]], dim=-1)
    phi = F.layer_norm(phi, phi.shape[-1:], sd[prefix + "poly_norm.weight"], sd[prefix + "poly_norm.bias"], eps)
    m = phi @ sd[prefix + "poly_compress.weight"].T
    m = F.gelu(m @ sd[prefix + "w2.weight"].T) @ sd[prefix + "w1.weight"].T
    up = m @ sd[prefix + "proj_up.weight"].T
    out = F.layer_norm(up, up.shape[-1:], sd[prefix + "output_norm.weight"], sd[prefix + "output_norm.bias"], eps)
    return sd[prefix + "output_scale"] * out


def reference_logits(sd, ids, n_layers, n_heads, window=512, omega_window=256, omega_decay=0.95):
    """Logits [T, V] of one sequence `ids` [T] from a published-layout state dict `sd` (TTL off)."""
    sd = {k: v.float() for k, v in sd.items()}
    T = ids.shape[0]
    dim = sd["tok_emb.weight"].shape[1]
    head_dim = dim // n_heads
    positions = torch.arange(T)
    x = sd["tok_emb.weight"][ids] + sd["w_init"]
    t_idx, j_idx = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    attn_mask = (j_idx <= t_idx) & (j_idx > t_idx - window)
    for i in range(n_layers):
        p = f"blocks.{i}."
        h = rms_norm(x, sd[p + "norm1.weight"])
        q = (h @ sd[p + "qkv.w_q.weight"].T).view(T, n_heads, head_dim)
        k = (h @ sd[p + "qkv.w_k.weight"].T).view(T, n_heads, head_dim)
        v = (h @ sd[p + "qkv.w_v.weight"].T).view(T, n_heads, head_dim)
        q = rope(rms_norm(q, sd[p + "qkv.q_norm.weight"]), positions)
        k = rope(rms_norm(k, sd[p + "qkv.k_norm.weight"]), positions)
        has_memory = p + "memory.proj_down.weight" in sd
        if has_memory:
            gate_hidden = F.silu(h @ sd[p + "gamma_gate.gate.0.weight"].T)
            gamma = torch.sigmoid(gate_hidden @ sd[p + "gamma_gate.gate.2.weight"].T)[:, 0]
            q_flat, k_flat = q.reshape(T, dim), k.reshape(T, dim)
            m_persistent = sd[p + "qk_memory.m_persistent"]
            norm_persistent = sd[p + "qk_memory.norm_persistent"]
            q_mem = torch.empty(T, dim)
            for t in range(T):
                s_t = torch.zeros(dim)
                n_t = torch.zeros(())
                for j in range(max(0, t - omega_window), t):
                    w = omega_decay ** (t - 1 - j) * gamma[j]
                    s_t = s_t + w * (k_flat[j] @ q_flat[t]) * k_flat[j]
                    n_t = n_t + w * (k_flat[j] @ k_flat[j])
                q_mem[t] = (m_persistent @ q_flat[t] + s_t) / (norm_persistent + n_t + 1e-6)
        scores = torch.einsum("thd,jhd->htj", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        attn = torch.einsum("htj,jhd->thd", scores.softmax(-1), v).reshape(T, dim)
        attn_out = attn @ sd[p + "w_o.weight"].T
        if has_memory:
            x = x + attn_out * torch.sigmoid(memory(q_mem, sd, p + "memory."))
        else:
            x = x + attn_out
        u = rms_norm(x, sd[p + "norm2.weight"])
        ffn = (F.silu(u @ sd[p + "ffn.w1.weight"].T) * (u @ sd[p + "ffn.w2.weight"].T)) @ sd[p + "ffn.w3.weight"].T
        x = x + ffn
    return rms_norm(x, sd["norm_f.weight"]) @ sd["lm_head.weight"].T
