"""Sampling throughput in the manner of the RQ-Transformer's `measure_throughput` tool.

Random weights: a conv tokenizer with latent stride `f` on `image_size` images, residual depth `d` and codebook
size `c`, and an RQ-Transformer of a named size over its (image_size/f) x (image_size/f) x d codes (d = 1 is the
VQ setting). After `warmup` discarded loops (which also compile, with `compile=true`), `loops` batches are
timed; the result is milliseconds per image, split into AR sampling and decoding. CUDA timings are synchronised.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from vqar.ar import RQ_SIZES, RQTransformer, RQTransformerConfig
from vqar.quantize import QuantizerConfig
from vqar.sampling import SamplingSettings, draw, for_sampling, make_conditions
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.conv import ConvConfig


@dataclasses.dataclass
class BenchConfig:
    f: int = 32
    d: int = 4
    c: int = 16384
    model: str = "RQ-1.4B"
    batch_size: int = 100
    image_size: int = 256
    ch: int = 128
    loops: int = 3
    warmup: int = 1
    num_classes: int = 1000
    precision: str = "fp32"
    compile: bool = False
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        levels = math.log2(self.f)
        if self.f < 1 or levels != int(levels):
            raise ValueError(f"f (the latent stride) must be a power of 2, got {self.f}")
        if self.image_size % self.f:
            raise ValueError(f"image_size {self.image_size} is not divisible by f={self.f}")
        if self.model not in RQ_SIZES:
            raise ValueError(f"unknown model size {self.model!r}; known: {', '.join(RQ_SIZES)}")
        if min(self.d, self.c - 1, self.batch_size, self.loops) < 1 or self.warmup < 0:
            raise ValueError("need d >= 1, c >= 2, batch_size >= 1, loops >= 1 and warmup >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")


def build_models(cfg: BenchConfig, device: torch.device) -> tuple[Tokenizer, RQTransformer]:
    levels = int(math.log2(cfg.f))
    mults = [1, 1, 2, 2, 4, 4, 4, 4, 4][: levels + 1]
    grid = cfg.image_size // cfg.f
    tok_cfg = TokenizerConfig(
        conv=ConvConfig(resolution=cfg.image_size, ch=cfg.ch, ch_mult=mults, attn_resolutions=[grid], z_channels=256),
        quantizer=QuantizerConfig(kind="rq" if cfg.d > 1 else "vq", codebook_size=cfg.c, dim=256, depth=cfg.d),
    )
    tokenizer = Tokenizer(tok_cfg).to(device).eval()
    books = tokenizer.code_vectors()
    ar_cfg = RQTransformerConfig(
        vocab_size=cfg.c, code_shape=[grid, grid, cfg.d], code_dim=books.shape[-1],
        shared_codebook=books.shape[0] == 1, num_classes=cfg.num_classes, **RQ_SIZES[cfg.model],
    )  # fmt: skip
    model = RQTransformer(ar_cfg, code_embeddings=books).to(device).eval()
    return tokenizer, model


class _StackOfOne:
    """A VQ tokenizer (d = 1) seen as a residual one with one code per position, so the RQ-Transformer's
    (h, w, 1) codes decode."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.codebook_size, self.depth = tokenizer, tokenizer.codebook_size, 1

    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        return self.tokenizer.decode(codes[..., 0])


@torch.no_grad()
def measure_throughput(cfg: BenchConfig, device: torch.device, progress: bool = True) -> dict:
    cfg.validate()
    tokenizer, model = build_models(cfg, device)
    model = for_sampling(model.attach(tokenizer if cfg.d > 1 else None), cfg.precision)
    tokenizer = model.tokenizer or tokenizer
    decoder = tokenizer if cfg.d > 1 else _StackOfOne(tokenizer)
    settings = SamplingSettings(top_k=cfg.top_k, top_p=cfg.top_p)
    generator = torch.Generator().manual_seed(0)
    sample_s = decode_s = 0.0
    for loop in tqdm(range(cfg.warmup + cfg.loops), desc="bench", disable=not progress):
        classes = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).tolist()
        conditions = make_conditions(model, classes=classes)
        settings = replace(settings, seed=loop)
        result = draw(model, conditions, settings, tokenizer=decoder, batch_size=cfg.batch_size,
                      precision=cfg.precision, compile=cfg.compile)  # fmt: skip
        if loop >= cfg.warmup:
            sample_s, decode_s = sample_s + result.seconds_sampling, decode_s + result.seconds_decoding
    images = cfg.loops * cfg.batch_size
    params = sum(p.numel() for p in model.parameters())
    return {
        **dataclasses.asdict(cfg),
        "device": str(device),
        "code_shape": list(model.code_shape),
        "ar_parameters_millions": round(params / 1e6, 2),
        "images_timed": images,
        "ms_per_image_sampling": 1000 * sample_s / images,
        "ms_per_image_decoding": 1000 * decode_s / images,
        "ms_per_image_total": 1000 * (sample_s + decode_s) / images,
    }
