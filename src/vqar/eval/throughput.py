"""Sampling throughput in the manner of the RQ-Transformer's `measure_throughput` tool, for every architecture.

Random weights: a conv tokenizer with latent stride `f` on `image_size` images and codebook size `c`, quantizing
as the model's family needs (`Architecture.bench_quantizer`: VQ for a GPT or VIM, residual depth `d` for an
RQ-Transformer (default 4), the scales of VAR), and the model of a named size (`model=RQ-1.4B`, `GPT-B`,
`VAR-d16`, ...) over its codes, built through the architecture registry as training builds it. After `warmup`
discarded loops (which also compile, with `compile=true`), `loops` batches are timed; the result is milliseconds
per image, split into AR sampling and decoding. CUDA timings are synchronised.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from vqar.ar import ARModel, find_size
from vqar.quantize import QuantizerConfig
from vqar.sampling import SamplingSettings, draw, for_sampling, make_conditions
from vqar.sampling.speculative import DecodeStats
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.conv import ConvConfig
from vqar.utils.memory import check_memory

# The random tokenizer's channel multipliers, one per resolution: they allow latent strides up to 2^8.
STRIDE_WIDTHS = [1, 1, 2, 2, 4, 4, 4, 4, 4]
MAX_STRIDE = 2 ** (len(STRIDE_WIDTHS) - 1)


NORM_GROUPS = ConvConfig.norm_groups  # the random tokenizer's, which bench leaves at its default


@dataclasses.dataclass
class BenchConfig:
    f: int = 32
    d: int | None = None  # codes per position; None: the architecture's (`depth`)
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
    cfg_scale: float = 1.0
    speculative: bool = False  # speculative Jacobi decoding (random weights: few drafts are accepted)
    window: int = 16

    @property
    def depth(self) -> int:
        """Codes per position: `d`, or the default of the model's architecture (4 for an RQ-Transformer, 1 for the
        others), so that `model=GPT-XS` alone is not refused for a depth the user never asked for."""
        return self.d if self.d is not None else find_size(self.model).bench_depth

    def validate(self) -> None:
        # log2 of 0 or of a negative stride is a math domain error, not a message about f
        if self.f < 1 or math.log2(self.f) != int(math.log2(self.f)) or self.f > MAX_STRIDE:
            raise ValueError(f"f (the latent stride) must be a power of 2 from 1 to {MAX_STRIDE}, got {self.f}")
        if self.image_size < self.f or self.image_size % self.f:
            raise ValueError(f"image_size must be a positive multiple of f={self.f}, got {self.image_size}")
        if self.ch < 1 or self.ch % NORM_GROUPS:  # else "divisible by norm_groups=32", a key bench does not take
            raise ValueError(f"ch (the tokenizer's base width) must be a positive multiple of {NORM_GROUPS} (its "
                             f"GroupNorm groups), got {self.ch}")  # fmt: skip
        arch = find_size(self.model)  # ValueError listing the known sizes
        if self.speculative:  # VAR draws whole scales: refused here, not after its model is built
            arch.check_option("speculative", "speculative=true")
        for key, value, least in (("d", self.depth, 1), ("c", self.c, 2), ("batch_size", self.batch_size, 1),
                                  ("loops", self.loops, 1), ("warmup", self.warmup, 0)):  # fmt: skip
            if value < least:
                raise ValueError(f"{key} must be at least {least}, got {value}")
        if self.num_classes < 1:  # each image is drawn for a random class
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")


def build_models(cfg: BenchConfig, device: torch.device) -> tuple[Tokenizer, ARModel]:
    """A random tokenizer and a random model of size `cfg.model` over its codes, through the registry."""
    arch = find_size(cfg.model)
    levels = int(math.log2(cfg.f))
    mults = STRIDE_WIDTHS[: levels + 1]
    grid = cfg.image_size // cfg.f
    quantizer = QuantizerConfig(codebook_size=cfg.c, dim=256, **arch.bench_quantizer(grid, cfg.depth))
    tok_cfg = TokenizerConfig(
        conv=ConvConfig(resolution=cfg.image_size, ch=cfg.ch, ch_mult=mults, attn_resolutions=[grid], z_channels=256),
        quantizer=quantizer,
    )
    tokenizer = Tokenizer(tok_cfg).to(device).eval()
    fields = {"vocab_size": cfg.c, "code_shape": list(tokenizer.code_shape()), "num_classes": cfg.num_classes,
              "class_dropout_prob": 0.1 if cfg.cfg_scale > 1 else 0.0}  # fmt: skip
    fields.update(arch.store_fields({}, dataclasses.asdict(tok_cfg)))
    model = arch.build(arch.config(**{**arch.size_fields(cfg.model), **fields}), tokenizer)
    return tokenizer, model.to(device).eval()


def decode_bytes(cfg: BenchConfig) -> int:
    """The least memory the random tokenizer takes to decode one batch: its finest level holds at least four float32
    maps of `ch` channels at the full image size per image (about six were measured)."""
    return cfg.batch_size * 4 * 4 * cfg.ch * cfg.image_size**2


@torch.no_grad()
def measure_throughput(cfg: BenchConfig, device: torch.device, progress: bool = True) -> dict:
    cfg.validate()
    settings = SamplingSettings(top_k=cfg.top_k, top_p=cfg.top_p, cfg_scale=cfg.cfg_scale,
                                speculative=cfg.speculative, speculative_window=cfg.window)  # fmt: skip
    settings.validate()  # before the model is built: the default RQ-1.4B takes a minute and 6 GB to make
    if cfg.window != BenchConfig.window and not cfg.speculative:
        raise ValueError(f"window={cfg.window} sets speculative decoding's window, which is off: add speculative=true")
    if device.type == "cpu":  # the OOM killer ends a run without a word; a GPU says when it runs out
        check_memory(decode_bytes(cfg), f"decoding {cfg.batch_size} images of {cfg.image_size}x{cfg.image_size} "
                     f"at once (batch_size; tokenizer width ch={cfg.ch})", "choose a smaller batch_size, image_size "
                     "or ch")  # fmt: skip
    tokenizer, model = build_models(cfg, device)
    model = for_sampling(model.attach(tokenizer), cfg.precision)
    calls = DecodeStats()
    generator = torch.Generator().manual_seed(0)
    sample_s = decode_s = 0.0
    for loop in tqdm(range(cfg.warmup + cfg.loops), desc="bench", disable=not progress):
        classes = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).tolist()
        conditions = make_conditions(model, classes=classes)
        settings = replace(settings, seed=loop)
        result = draw(model, conditions, settings, tokenizer=model.tokenizer, batch_size=cfg.batch_size,
                      precision=cfg.precision, compile=cfg.compile)  # fmt: skip
        if loop >= cfg.warmup:
            sample_s, decode_s = sample_s + result.seconds_sampling, decode_s + result.seconds_decoding
            calls.add(result.decode_stats)
    images = cfg.loops * cfg.batch_size
    params = sum(p.numel() for p in model.parameters())
    return {
        **dataclasses.asdict(cfg),
        "d": cfg.depth,
        "device": str(device),
        "arch": model.arch,
        "code_shape": list(model.code_shape),
        "ar_parameters_millions": round(params / 1e6, 2),
        "images_timed": images,
        "ms_per_image_sampling": 1000 * sample_s / images,
        "ms_per_image_decoding": 1000 * decode_s / images,
        "ms_per_image_total": 1000 * (sample_s + decode_s) / images,
        "model_calls_per_image": calls.calls_per_image,
        "draft_acceptance_rate": calls.acceptance_rate,
    }
