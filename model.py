"""
model.py: GPT-2 and Llama-style transformers in plain PyTorch, with a named, empty steering slot at
every site of every block. GPT-2 (Radford et al., 2019): pre-LayerNorm blocks, learned positions,
a 4x MLP with tanh-GELU, tied embeddings, GPT-2's module names so its weights load key for key.
A few GPTConfig switches make a Llama-family block instead (Touvron et al., 2023; SmolLM2 is one):
RMSNorm, rotary positions, grouped-query attention, a gated SiLU MLP, no biases. The slots are the
"sites" of Adila et al., 2026 (THEORY.md §1). Imports nothing of ours; other people's checkpoint
formats live in formats/checkpoints.py.
"""
import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.checks import check_config, check_names_and_shapes, exact_dtype, regular_file
from machinery.files import save_torch, write_atomically

# The places inside a block where a shift can be added, in the order the data flows through them,
# and the paper's names for three of them (pre-MLP, post-MLP, post-block).
SITES = ("attn_out", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "block_out")
ALIASES = {"pre_mlp": "attn_out", "post_mlp": "mlp_out", "post_block": "block_out"}  # the paper's names


def resolve_site(site):
    """A site name or one of the paper's aliases -> the site name."""
    site = ALIASES.get(site, site) if isinstance(site, str) else site
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: choose one of {', '.join(SITES)} "
                         f"(or the paper's names {', '.join(ALIASES)})")
    return site


@dataclass
class GPTConfig:
    block_size: int = 128    # longest sequence (the learned position table has this many rows)
    vocab_size: int = 257    # 257 = 256 bytes + <|endoftext|> (GPT-2's BPE has 50257)
    n_layer: int = 4         # number of blocks
    n_head: int = 4          # attention (query) heads per block
    n_embd: int = 128        # residual stream width d
    dropout: float = 0.0     # dropout on attention weights and on each residual branch
    bias: bool = True        # biases in Linear layers and LayerNorms, as in GPT-2 (Llama: none)
    mlp: str = "gelu"        # "gelu": GPT-2's MLP; "glu": gated MLP with a SiLU gate (THEORY §4)
    mlp_width: int = 0       # the MLP's hidden width; 0 means GPT-2's 4·n_embd (SmolLM2: 1536)
    n_kv_head: int = 0       # key/value heads; fewer than n_head is grouped-query attention; 0 = n_head
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama: scale only, no mean, no bias)
    norm_eps: float = 1e-5   # the epsilon inside every norm
    pos: str = "learned"     # "learned": a position table wpe (GPT-2); "rotary": rotate q, k (Llama)
    rope_theta: float = 10000.0  # rotary base θ: pair i of a head turns by t·θ^(−2i/head_dim)
    tie_embeddings: bool = True  # lm_head shares its weight with wte

    def __post_init__(self):
        check_config(self)   # every field, in one line each: a bad config never reaches a tensor

    @property
    def d_mlp(self):         # the MLP's hidden width, the width of the mlp_hidden site
        return self.mlp_width or 4 * self.n_embd


def make_norm(config):
    """The one place that chooses the norm: LayerNorm (x − mean)/std·w + b, or RMSNorm x/rms(x)·w."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


@functools.lru_cache(maxsize=8)   # every layer's q and k ask for the same angles: computed once
def rotary_angles(t0, T, hs, theta, device):
    """cos and sin of t·θ^(−2i/hs) for t = t0 .. t0 + T − 1: (T, hs/2) each, in float32."""
    with torch.inference_mode(False):   # kept: an inference tensor could not serve a later backward
        freq = theta ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
        angle = torch.arange(t0, t0 + T, device=device, dtype=torch.float32)[:, None] * freq
        return angle.cos(), angle.sin()


def rotary(x, theta, t0=0):
    """Rotary position embedding (Su et al., 2021) in the Hugging Face Llama layout: at positions
    t = t0 .. t0+T−1 of x (B, nh, T, hs), a head's pair (x_i, x_{i+hs/2}) turns by t·θ^(−2i/hs)."""
    T, hs = x.shape[-2], x.shape[-1]
    cos, sin = (c.to(x.dtype) for c in rotary_angles(t0, T, hs, theta, x.device))
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Slot(nn.Module):
    """One steering site. Empty, it returns its input untouched; holding a shift Δ, it returns
    s + Δ(s). While `recording` is on it also keeps the value it passed on (see nanosteer.capture)."""

    def __init__(self):
        super().__init__()
        self.shift = None        # a module computing Δ(s), set by nanosteer.steer
        self.recording = False
        self.activation = None

    def forward(self, s):
        if self.shift is not None:
            s = s + self.shift(s)
        if self.recording:
            self.activation = s
        return s


