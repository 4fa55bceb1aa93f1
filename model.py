"""model.py: one decoder-only transformer for the LLaMA, Baichuan, Baichuan2 and Aquila families.

    RMSNorm -> attention (RoPE or ALiBi, multi-head or grouped-query) -> RMSNorm -> SwiGLU, repeated; no biases.

The families differ only in numbers (ModelArgs) and in a few switches: pos_emb='alibi' for the 13B Baichuans,
norm_head and z_loss for Baichuan2. The hot ops live in kernels.py. Transformer.from_checkpoint loads a checkpoint
dir (config.json + safetensors, memory-mapped); convert.py writes them and owns every other on-disk format.

    from model import Transformer, PRESETS
    model = Transformer(PRESETS["tiny"])
    logits, loss = model(idx, targets)
"""

import contextlib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from support.checks import check_model_args, ranged
from support.quant import NF4Linear
from support import lora_checks, weights
from support.weights import CheckpointError, load_tensors


# Sizes have upper bounds far past any published model: a garbled size is refused here, before it overflows a
# tensor's size or loops building layers; whether a model fits a device is checked before allocating it.
@dataclass
class ModelArgs:
    dim: int = ranged(4096, "[1, 2**20]")
    n_layers: int = ranged(32, "[1, 2**16]")
    n_heads: int = ranged(32, "[1, 2**16]")
    n_kv_heads: Optional[int] = ranged(None, "[1, 2**16]")  # None: multi-head attention; fewer: grouped-query
    vocab_size: int = ranged(32000, "[1, 2**31)")
    hidden_dim: int = ranged(11008, "[1, 2**22]")  # SwiGLU inner width
    norm_eps: float = ranged(1e-6, "(0, 1)")
    max_seq_len: int = ranged(2048, "[1, 2**24]")
    rope_theta: float = ranged(10000.0, "(0, inf)")
    pos_emb: str = "rope"  # 'rope' | 'alibi'
    tie_embeddings: bool = False
    norm_head: bool = False  # Baichuan2: output rows L2-normalised in every forward
    z_loss: float = ranged(0.0, "[0, inf)")  # Baichuan2's max-z loss weight
    init_std: float = ranged(0.02, "[0, inf)")  # weights from scratch: Normal(0, init_std) (HF's initializer_range)
    init_scaled_residual: bool = True  # wo, w2 at init_std / sqrt(2 n_layers) as GPT-2; False: init_std (FlagAI)

    def __post_init__(self):
        check_model_args(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Published configurations. Parameter counts (tests/test_model.py checks them) are those of the released weights.
PRESETS = {
    # https://huggingface.co/huggyllama/llama-7b/blob/main/config.json  (6,738,415,616 parameters)
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000),
    # https://huggingface.co/huggyllama/llama-13b/blob/main/config.json  (13,015,864,320)
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000),
    # https://huggingface.co/baichuan-inc/Baichuan-7B/blob/main/config.json  (7,000,559,616)
    "baichuan-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=64000, max_seq_len=4096),
    # https://huggingface.co/baichuan-inc/Baichuan-13B-Base/blob/main/config.json  (13,264,901,120; ALiBi)
    "baichuan-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, hidden_dim=13696, vocab_size=64000,
                              max_seq_len=4096, pos_emb="alibi"),
    # https://huggingface.co/baichuan-inc/Baichuan2-7B-Base/blob/main/config.json  (7,505,973,248; NormHead)
    "baichuan2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=125696,
                              max_seq_len=4096, norm_head=True),
    # https://huggingface.co/baichuan-inc/Baichuan2-13B-Base/blob/main/config.json  (13,896,668,160; ALiBi, NormHead)
    "baichuan2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, hidden_dim=13696, vocab_size=125696,
                               max_seq_len=4096, pos_emb="alibi", norm_head=True),
    # https://huggingface.co/BAAI/Aquila-7B/blob/main/config.json  (7,295,537,152; byte-level BPE, eps 1e-5)
    "aquila-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=100008, norm_eps=1e-5),
    # tests: small enough for a CPU in milliseconds, GQA so every path is exercised
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=512, max_seq_len=128),
    # bench.py's workload
    "bench-llama": ModelArgs(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, vocab_size=32000, max_seq_len=256),
}


