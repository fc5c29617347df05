"""
model.py: GPT-2 in plain PyTorch, with a named, empty steering slot at every site of every block.
GPT-2's architecture (Radford et al., 2019): pre-LayerNorm blocks, learned positions, fused qkv
attention, a 4x MLP with tanh-GELU, tied embeddings; GPT-2's module names, so its weights load key
for key. The slots are the "sites" of Adila et al., 2026 (THEORY.md §1). Imports nothing of ours.
"""
import json
import math
import os
import urllib.request
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The places inside a block where a shift can be added, in the order the data flows through them,
# and the paper's names for three of them (pre-MLP, post-MLP, post-block).
SITES = ("attn_out", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "block_out")
ALIASES = {"pre_mlp": "attn_out", "post_mlp": "mlp_out", "post_block": "block_out"}  # the paper's names


def resolve_site(site):
    """A site name or one of the paper's aliases -> the site name."""
    site = ALIASES.get(site, site)
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: choose one of {', '.join(SITES)} "
                         f"(or the paper's names {', '.join(ALIASES)})")
    return site


def check_layers(model, layers):
    """None -> every layer; an int or a list of ints -> that list, if those layers exist."""
    n_layer = model.config.n_layer
    layers = range(n_layer) if layers is None else [layers] if isinstance(layers, int) else layers
    bad = [layer for layer in layers if not 0 <= layer < n_layer]
    if bad or not layers:
        raise ValueError(f"layers {bad or list(layers)} do not exist: this model has layers 0..{n_layer - 1}")
    return list(layers)


@dataclass
class GPTConfig:
    block_size: int = 128    # longest sequence the position embedding covers
    vocab_size: int = 257    # 257 = 256 bytes + <|endoftext|> (GPT-2's BPE has 50257)
    n_layer: int = 4         # number of blocks
    n_head: int = 4          # attention heads per block
    n_embd: int = 128        # residual stream width d (the MLP is 4d wide)
    dropout: float = 0.0     # dropout on attention weights and on each residual branch
    bias: bool = True        # biases in Linear layers and LayerNorms, as in GPT-2
    mlp: str = "gelu"        # "gelu": GPT-2's MLP; "glu": gated MLP with a SiLU gate (THEORY §4)


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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                       # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def gelu(u):
    # GPT-2's GELU, the tanh approximation: 0.5 u (1 + tanh(sqrt(2/π) (u + 0.044715 u³))).
    # torch's fused kernel computes exactly this formula (tests/test_model.py checks it), faster.
    return F.gelu(u, approximate="tanh")


def gelu_prime(u):
    # d/du of the tanh GELU: ½(1 + t) + ½u(1 − t²)·√(2/π)(1 + 3·0.044715u²), t = tanh(√(2/π)(u + 0.044715u³))
    c, t = (2.0 / math.pi) ** 0.5, torch.tanh((2.0 / math.pi) ** 0.5 * (u + 0.044715 * u ** 3))
    return 0.5 * (1 + t) + 0.5 * u * (1 - t ** 2) * c * (1 + 3 * 0.044715 * u ** 2)