class KVCache:
    """An attention layer's keys and values so far, so that a new token needs only its own q, k, v:
    (B, nkv, size, hs) buffers, made in k's dtype at the first add, filled in place to `length`."""

    def __init__(self, size):
        self.size, self.length, self.k, self.v = size, 0, None, None

    def add(self, k, v):                                    # k, v (B, nkv, T, hs): the new tokens'
        t0, T = self.length, k.shape[2]
        if t0 and T > 1:   # the attention's mask serves a prompt into an empty cache, or one token
            raise ValueError("a KVCache takes the prompt first, then one token at a time")
        if self.k is None:
            self.k = k.new_empty(k.shape[0], k.shape[1], self.size, k.shape[3])
            self.v = torch.empty_like(self.k)
        self.k[:, :, t0:t0 + T], self.v[:, :, t0:t0 + T] = k, v
        self.length = t0 + T
        return self.k[:, :, :t0 + T], self.v[:, :, :t0 + T]        # (B, nkv, t0 + T, hs): all so far


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_size = config.n_embd // config.n_head
        self.rope_theta = config.rope_theta if config.pos == "rotary" else None
        self.dropout = config.dropout
        kv_width = self.n_kv_head * self.head_size                  # < n_embd with grouped-query attention
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        kv_width = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)                   # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)                # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # v: the values (not a steer)
        t0 = 0 if cache is None else cache.length       # with a KVCache, x holds the new tokens
        if self.rope_theta is not None:
            q, k = rotary(q, self.rope_theta, t0), rotary(k, self.rope_theta, t0)
        if cache is not None:
            k, v = cache.add(k, v)                      # (B, nkv, T_k, hs): T_k = t0 + T tokens
        dropout_p = self.dropout if self.training else 0.0
        # with n_kv_head < n_head, query head i attends with key/value head i // (n_head / n_kv_head)
        # T = T_k: causal. One new query sees every key: no mask (is_causal is top-left: key 0 only)
        heads = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T == k.shape[2],
                                               enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        heads = heads.transpose(1, 2).contiguous().view(B, T, C)                         # side by side
        return self.resid_dropout(self.c_proj(heads))


def gelu(u):
    # GPT-2's GELU, the tanh approximation: 0.5 u (1 + tanh(sqrt(2/π) (u + 0.044715 u³))).
    # torch's fused kernel computes exactly this formula (tests/test_model.py checks it), faster.
    return F.gelu(u, approximate="tanh")


def gelu_prime(u):
    # d/du of the model's own GELU, for THEORY §4 (equivalence.py, the notebooks; not the model):
    # ½(1 + t) + ½u(1 − t²)·√(2/π)(1 + 3·0.044715u²), t = tanh(√(2/π)(u + 0.044715u³))
    c, t = (2.0 / math.pi) ** 0.5, torch.tanh((2.0 / math.pi) ** 0.5 * (u + 0.044715 * u ** 3))
    return 0.5 * (1 + t) + 0.5 * u * (1 - t ** 2) * c * (1 + 3 * 0.044715 * u ** 2)


