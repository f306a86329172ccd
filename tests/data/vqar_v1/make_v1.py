"""Writes tests/data/vqar_v1: tiny AR model folders saved by vqar 0.1 (format 1), with reference outputs."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import vqar
from vqar.ar import GPT, VIM, GPTConfig, RQTransformer, RQTransformerConfig, VIMConfig
from vqar.pretrained import save_pretrained
from vqar.quantize import QuantizerConfig
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig

out = Path(sys.argv[1])
torch.manual_seed(0)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


tokenizer = randomize(Tokenizer(TokenizerConfig(
    conv=ConvConfig(resolution=8, ch=8, ch_mult=[1, 2], z_channels=4, norm_groups=4, num_res_blocks=1,
                    attn_resolutions=[]),
    quantizer=QuantizerConfig(kind="rq", codebook_size=12, dim=4, depth=3))))
books = torch.stack([tokenizer.quantizer.codebook(d).vectors() for d in range(len(tokenizer.quantizer.codebooks))])
models = {
    "gpt": GPT(GPTConfig(vocab_size=12, grid=[2, 3], dim=16, n_layer=1, n_head=2, num_classes=3, multiple_of=8)),
    "rq": RQTransformer(RQTransformerConfig(vocab_size=12, code_shape=[4, 4, 3], code_dim=4, embed_dim=16, n_head=2,
                                            body_layers=1, head_layers=1, num_classes=3, class_dropout_prob=0.1),
                        code_embeddings=books),
    "vim": VIM(VIMConfig(vocab_size=12, grid=[2, 3], embed_dim=16, n_head=2, n_layer=1, num_classes=3,
                         class_dropout_prob=0.1)),
}
io = {"cond": torch.tensor([0, 2])}
for name, model in models.items():
    model = randomize(model)
    if name == "rq":
        model.set_code_embeddings(books)
    save_pretrained(model, out / name)
    if name == "rq":
        save_pretrained(tokenizer, out / name / "tokenizer")
    codes = torch.randint(0, 12, (2, *model.code_shape))
    with torch.no_grad():
        logits = model(codes, io["cond"])
    io[f"{name}_codes"], io[f"{name}_logits"] = codes, logits
save_file(io, str(out / "io.safetensors"))
print("vqar", vqar.__version__, "->", out)
