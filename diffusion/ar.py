"""Class-conditional autoregressive generator over token indices (SPEC.md §6), model only.

Built like LlamaGen's c2i GPT: the class embedding is the first (prefix) token, replaced by
a learned null class with probability ``class_dropout`` in training (classifier-free
guidance); pre-norm causal transformer with RMSNorm, SwiGLU and rotary positions; KV cache
for sampling; temperature, top-k, top-p and CFG on logits. One class, three shapes, set by
the tokenizer's facts (``diffusion.samplers.choose_family``), not by its name:

- ``vocab_sizes=(V,)``, ``positions=(h, w)``: raster order over one index map, 2D RoPE
  (LlamaGen on VQGAN tokens);
- ``vocab_sizes=(V1, ..., VK)``, ``head_depth >= 1``: FQGAN's factorized AR (FAR). The
  backbone input at a position is ``Linear(concat(embed_k(sub-token k)))``; a small causal
  transformer (the "AR head") runs per position over ``[h_i, embed_1(s_1), ...,
  embed_{K-1}(s_{K-1})]`` and its output j predicts sub-token j with its own linear, so
  sub-token j sees the backbone context and sub-tokens < j of the same position only;
- ``positions=(L,)``: a 1D ordered sequence with 1D RoPE (FlexTok's registers). Any prefix
  length k <= L can be trained (``forward`` on ``tokens[..., :k]``) and sampled
  (``generate(num_positions=k)``).

Tokens are ``(B, K, N)`` int64: K sub-tokens (codebooks) per position, N positions in
generation order. API::

    model = ClassConditionalAR(vocab_sizes=(16384,), positions=(16, 16), num_classes=1000)
    logits = model(tokens, y)                          # list of K tensors (B, N, V_k)
    tokens = model.generate(y, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)

Differences from the reference code, on purpose: the class token gets the identity
rotation (LlamaGen's table gives it cos = sin = 0, i.e. zero query and key); the AR head
uses 1D RoPE over sub-token index (FAR reuses the first K rows of the backbone's 2D table);
sampling draws by inverse CDF from given uniforms so a sample does not depend on which
batch it was drawn in.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.blocks import Rope2D, SwiGLU, apply_rope, swiglu_hidden

PerCodebook = float | int | Sequence[float] | Sequence[int]


# -- positions ---------------------------------------------------------------------------------
def rope_1d(head_dim: int, length: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape (length, head_dim // 2): pair p of every head rotates by
    ``position * theta^(-p / (head_dim / 2))`` (adjacent channels form a pair)."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    return angles.cos().float(), angles.sin().float()


def rope_with_prefix(cos: Tensor, sin: Tensor, prefix: int = 1) -> tuple[Tensor, Tensor]:
    """Prepend ``prefix`` identity rows (cos 1, sin 0) for the class token(s)."""
    one = torch.ones(prefix, cos.shape[1])
    return torch.cat([one, cos]), torch.cat([torch.zeros_like(one), sin])


# -- layers --------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of the tokens seen so far, one per attention layer."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class CausalAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}.")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        """x (B, n, D) are the next n tokens; ``rope`` their (cos, sin) rows; with a cache,
        they attend to every cached token and causally among themselves."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)
        m = k.shape[2]
        if n == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif m == n:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(n, m, dtype=torch.bool, device=x.device).tril(diagonal=m - n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class CausalBlock(nn.Module):
    """Pre-norm block: RMSNorm, causal attention, RMSNorm, SwiGLU (LlamaGen's TransformerBlock)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = CausalAttention(dim, heads, dropout)
        self.norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.dropout(self.mlp(self.norm2(x)))


# -- sampling ------------------------------------------------------------------------------------
def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits outside the top-k / the top-p nucleus set to -inf (0 and 1.0 switch them off).
    The nucleus keeps the most likely tokens until their probability reaches top_p, at
    least one token."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """One token per row of ``logits`` (B, V) by inverse CDF at ``uniforms`` (B,) in [0, 1)."""
    logits = filter_logits(logits.float() / max(float(temperature), 1e-5), top_k, top_p)
    cdf = logits.softmax(-1).cumsum(-1)
    index = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1:].squeeze(1)).unsqueeze(1), right=True)
    return index.squeeze(1).clamp_max(logits.shape[-1] - 1)


def guide_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits, ``u + s (c - u)``; s = 1 returns c."""
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


def per_codebook(value: PerCodebook, k: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * k
    values = list(value)
    if len(values) != k:
        raise ValueError(f"{name} has {len(values)} entries for {k} codebooks. Fix: one value, or one per codebook.")
    return values


# -- the model -------------------------------------------------------------------------------------
class ClassConditionalAR(nn.Module):
    def __init__(self, vocab_sizes: Sequence[int], positions: Sequence[int], num_classes: int,
                 hidden: int = 768, depth: int = 12, heads: int = 12, head_depth: int = 0,
                 mlp_ratio: float = 4.0, class_dropout: float = 0.1, dropout: float = 0.0,
                 token_dropout: float = 0.0, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 init_std: float = 0.02):
        super().__init__()
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.positions = tuple(int(p) for p in positions)
        self.num_codebooks = len(self.vocab_sizes)
        if self.num_codebooks > 1 and head_depth < 1:
            raise ValueError(f"{self.num_codebooks} codebooks per position need the factorized AR head. "
                             "Fix: set head_depth >= 1 (FQGAN FAR-B uses 3).")
        if len(self.positions) not in (1, 2):
            raise ValueError(f"positions must be (length,) or (height, width), got {self.positions}.")
        self.length = int(torch.tensor(self.positions).prod())
        self.num_classes, self.null_class, self.class_dropout = num_classes, num_classes, class_dropout
        head_dim = hidden // heads

        self.class_embed = nn.Embedding(num_classes + 1, hidden)  # last row: the null class (CFG)
        self.token_embed = nn.ModuleList(nn.Embedding(v, hidden) for v in self.vocab_sizes)
        self.aggregate = nn.Linear(self.num_codebooks * hidden, hidden) if self.num_codebooks > 1 else None
        self.token_dropout = nn.Dropout(token_dropout)
        self.blocks = nn.ModuleList(CausalBlock(hidden, heads, mlp_ratio, dropout, norm_eps) for _ in range(depth))
        self.head_blocks = nn.ModuleList(CausalBlock(hidden, heads, mlp_ratio, dropout, norm_eps)
                                         for _ in range(head_depth))
        self.norm = nn.RMSNorm(hidden, eps=norm_eps)
        self.outputs = nn.ModuleList(nn.Linear(hidden, v, bias=False) for v in self.vocab_sizes)

        if len(self.positions) == 2:
            cos, sin = Rope2D(head_dim, rope_theta)(*self.positions)
        else:
            cos, sin = rope_1d(head_dim, self.length, rope_theta)
        cos, sin = rope_with_prefix(cos, sin)
        self.register_buffer("rope_cos", cos, persistent=False)  # row 0: the class token
        self.register_buffer("rope_sin", sin, persistent=False)
        head_cos, head_sin = rope_1d(head_dim, self.num_codebooks, rope_theta)
        self.register_buffer("head_cos", head_cos, persistent=False)
        self.register_buffer("head_sin", head_sin, persistent=False)
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for out in self.outputs:  # LlamaGen zero-initialises the output layer
            nn.init.zeros_(out.weight)

    # -- pieces ---------------------------------------------------------------------------------
    def drop_labels(self, y: Tensor) -> Tensor:
        drop = torch.rand(y.shape, device=y.device) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def embed_positions(self, tokens: Tensor) -> Tensor:
        """(B, K, n) sub-tokens -> (B, n, D) backbone inputs."""
        parts = [emb(tokens[:, j]) for j, emb in enumerate(self.token_embed)]
        return parts[0] if self.aggregate is None else self.aggregate(torch.cat(parts, dim=-1))

    def rope(self, start: int, n: int) -> tuple[Tensor, Tensor]:
        return self.rope_cos[start:start + n], self.rope_sin[start:start + n]

    def backbone(self, x: Tensor, start: int, caches: list[KVCache] | None = None) -> Tensor:
        """Sequence positions ``start .. start + n - 1`` (0 = class token) -> hidden states."""
        x = self.token_dropout(x)
        rope = self.rope(start, x.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches is not None else None)
        return x

    def head(self, context: Tensor, sub_tokens: Tensor) -> list[Tensor]:
        """Logits of every sub-token from the backbone context (M, D) and the teacher-forced
        sub-tokens (M, K') (K' <= K - 1): K' + 1 tensors (M, V_j)."""
        if not self.head_blocks:
            return [self.outputs[0](self.norm(context))]
        parts = [context] + [self.token_embed[j](sub_tokens[:, j]) for j in range(sub_tokens.shape[1])]
        x = torch.stack(parts, dim=1)
        rope = (self.head_cos[: x.shape[1]], self.head_sin[: x.shape[1]])
        for block in self.head_blocks:
            x = block(x, rope)
        x = self.norm(x)
        return [self.outputs[j](x[:, j]) for j in range(x.shape[1])]

    # -- training -------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, y: Tensor, drop_labels: bool | None = None) -> list[Tensor]:
        """Teacher-forced logits: K tensors (B, n, V_k) for tokens (B, K, n), n <= length;
        position i's logits depend on the class and on positions < i only."""
        b, k, n = tokens.shape
        if k != self.num_codebooks or not 1 <= n <= self.length:
            raise ValueError(f"tokens must be (B, {self.num_codebooks}, n <= {self.length}), got {tuple(tokens.shape)}.")
        if (self.training if drop_labels is None else drop_labels) and self.class_dropout > 0:
            y = self.drop_labels(y)
        x = torch.cat([self.class_embed(y)[:, None], self.embed_positions(tokens[:, :, :-1])], dim=1)
        context = self.backbone(x, 0).reshape(b * n, -1)
        sub_tokens = tokens[:, :-1].permute(0, 2, 1).reshape(b * n, k - 1)
        return [logits.view(b, n, -1).float() for logits in self.head(context, sub_tokens)]

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, y: Tensor, num_positions: int | None = None, cfg_scale: PerCodebook = 1.0,
                 temperature: PerCodebook = 1.0, top_k: PerCodebook = 0, top_p: PerCodebook = 1.0,
                 uniforms: Tensor | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, return_logits: bool = False):
        """Tokens (B, K, n) for labels y, n = ``num_positions`` (default: all).

        Each sub-token is drawn by inverse CDF at ``uniforms[:, i, j]`` ((B, n, K), default
        drawn from ``generator``); CFG batches the conditional and null-class branches and
        both continue with the token drawn from the guided logits. ``use_cache=False``
        recomputes the whole prefix at every position (the reference for the KV cache).
        ``return_logits`` also returns the guided logits, K tensors (B, n, V_k)."""
        n = self.length if num_positions is None else int(num_positions)
        if not 1 <= n <= self.length:
            raise ValueError(f"num_positions={num_positions} must lie in 1..{self.length}.")
        k, b = self.num_codebooks, y.shape[0]
        scales = per_codebook(cfg_scale, k, "cfg_scale")
        temps, tops_k, tops_p = (per_codebook(v, k, name) for v, name in
                                 ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p")))
        if uniforms is None:
            uniforms = torch.rand((b, n, k), generator=generator, device=y.device if generator is None else "cpu")
        uniforms = uniforms.to(y.device)
        guided = any(s != 1.0 for s in scales)
        labels = torch.cat([y, torch.full_like(y, self.null_class)]) if guided else y
        caches = [KVCache() for _ in self.blocks] if use_cache else None

        tokens = torch.zeros((b, k, n), dtype=torch.long, device=y.device)
        kept: list[list[Tensor]] = [[] for _ in range(k)]
        inputs = self.class_embed(labels)[:, None]  # everything fed to the backbone so far (no cache)
        for i in range(n):
            if use_cache:
                step_in = inputs if i == 0 else self.embed_positions(tokens[:, :, i - 1:i].repeat(1 + guided, 1, 1))
                context = self.backbone(step_in, i, caches)[:, -1]
            else:
                if i > 0:
                    step = self.embed_positions(tokens[:, :, i - 1:i].repeat(1 + guided, 1, 1))
                    inputs = torch.cat([inputs, step], dim=1)
                context = self.backbone(inputs, 0)[:, -1]
            for j in range(k):
                sub = tokens[:, :j, i].repeat(1 + guided, 1)
                logits = self.head(context, sub)[j].float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = guide_logits(cond, uncond, float(scales[j]))
                tokens[:, j, i] = draw(logits, uniforms[:, i, j], temps[j], int(tops_k[j]), float(tops_p[j]))
                if return_logits:
                    kept[j].append(logits)
        if return_logits:
            return tokens, [torch.stack(v, dim=1) for v in kept]
        return tokens