class MLP(nn.Module):
    """gelu: m = gelu(W_fc h + b_fc).  glu: m = silu(W_gate h) ⊙ (W_fc h)  (THEORY §4).
    Either way the output is y = W_proj m + b_proj; Block.forward applies c_proj itself so that
    the hidden site m has a slot of its own."""

    def __init__(self, config):
        super().__init__()
        assert config.mlp in ("gelu", "glu"), f"unknown mlp {config.mlp!r}: use 'gelu' or 'glu'"
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        if config.mlp == "glu":
            self.c_gate = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def hidden(self, h):
        if hasattr(self, "c_gate"):
            return F.silu(self.c_gate(h)) * self.c_fc(h)
        return gelu(self.c_fc(h))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.slots = nn.ModuleDict({site: Slot() for site in SITES})

    def forward(self, x):
        # THEORY §1, one line per site; an empty slot passes its input through.
        a = self.slots["attn_out"](self.attn(self.ln_1(x)))            # (B, T, C)
        r = self.slots["resid_mid"](x + a)                              # (B, T, C)
        h = self.slots["mlp_in"](self.ln_2(r))                          # (B, T, C)
        m = self.slots["mlp_hidden"](self.mlp.hidden(h))                # (B, T, 4C)
        y = self.slots["mlp_out"](self.mlp.dropout(self.mlp.c_proj(m)))  # (B, T, C)
        z = self.slots["block_out"](r + y)                              # (B, T, C)
        return z

    def run(self, x, site, shift=None):
        """self(x) with `shift` in the slot at `site` for this call only -> (output, activation at site)."""
        slot = self.slots[site]
        slot.shift, slot.recording = shift, True
        z = self(x)
        s, slot.shift, slot.recording, slot.activation = slot.activation, None, False, None  # empty again
        return z, s


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.init_weights()

    def init_weights(self):
        """GPT-2's init: every Linear and Embedding weight ~ N(0, 0.02²), biases 0, LayerNorms
        weight 1 / bias 0; the projections that write into the residual stream (attn.c_proj,
        mlp.c_proj) ~ N(0, (0.02/sqrt(2·n_layer))²) so the stream's variance does not grow with depth."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def embed(self, idx):
        """Token plus position embeddings: the residual stream entering block 0."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab). With targets (B, T), also the mean
        cross-entropy over the positions whose target is not -1."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x = self.embed(idx)                                              # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))                  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens. Whatever sits in the slots acts at every
        position, prompt and generated tokens alike. temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    # ----------------------------------------------------------------------------------------
    # saving and loading whole models

    def save(self, path, **extra):
        """Write config + weights (+ extra fields such as the tokenizer name) to path, via a
        temporary file and a rename, so a crash never leaves half a checkpoint behind."""
        payload = dict(config=asdict(self.config), model=self.state_dict(), **extra)
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A checkpoint written by GPT.save (a file), a directory in the Hugging Face GPT-2 layout
        (config.json + model.safetensors or pytorch_model.bin), or one of the names gpt2,
        gpt2-medium, gpt2-large, gpt2-xl (downloaded once into ~/.cache/nanosteer)."""
        if os.path.isfile(name_or_path):
            try:
                ckpt = torch.load(name_or_path, map_location="cpu", weights_only=True)  # no code runs
            except Exception as e:  # a file that is not a torch checkpoint fails in many different ways
                raise ValueError(f"{name_or_path} is not a nanosteer model checkpoint ({type(e).__name__})") from None
            if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
                raise ValueError(f"{name_or_path} is not a nanosteer model checkpoint (no config/model)")
            try:
                model = cls(GPTConfig(**ckpt["config"]))
                model.load_state_dict(ckpt["model"])
            except (TypeError, RuntimeError) as e:  # an unknown config field; tensors of other shapes
                detail = str(e).strip().splitlines()[-1].strip()
                raise ValueError(f"{name_or_path} does not match its own config: {detail}") from None
            return model
        if not os.path.isdir(name_or_path):
            if name_or_path not in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
                raise ValueError(f"{name_or_path} is no file, directory or GPT-2 model name")
            name_or_path = download_gpt2(name_or_path)
        return load_hf_gpt2(cls, name_or_path)


def download_gpt2(name):
    """Fetch config.json and model.safetensors of a GPT-2 model from the Hugging Face hub, once."""
    folder = os.path.join(os.path.expanduser("~/.cache/nanosteer"), name)
    os.makedirs(folder, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        target = os.path.join(folder, file)
        if os.path.exists(target):
            continue
        try:
            urllib.request.urlretrieve(f"https://huggingface.co/{name}/resolve/main/{file}", target + ".tmp")
        except OSError as e:
            raise ValueError(f"could not download {name} ({e}); offline, pass a local directory in the "
                             "Hugging Face GPT-2 layout instead") from None
        os.replace(target + ".tmp", target)
    return folder


def read_safetensors(path):
    """The safetensors format: 8 bytes little-endian header size, a JSON header mapping each name
    to its dtype, shape and byte range, then the raw bytes. A dozen lines, no code execution."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in dtypes:
            continue
        start, end = info["data_offsets"]
        flat = torch.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]) if end > start else torch.zeros(0)
        tensors[name] = flat.reshape(info["shape"]).float()
    return tensors


def load_hf_gpt2(cls, folder):
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} is not a Hugging Face GPT-2 directory (no config.json)")
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        sd_hf = read_safetensors(os.path.join(folder, "model.safetensors"))
    else:
        sd_hf = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    model = cls(config)
    sd = model.state_dict()
    missing = {k for k in sd if k != "lm_head.weight"}
    # HF's GPT-2 uses Conv1D layers whose weights are stored (in, out): transpose them for nn.Linear.
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for key, tensor in sd_hf.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers, and the output head that is tied to wte
        ours = "transformer." + key
        if ours not in sd:
            raise ValueError(f"{folder}: unexpected tensor {key!r} for a GPT-2 model")
        tensor = tensor.t() if key.endswith(conv1d) else tensor
        if tensor.shape != sd[ours].shape:
            raise ValueError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(sd[ours].shape)}")
        with torch.no_grad():
            sd[ours].copy_(tensor)
        missing.discard(ours)
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {sorted(missing)[0]} (and {len(missing) - 1} more)")
    return model
