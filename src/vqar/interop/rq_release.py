"""The kakaobrain RQ-VAE / RQ-Transformer release format ("Autoregressive Image Generation using Residual
Quantization", Lee et al., CVPR 2022).

A release unpacks to `<name>/stage1/{model.pt,config.yaml}` (the RQ-VAE) and `<name>/stage2/{model.pt,config.yaml}`
(the RQ-Transformer). `model.pt` holds `state_dict` (and maybe `state_dict_ema`, optimizer state, ...);
`config.yaml` is the OmegaConf file the official trainer wrote, whose `arch` section describes the model.

The RQ-VAE's module names are taming's, as are vqar's; its codebook tensors carry a padding row K, and a shared
codebook appears under every depth's key. The RQ-Transformer has no code embedding table of its own: it embeds
codes through the RQ-VAE's codebook, which vqar copies into the model; its module names map to vqar's through
`RQ_TRANSFORMER_NAMES`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from vqar.ar import RQTransformer, RQTransformerConfig
from vqar.interop.state import (
    NoEMAWeights,
    StateDictAdapter,
    build_fitting,
    load_into,
    strip_wrapper_prefixes,
    tensors_only,
)
from vqar.quantize import QuantizerConfig
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.conv import ConvConfig
from vqar.utils.safe_load import load_checkpoint

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.pt"
# A release's architecture is its config.yaml's: a misfit is a model.pt of another stage or release beside it.
RELEASE_HINT = (f"The architecture is read from the {CONFIG_FILE} beside it: check that both files are of the same "
                "stage of one release (stage1: the RQ-VAE, stage2: the RQ-Transformer)")


def is_release_stage(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_arch(folder: Path) -> dict:
    """The `arch` section of a release stage's config.yaml, as plain Python."""
    path = folder / CONFIG_FILE
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    arch = config.get("arch") if isinstance(config, dict) else None
    if not isinstance(arch, dict) or "type" not in arch:
        raise ValueError(f"{path} has no arch section with a type; is it an RQ release config.yaml?")
    return arch


def _unsupported(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what} is not supported by vqar's RQ loader")