@dataclass(frozen=True)
class Family:
    """What one model family is outside its numbers: how Hugging Face names it, and how its chat models talk."""
    architectures: tuple  # config.json "architectures" meaning this family; the first is what an export writes
    model_type: str       # config.json "model_type"
    presets: tuple        # the PRESETS of this family
    chat_template: str    # built-in chat template (prepare.TEMPLATES) for a checkpoint that ships none
    generation: dict      # sampling settings of its published chat models (sample.py --chat)
    vocab_size: Optional[int] = None  # a vocabulary that tells it apart from a family with the same architecture
    config_keys: tuple = ()           # config.json keys only this family writes


FAMILIES = {
    "llama": Family(("LlamaForCausalLM",), "llama", ("llama-7b", "llama-13b", "tiny", "bench-llama"), "llama-2",
                    # Llama-2-*-chat-hf generation_config.json (top_k 0 = off)
                    dict(temperature=0.6, top_k=None, top_p=0.9, repetition_penalty=1.0)),
    "baichuan": Family(("BaiChuanForCausalLM", "BaichuanForCausalLM"), "baichuan", ("baichuan-7b", "baichuan-13b"),
                       "baichuan",
                       # Baichuan-13B-Chat generation_config.json (Baichuan-7B has no official chat model: the same)
                       dict(temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.1)),
    # Baichuan2 shares Baichuan's architecture name: its vocabulary and its z-loss setting tell them apart
    "baichuan2": Family(("BaichuanForCausalLM", "BaiChuanForCausalLM"), "baichuan", ("baichuan2-7b", "baichuan2-13b"),
                        "baichuan2",
                        # Baichuan2-{7,13}B-Chat generation_config.json
                        dict(temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.05),
                        vocab_size=125696, config_keys=("z_loss_weight",)),
    "aquila": Family(("AquilaForCausalLM", "AquilaModel"), "aquila", ("aquila-7b",), "aquila",
                     # FlagAI's AquilaChat examples: predict(..., top_p=0.95, topk=100, temperature=0.9)
                     dict(temperature=0.9, top_k=100, top_p=0.95, repetition_penalty=1.0)),
}
PRESET_FAMILY = {preset: name for name, family in FAMILIES.items() for preset in family.presets}


# --------------------------------------------------------------------------------------------------------------------
# the network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose matmul is kernels.linear (bf16 on a CPU without bf16 units runs on its fp32 units)."""

    def forward(self, x):
        return kernels.linear(x, self.weight) if self.bias is None else super().forward(x)


class KVCache(nn.Module):
    """Preallocated keys and values, (B, n_kv_heads, max_seq_len, head_dim): decoding never reallocates."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k, v):
        B, _, T, _ = k.shape
        if start_pos + T > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; asked for {start_pos + T}")
        self.k[:B, :, start_pos : start_pos + T] = k
        self.v[:B, :, start_pos : start_pos + T] = v
        return self.k[:B, :, : start_pos + T], self.v[:B, :, : start_pos + T]

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows start:stop, sharing this one's memory."""
        view = KVCache(0, self.k.size(1), 0, self.k.size(3), self.k.dtype, self.k.device)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        return view


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # ALiBi slopes live with the heads they belong to, so tensor parallelism can slice them with wq
        self.register_buffer("alibi_slopes", torch.empty(args.n_heads) if args.pos_emb == "alibi" else None,
                             persistent=False)
        self.heads = slice(None)  # the heads this module computes: all, or a tensor-parallel rank's share
        self.cache: Optional[KVCache] = None
        self.wqkv: Optional[LoRA] = None  # one LoRA adapter across [wq; wk; wv] (Baichuan's W_pack), see apply_lora

    def forward(self, x, cos, sin, start_pos=0, key_padding_mask=None, doc_ids=None, alibi_bias=None):
        """x (B, T, dim); cos, sin: RoPE tables of these positions, or alibi_bias (ALiBi); start_pos: the cache position
        of x's first token; key_padding_mask, doc_ids: which keys each query may see (see Transformer.forward)."""
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.wqkv is not None:  # the fused adapter's update, split like its rows
            dq, dk, dv = self.wqkv(x).split([q.size(-1), k.size(-1), v.size(-1)], dim=-1)
            q, k, v = q + dq, k + dk, v + dv
        q = q.view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = v.view(B, T, -1, self.head_dim)
        if cos is not None:
            q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if self.cache is not None:  # keys and values of every position so far: (B, n_kv_heads, start_pos + T, head_dim)
            k, v = self.cache.update(start_pos, k, v)
        y = kernels.attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes, alibi_bias=alibi_bias,
                              key_padding_mask=key_padding_mask, doc_ids=doc_ids, q_start=start_pos)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, **attn_kwargs):
        h = x + self.attention(self.attention_norm(x), cos, sin, **attn_kwargs)
        return h + self.feed_forward(self.ffn_norm(h))