class MLP(nn.Module):
    """gelu: m = gelu(W_fc h + b_fc).  glu: m = silu(W_gate h) ⊙ (W_fc h)  (THEORY §4; Llama's
    gate_proj is c_gate, up_proj c_fc, down_proj c_proj). Either way y = W_proj m + b_proj. The two
    halves are separate methods so that Block.forward can put the mlp_hidden slot between them."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.mlp == "glu"
        self.c_fc = nn.Linear(config.n_embd, config.d_mlp, bias=config.bias)
        if self.gated:
            self.c_gate = nn.Linear(config.n_embd, config.d_mlp, bias=config.bias)
        self.c_proj = nn.Linear(config.d_mlp, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def hidden(self, h):                      # h (B, T, C) -> m (B, T, d_mlp)
        if self.gated:
            return F.silu(self.c_gate(h)) * self.c_fc(h)
        return gelu(self.c_fc(h))

    def project(self, m):                     # m (B, T, d_mlp) -> y (B, T, C)
        return self.dropout(self.c_proj(m))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.slots = nn.ModuleDict({site: Slot() for site in SITES})

    def forward(self, x, cache=None):
        # THEORY §1, one line per site; an empty slot passes its input through.
        a = self.slots["attn_out"](self.attn(self.ln_1(x), cache))     # (B, T, C)
        p = self.slots["resid_mid"](x + a)                              # (B, T, C)
        h = self.slots["mlp_in"](self.ln_2(p))                          # (B, T, C)
        m = self.slots["mlp_hidden"](self.mlp.hidden(h))                # (B, T, d_mlp)
        y = self.slots["mlp_out"](self.mlp.project(m))                  # (B, T, C)
        z = self.slots["block_out"](p + y)                              # (B, T, C)
        return z

    def probe(self, x, site, shift=None):
        """self(x) with `shift` in the slot at `site` for this call only -> (output, activation at
        site). The model never calls it; equivalence.py and the notebooks use it to probe one site."""
        slot = self.slots[site]
        slot.shift, slot.recording = shift, True
        try:
            z = self(x)
            return z, slot.activation
        finally:                                  # empty again, even if the forward raised
            slot.shift, slot.recording, slot.activation = None, False, None


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":                        # rotary positions need no table
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **parts,                                       # GPT-2's order, so a seed gives GPT-2's init
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2 and SmolLM2
        self.init_weights()

    def init_weights(self):
        """GPT-2's init: every Linear and Embedding weight ~ N(0, 0.02²), biases 0, norm weights 1
        (LayerNorm bias 0); the projections that write into the residual stream (attn.c_proj,
        mlp.c_proj) ~ N(0, (0.02/sqrt(2·n_layer))²) so the stream's variance does not grow with depth."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)

    def embed(self, idx, t0=0):
        """Token (plus, for GPT-2, position) embeddings of idx (B, T) at positions t0 .. t0+T−1."""
        x = self.transformer.wte(idx)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(t0, t0 + idx.shape[1], device=idx.device))
        return self.transformer.drop(x)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), None). With targets (B, T): the logits
        only where the target is not -1, (N, vocab) in row order, and their mean cross-entropy.
        (The head is a vocab x C matmul a position: 21% of SmolLM2's forward, on positions a
        loss never reads unless we skip them.)"""
        x = self.features(idx)                                           # (B, T, C)
        if targets is None:
            return self.lm_head(x), None                                 # (B, T, vocab)
        keep = targets != -1
        logits = self.lm_head(x[keep])                                   # (N, vocab)
        # the mean over N targets, written as sum / N so that a batch with no target at all
        # (N = 0) has loss 0 and zero gradients instead of 0/0 = NaN
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return logits, loss / keep.sum().clamp(min=1)

    def features(self, idx, caches=None):
        """idx (B, T) -> the last norm's output (B, T, C), what lm_head reads (caches: stream's)."""
        B, T = idx.shape
        if caches is not None and len(caches) != len(self.transformer.h):
            raise ValueError(f"{len(caches)} caches for {len(self.transformer.h)} blocks: give one KVCache a block")
        t0 = 0 if caches is None else caches[0].length
        if t0 + T > self.config.block_size:
            raise ValueError(f"sequence of {t0 + T} tokens is longer than block_size {self.config.block_size}")
        if ((idx < 0) | (idx >= self.config.vocab_size)).any():
            raise ValueError(f"token ids must lie in 0..{self.config.vocab_size - 1} (the vocabulary), "
                             f"got {idx.min().item()}..{idx.max().item()}")
        x = self.embed(idx, t0)                                          # (B, T, C)
        for block, cache in zip(self.transformer.h, caches or [None] * len(self.transformer.h)):
            x = block(x, cache)
        return self.transformer.ln_f(x)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop=()):
        """idx (B, T) followed by the tokens of self.stream(...): (B, T + the new tokens)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, stop)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop=()):
        """Continue idx (B, T) by at most max_new_tokens tokens, yielding each (B, 1) as it comes.
        temperature 0 means greedy. stop: token ids that end a row (the model's end of turn); a row
        that has ended repeats its stop token, and generation ends when every row has. A KVCache
        per block: the prompt runs once, then each step its new token only. Whatever sits in the
        slots acts at every position, each alone, so the cache holds what a full forward computes.
        Past block_size the window slides: the model sees the last block_size tokens from position
        0, every kept token moves, so each step past the edge refills the caches from the window."""
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature}")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"top_k must be a whole number ≥ 1 (or None: every token), got {top_k!r}")
        stop = torch.tensor(sorted(stop), dtype=torch.long, device=idx.device)
        ended = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        size = min(idx.shape[1] + max_new_tokens, self.config.block_size)  # the most a cache holds
        for step in range(max_new_tokens):
            if step == 0 or idx.shape[1] > self.config.block_size:        # start, or past the edge
                caches = [KVCache(size) for _ in self.transformer.h]
            new = idx[:, caches[0].length:][:, -self.config.block_size:]  # (B, T'): not cached yet
            x = self.features(new, caches)[:, -1]                        # (B, C): the last position
            logits = self.lm_head(x)                                      # only it predicts (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)             # greedy
            else:
                logits = logits / temperature                             # < 1 sharpens, > 1 flattens
                if top_k is not None:                                     # keep the k most likely tokens
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            next_id = torch.where(ended[:, None], idx[:, -1:], next_id)   # an ended row repeats its stop
            idx = torch.cat([idx, next_id], dim=1)
            ended |= torch.isin(next_id[:, 0], stop)
            yield next_id
            if len(stop) and ended.all():
                break

    # ----------------------------------------------------------------------------------------
    # saving and loading our own checkpoints (other formats: formats/checkpoints.py)

    def save(self, path, tokenizer="bytes"):
        """Write config + weights + the tokenizer's name (checkpoints.load reads it) to path, via a
        temporary file and a rename, so a crash never leaves half a checkpoint behind. Only a bare
        model is saved: adapters go to their own file (adapters.save) or into the weights first."""
        with torch.device("meta"):                                   # the bare model's names, no memory
            bare = set(GPT(self.config).state_dict())
        extra = [k for k in self.state_dict() if k not in bare]
        if extra:
            raise ValueError(f"this model holds adapters ({len(extra)} tensors such as {extra[0]}): save "
                             "them with adapters.save, or merge/fold them into the weights first")
        payload = dict(config=asdict(self.config), model=self.state_dict(), tokenizer=tokenizer)
        write_atomically(path, lambda tmp: save_torch(payload, tmp))

    @classmethod
    def load(cls, path):
        """Our own checkpoint, written by GPT.save (other people's: formats/checkpoints.py). Returns the
        model; its tokenizer's name is in model.tokenizer_name (checkpoints.load makes the tokenizer)."""
        regular_file(path)                    # a FIFO or a device would block torch.load
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no code runs
        except Exception as e:  # a file that is not a torch checkpoint fails in many different ways
            raise ValueError(f"{path} is not a nanosteer model checkpoint ({type(e).__name__})") from None
        if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("config", "model"))):
            raise ValueError(f"{path} is not a nanosteer model checkpoint (no config/model)")
        try:
            config = GPTConfig(**ckpt["config"])
        except (TypeError, ValueError) as e:  # a field we do not know, or out of its range
            raise ValueError(f"{path} does not match its own config: {e}") from None
        state, dtype = ckpt["model"], exact_dtype(ckpt["model"], path)   # float64 stays float64, never rounded
        with torch.device("meta"):                    # the names and shapes it must hold, no memory spent
            check_names_and_shapes(state, cls(config).state_dict(), f"{path} does not match its own config")
        if config.tie_embeddings and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
            raise ValueError(f"{path}: its config ties lm_head to wte, but it holds two different tensors: damaged")
        model = cls(config).to(dtype)
        model.load_state_dict(state)
        model.tokenizer_name = ckpt.get("tokenizer", "bytes")  # no field: the built-in byte tokenizer
        if not isinstance(model.tokenizer_name, str):
            raise ValueError(f"{path}: its tokenizer field is not a name ({type(model.tokenizer_name).__name__})")
        return model