# ---------------------------------------------------------------- stage 1: RQ-VAE
def tokenizer_config(arch: dict, source: Path) -> TokenizerConfig:
    hp, dd = arch.get("hparams", {}), arch.get("ddconfig", {})
    if arch["type"] != "rq-vae":
        raise ValueError(f"{source}: arch type {arch['type']!r} is not an RQ-VAE (expected 'rq-vae')")
    if hp.get("bottleneck_type", "rq") != "rq":
        raise _unsupported(source, f"bottleneck_type {hp['bottleneck_type']!r}")
    if dd.get("double_z", False):
        raise _unsupported(source, "double_z: true")
    code_shape, latent_shape = list(hp["code_shape"]), list(hp.get("latent_shape", hp["code_shape"]))
    if latent_shape[:2] != code_shape[:2]:
        raise _unsupported(source, f"a code grid {code_shape[:2]} different from the latent grid {latent_shape[:2]}")
    conv = ConvConfig(
        in_channels=dd.get("in_channels", 3),
        out_channels=dd.get("out_ch", 3),
        resolution=dd["resolution"],
        ch=dd["ch"],
        ch_mult=list(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=list(dd.get("attn_resolutions", [])),
        z_channels=dd["z_channels"],
        dropout=dd.get("dropout", 0.0),
    )
    quantizer = QuantizerConfig(
        kind="rq",
        codebook_size=hp["n_embed"],
        dim=hp["embed_dim"],
        depth=code_shape[2],
        shared_codebook=hp.get("shared_codebook", False),
        beta=hp.get("latent_loss_weight", 0.25),
        ema=True,
        decay=hp.get("decay", 0.99),
        restart_dead=hp.get("restart_unused_codes", True),
    )
    return TokenizerConfig(conv=conv, quantizer=quantizer)


def convert_rqvae_state(state: dict[str, torch.Tensor], cfg: TokenizerConfig) -> dict[str, torch.Tensor]:
    """Release RQ-VAE weights in vqar's names: padding rows dropped, a shared codebook kept once."""
    q = cfg.quantizer
    books = 1 if q.shared_codebook else q.depth
    out = {}
    for key, value in state.items():
        if key.startswith("quantizer.codebooks."):
            index = int(key.split(".")[2])
            if index >= books:
                continue  # the shared codebook repeated under every depth
            if key.endswith(".weight") and value.shape[0] == q.codebook_size + 1:
                value = value[:-1]
        out[key] = value
    for index in range(books):
        out.setdefault(f"quantizer.codebooks.{index}.initialized", torch.tensor(True))
    return out


def load_rqvae(folder: Path, ema: bool = False) -> Tokenizer:
    arch = read_arch(folder)
    cfg = tokenizer_config(arch, folder / CONFIG_FILE)
    model = Tokenizer(cfg)
    state = _state_dict(folder / WEIGHTS_FILE, ema)
    load_into(model, convert_rqvae_state(state, cfg), str(folder / WEIGHTS_FILE), hint=RELEASE_HINT, file_state=state)
    return model.eval()


# ---------------------------------------------------------------- stage 2: RQ-Transformer
def rq_transformer_config(arch: dict, source: Path) -> RQTransformerConfig:
    if arch["type"] != "rq-transformer":
        raise ValueError(f"{source}: arch type {arch['type']!r} is not an RQ-Transformer")
    for flag in ("input_emb_vqvae", "head_emb_vqvae", "cumsum_depth_ctx", "shared_cls_emb"):
        if not arch.get(flag, False):
            raise _unsupported(source, f"{flag}: false (every released model sets it)")
    if arch.get("use_padding_emb", False):
        raise _unsupported(source, "use_padding_emb: true")
    vocab = arch["vocab_size"]
    if isinstance(vocab, list):
        if len(set(vocab)) != 1:
            raise _unsupported(source, f"different codebook sizes per depth {vocab}")
        vocab = vocab[0]
    body, head = arch["body"], arch["head"]
    blocks = body.get("block", {}), head.get("block", {})
    for field in ("n_head", "mlp_bias", "attn_bias", "gelu"):
        if blocks[0].get(field) != blocks[1].get(field):
            raise _unsupported(source, f"different {field} in the spatial and depth transformers")
    block = blocks[0]
    vocab_cond, block_cond = max(arch.get("vocab_size_cond", 0), 1), max(arch.get("block_size_cond", 0), 1)
    text = block_cond > 1
    return RQTransformerConfig(
        vocab_size=vocab,
        code_shape=list(arch["block_size"]),
        code_dim=arch.get("input_embed_dim") or arch["embed_dim"],
        dim=arch["embed_dim"],
        n_head=block["n_head"],
        n_layer=body["n_layer"],
        n_depth_layer=head["n_layer"],
        num_classes=0 if text or vocab_cond == 1 else vocab_cond,
        text_length=block_cond if text else 0,
        text_vocab_size=vocab_cond if text else 0,
        mlp_bias=block.get("mlp_bias", True),
        attn_bias=block.get("attn_bias", True),
        gelu={"v1": "exact", "v2": "sigmoid"}[block.get("gelu", "v1")],
        token_dropout_p=arch.get("embd_pdrop", 0.0),
        resid_dropout_p=block.get("resid_pdrop", 0.1),
        attn_dropout_p=block.get("attn_pdrop", 0.0),
    )


_BLOCK_NAMES = [("ln1.", "attention_norm."), ("attn.query.", "attention.wq."), ("attn.key.", "attention.wk."),
                ("attn.value.", "attention.wv."), ("attn.proj.", "attention.wo."), ("ln2.", "ffn_norm."),
                ("mlp.0.", "feed_forward.w1."), ("mlp.2.", "feed_forward.w2.")]  # fmt: skip


def block_rules(upstream_stack: str, stack: str) -> list[tuple[str, str]]:
    """Renames of the release's GPT-2 blocks under `upstream_stack.N.` to vqar's under `stack.N.`."""
    return [(f"{upstream_stack}.{{i}}.{up}", f"{stack}.{{i}}.{ours}") for up, ours in _BLOCK_NAMES]


RQ_TRANSFORMER_NAMES = StateDictAdapter(
    [
        ("cond_emb.weight", "cond_embedding.embedding_table.weight"),
        ("pos_emb_cond", "cond_pos_emb"),
        ("pos_emb_hw", "pos_emb"),
        ("pos_emb_d", "depth_pos_emb"),
        ("input_mlp.", "spatial_input."),
        ("head_mlp.", "depth_input."),
        *block_rules("body_transformer.blocks", "layers"),
        *block_rules("head_transformer.blocks", "depth_layers"),
        ("classifier.layer_norm.", "norm."),
        ("classifier.linear.", "output."),
        ("cond_classifier.layer_norm.", "text_norm."),
        ("cond_classifier.linear.", "text_output."),
    ]
)


def load_rq_transformer(folder: Path, ema: bool = False, tokenizer: Tokenizer | None = None) -> RQTransformer:
    """The stage-2 model of a release; its tokenizer is `tokenizer`, or the `stage1` folder beside it."""
    cfg = rq_transformer_config(read_arch(folder), folder / CONFIG_FILE)
    if tokenizer is None:
        stage1 = folder.parent / "stage1"
        if not is_release_stage(stage1):
            raise FileNotFoundError(
                f"{folder} is an RQ-Transformer, which embeds codes through its RQ-VAE's codebook, but there is no "
                f"{stage1}/{{{CONFIG_FILE},{WEIGHTS_FILE}}} beside it; pass tokenizer= (a folder or a loaded model)"
            )
        try:
            tokenizer = load_rqvae(stage1, ema=ema)
        except NoEMAWeights:  # ema= asks for the model's: a stage 1 without EMA weights is read with its one set
            tokenizer = load_rqvae(stage1)
    if not isinstance(tokenizer, Tokenizer) or not tokenizer.is_residual:
        raise ValueError(f"the RQ-Transformer in {folder} needs a residual (RQ) tokenizer")
    books = tokenizer.code_vectors()
    if tuple(books.shape[1:]) != (cfg.vocab_size, cfg.code_dim) or tokenizer.depth != cfg.depth:
        raise ValueError(
            f"the tokenizer (codebook {tuple(books.shape)}, depth {tokenizer.depth}) does not fit the RQ-Transformer "
            f"in {folder} (codebook size {cfg.vocab_size}, code dim {cfg.code_dim}, depth {cfg.depth})"
        )
    cfg.shared_codebook = books.shape[0] == 1
    file_state = _state_dict(folder / WEIGHTS_FILE, ema)
    state = RQ_TRANSFORMER_NAMES.from_upstream(file_state)
    state["code_embeddings"] = books.detach().float()  # the model embeds codes with its tokenizer's vectors
    model = build_fitting(lambda: RQTransformer(cfg), state, str(folder / WEIGHTS_FILE), hint=RELEASE_HINT,
                          file_state=file_state, names=RQ_TRANSFORMER_NAMES)  # fmt: skip
    model.attach(tokenizer.eval())
    if cfg.text_length:
        attach_release_text_tokenizer(model, folder)
    return model.eval()


def attach_release_text_tokenizer(model: RQTransformer, folder: Path) -> None:
    """A text-to-image release ships no caption tokenizer; its BPE files (`bpe-16k-vocab.json` + `-merges.txt`
    from the official repository) are picked up when placed in the stage2 folder or the release folder."""
    from vqar.text import TextTokenizer

    for place in (folder, folder.parent):
        vocab = sorted(place.glob("*vocab.json"))
        if vocab:
            try:
                model.attach(text_tokenizer=TextTokenizer.load(vocab[0], length=model.cfg.text_length))
            except ValueError as err:
                raise ValueError(f"{vocab[0]}: {err}") from None
            return


def _state_dict(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not an RQ release checkpoint: it has no 'state_dict'")
    key = "state_dict_ema" if ema else "state_dict"
    if key not in checkpoint or checkpoint[key] is None:
        error = NoEMAWeights if ema else ValueError
        raise error(f"{path} has no {key!r} (ema={ema}); it holds {sorted(checkpoint)}")
    return strip_wrapper_prefixes(tensors_only(checkpoint[key], f"{path}[{key!r}]"))