class NormHead(nn.Linear):
    """Baichuan2's output layer: every row of the weight is L2-normalised before use, which steadies training."""

    def forward(self, x):
        return kernels.linear(x, F.normalize(self.weight, dim=-1))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        head = NormHead if args.norm_head else Linear
        self.output = None if args.tie_embeddings else head(args.dim, args.vocab_size, bias=False)
        rope = args.pos_emb == "rope"
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim) if rope else None,
                             persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim) if rope else None,
                             persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_buffers(self):
        """(Re)compute the non-persistent tables, e.g. after building on the meta device."""
        a = self.args
        if self.rope_cos is not None:
            positions = torch.arange(a.max_seq_len, device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = kernels.rope_cos_sin(positions, a.head_dim, a.rope_theta)
        for layer in self.layers:
            if layer.attention.alibi_slopes is not None:
                slopes = kernels.alibi_slopes(a.n_heads)[layer.attention.heads]
                layer.attention.alibi_slopes = slopes.to(layer.attention.alibi_slopes.device)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std) weights; residual projections (wo, w2) scaled by 1/sqrt(2 * n_layers) as in GPT-2
        unless init_scaled_residual is off."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p)
        self.init_buffers()

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor):
        std = self.args.init_std
        if p.dim() == 1:  # norm gains
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")) and self.args.init_scaled_residual:
            nn.init.normal_(p, std=std / math.sqrt(2 * self.args.n_layers))
        else:
            nn.init.normal_(p, std=std)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None, keep=False):
        """Preallocate a KV cache for incremental decoding of up to batch_size sequences of max_seq_len tokens.
        keep: the present cache's keys and values stay, in its rows and positions (a batch that grows)."""
        a = self.args
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            old, layer.attention.cache = layer.attention.cache, KVCache(
                batch_size, a.kv_heads, max_seq_len, a.head_dim, dtype or weight.dtype, device or weight.device)
            if keep and old is not None:
                B, _, S, _ = old.k.shape
                layer.attention.cache.k[:B, :, :S], layer.attention.cache.v[:B, :, :S] = old.k, old.v

    @contextlib.contextmanager
    def cache_rows(self, start: int, stop: int):
        """Within it the KV cache is rows start:stop of the present one, the same memory: a prompt is prefilled
        into its own row of a batch that is decoding."""
        caches = [layer.attention.cache for layer in self.layers]
        try:
            for layer, cache in zip(self.layers, caches):
                layer.attention.cache = cache.rows(start, stop)
            yield
        finally:
            for layer, cache in zip(self.layers, caches):
                layer.attention.cache = cache

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def forward(self, idx, targets=None, *, loss_mask=None, start_pos=0, positions=None, key_padding_mask=None,
                doc_ids=None, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        targets (B, T): next tokens, -100 ignored; loss_mask (B, T): 0 = not counted. start_pos: where idx starts in
        the KV cache. positions (B|1, T): RoPE positions (default start_pos + arange(T); with doc_ids they restart at
        every document). key_padding_mask (B, start_pos + T): True for real tokens. doc_ids (B, T): packed documents.
        last_only (no targets): logits (B, 1, vocab) of the last position only, all a prefill samples from.
        """
        B, T = idx.shape
        cos = sin = None
        if positions is None and doc_ids is None:  # consecutive positions: the tables' rows are a view, no gather
            if self.rope_cos is not None:
                rows = slice(start_pos, start_pos + T)
                cos, sin = self.rope_cos[None, rows, None], self.rope_sin[None, rows, None]  # (1, T, 1, D)
        else:
            if positions is None:
                positions = _doc_positions(doc_ids)
            if self.rope_cos is not None:
                cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]  # (B|1, T, 1, D)
        h = self.tok_embeddings(idx)
        alibi_bias = self._alibi_bias(h, T, start_pos, key_padding_mask, doc_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos=start_pos, key_padding_mask=key_padding_mask, doc_ids=doc_ids,
                      alibi_bias=alibi_bias)
        h = self.norm(h)
        if last_only:  # the head on one position: a 4,096-token prefill's logits are ~1 GiB on Baichuan2's vocabulary
            h = h[:, [-1], :]
        head = self._plain_head_weight() if targets is not None and torch.is_grad_enabled() else None
        if head is not None:  # training: the loss straight from h, the full logits never built (fast, less memory)
            return None, kernels.linear_cross_entropy(h, head, targets, loss_mask, self.args.z_loss)
        logits = kernels.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        loss = None if targets is None else kernels.cross_entropy(logits, targets, loss_mask, self.args.z_loss)
        return logits, loss

    def _alibi_bias(self, h, T, start_pos, key_padding_mask, doc_ids) -> Optional[torch.Tensor]:
        """ALiBi: the attention bias of this forward, built once and shared by every layer (see kernels)."""
        slopes = self.layers[0].attention.alibi_slopes
        if slopes is None:
            return None
        return kernels.alibi_attention_bias(slopes, kernels.compute_dtype(h), self.args.head_dim, T, start_pos + T,
                                            start_pos, key_padding_mask=key_padding_mask, doc_ids=doc_ids,
                                            device=h.device)

    def _plain_head_weight(self) -> Optional[torch.Tensor]:
        """The output layer's weight when it is a plain matrix (not tensor-parallel, NF4 or adapted), else None."""
        head = self.output
        if head is not None and (type(head) not in (Linear, NormHead) or head._forward_hooks or head._forward_pre_hooks):
            return None
        weight = self.tok_embeddings.weight if head is None else head.weight
        if type(weight) not in (torch.Tensor, nn.Parameter):  # a DTensor: sharded on the vocabulary
            return None
        return F.normalize(weight, dim=-1) if isinstance(head, NormHead) else weight

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = count_weights(self)
        if exclude_embedding and self.output is not None:  # a tied embedding is also the output layer: keep it
            n -= self.tok_embeddings.weight.numel()
        return n

    @classmethod
    def from_checkpoint(cls, path, device=None, dtype=None) -> "Transformer":
        """Load a checkpoint dir: built on the meta device, weights memory-mapped and assigned, never copied twice."""
        args, _ = read_config(path)
        with torch.device("meta"):
            model = cls(args)
        tensors = load_tensors(path)
        weights.check_checkpoint_tensors(path, tensors, model.state_dict())
        state = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for k, t in tensors.items()}
        model.load_state_dict(state, assign=True)
        model.materialize_buffers(model.tok_embeddings.weight.device)
        return model

    def materialize_buffers(self, device):
        """Buffers of a model built on the meta device (rotary tables, ALiBi slopes, ...) made real on `device` and
        filled; weights are the caller's to assign first."""
        for mod in self.modules():
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None and buf.is_meta:
                    setattr(mod, name, torch.empty_like(buf, device=device))
        self.init_buffers()


def _doc_positions(doc_ids):
    """Positions that restart at 0 where a new document starts: doc_ids (B, T) -> (B, T)."""
    T = doc_ids.size(1)
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


# --------------------------------------------------------------------------------------------------------------------
# LoRA and QLoRA: train small low-rank adapters beside frozen (optionally 4-bit) base weights

LORA_DEFAULT_TARGETS = "wq,wk,wv,wo,w1,w2,w3"  # every linear layer but the output head


def count_weights(module: nn.Module) -> int:
    """Weights of a module (wrapped by FSDP or compile too), those quantised layers hold as buffers included."""
    return sum(p.numel() for p in module.parameters()) + sum(
        m.in_features * m.out_features for m in module.modules() if getattr(m, "quantized", False))


class LoRA(nn.Module):
    """A low-rank update scale * B A dropout(x), B zero at start; scale = alpha / rank. On its own it is the
    adapter across the fused q/k/v projection (Attention.wqkv: one A shared by q, k and v, one B with their rows)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises; B = 0 keeps y = base(x)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return kernels.linear(kernels.linear(self.dropout(x), self.lora_a.to(x.dtype)),
                              self.lora_b.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b.float() @ self.lora_a.float())


class LoRALinear(LoRA):
    """y = base(x) + (alpha / rank) * B A dropout(x), with the base frozen and B zero at start (so y = base(x))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, rank, alpha, dropout, device=_device_of(base))
        self.base = base

    def forward(self, x):
        return self.base(x) + super().forward(x)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight.float() + self.delta_weight()


def _device_of(linear: nn.Module) -> torch.device:
    return linear.nf4_packed.device if isinstance(linear, NF4Linear) else linear.weight.device


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]


def apply_lora(model: Transformer, rank: int, alpha: float, dropout: float = 0.0,
               targets: str = LORA_DEFAULT_TARGETS, quantize_base: bool = False, fill=None) -> list[str]:
    """Freeze the model, optionally store its block linears in NF4 (QLoRA), and wrap the target linears in adapters.

    targets: comma-separated patterns matched (fnmatch) against a linear layer's full name or its last part, e.g.
    "wq,wv", "*.attention.*", "layers.0.*"; "wqkv" (alias "W_pack") puts ONE adapter across the concatenated q/k/v
    projection, as LoRA on Baichuan's W_pack does: A (rank, dim) shared, B (q + k + v rows, rank); dropout once.
    Returns the names of the adapted layers (layers.{i}.attention.wqkv for the fused ones).
    fill(name, linear): gives a linear of a model built on the meta device its weights just before it is wrapped,
    so a QLoRA model is quantised one layer at a time and never holds the whole full-precision base.
    """
    lora_checks.check_rank(rank)
    adapted = lora_checks.lora_targets([n for n, _ in _linears(model)], len(model.layers), targets)
    model.requires_grad_(False)
    for name, _ in _linears(model):  # by name: a list of the modules would keep every replaced full-precision weight
        linear = model.get_submodule(name)
        if fill is not None:
            fill(name, linear)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if quantize_base and name != "output":  # QLoRA quantises the blocks; embedding and head stay as they are
            linear = NF4Linear.of(linear)
        if name in adapted:
            linear = LoRALinear(linear, rank, alpha, dropout)
        setattr(parent, child, linear)
    for name in sorted(n for n in adapted if n.endswith(".wqkv")):
        attention = model.get_submodule(name[: -len(".wqkv")])
        rows = sum(getattr(attention, w).out_features for w in ("wq", "wk", "wv"))
        attention.wqkv = LoRA(attention.wq.in_features, rows, rank, alpha, dropout, device=_device_of(attention.wq))
    return sorted(adapted)


def lora_state_dict(model, full: bool = False) -> dict[str, torch.Tensor]:
    """Only the adapter weights: what a LoRA run needs to save. full=True: named as in a plain model whatever
    compile / activation checkpointing added, and gathered whole from FSDP / TP shards (a collective: every rank
    calls it)."""
    out = {}
    for n, p in model.named_parameters():
        if n.endswith((".lora_a", ".lora_b")):
            if full:
                n = n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
                p = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            out[n] = p
    return out


def load_lora(model, tensors: dict[str, torch.Tensor]):
    """Load adapter weights into a model prepared with apply_lora, checking names and shapes."""
    own = lora_state_dict(model)
    lora_checks.check_adapter(tensors, own)
    for name, t in tensors.items():
        with torch.no_grad():
            own[name].copy_(t)


@torch.no_grad()
def merge_lora(model) -> Transformer:
    """Fold every adapter into its base weight, leaving plain nn.Linear layers (NF4 bases are dequantised)."""
    dtype = model.tok_embeddings.weight.dtype
    for kind in (LoRALinear, NF4Linear):  # adapters first: their NF4 bases go with them
        for name, module in list(model.named_modules()):
            if isinstance(module, kind):
                weight = module.merged_weight() if kind is LoRALinear else module.weight
                merged = nn.Linear(weight.size(1), weight.size(0), bias=False, device=weight.device, dtype=dtype)
                merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, merged)
    for layer in model.layers:  # the fused adapters last: their wq, wk, wv are plain linears by now
        attention = layer.attention
        if attention.wqkv is not None:
            linears = [attention.wq, attention.wk, attention.wv]
            for linear, delta in zip(linears, attention.wqkv.delta_weight().split([m.out_features for m in linears])):
                linear.weight.copy_(linear.weight.float() + delta)
            attention.wqkv = None
    return model


# --------------------------------------------------------------------------------------------------------------------
# checkpoint dirs: config.json + model.safetensors (or shards with HF's index), memory-mapped on load


def read_config(path) -> tuple[ModelArgs, dict]:
    """(ModelArgs, the whole config.json) of a checkpoint dir: every field's type and declared range checked, and the
    family one of FAMILIES."""
    config = weights.read_checkpoint_config(path, FAMILIES)
    try:
        return ModelArgs.from_dict(config), config
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None
