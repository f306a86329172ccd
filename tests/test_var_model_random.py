"""The VAR transformer (`vqar.ar.var`) on small random models: cached scales against teacher forcing, the block
causal mask, smooth sampling, training, condition dropout, the tokenizers and settings it refuses, and its sizes."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from vqar.ar.var import VAR, VAR_SIZES, VARConfig
from vqar.quantize.multiscale import MultiScaleQuantizer


class QuantizerOnly:
    """Stands in for a VAR tokenizer where only its quantizer is needed (no decoder)."""

    depth = 1

    def __init__(self, quantizer: MultiScaleQuantizer):
        self.quantizer = quantizer.eval()
        self.codebook_size = quantizer.codebook_size

    def decode(self, codes, depth=None):
        raise NotImplementedError("a quantizer alone decodes no images")


def random_tokenizer(patch_nums, dim=8, vocab=32) -> QuantizerOnly:
    quantizer = MultiScaleQuantizer(vocab, dim, patch_nums, phi_share=2, ema=False)
    with torch.no_grad():
        for phi in quantizer.phis:
            phi.bias.normal_(std=0.1)
    return QuantizerOnly(quantizer)


def tiny_var(patch_nums=(1, 2, 3), **fields) -> VAR:
    cfg = VARConfig(vocab_size=32, code_shape=[sum(p * p for p in patch_nums)], patch_nums=list(patch_nums),
                    code_dim=8, num_classes=5, dim=32, n_layer=2, n_head=2, **fields)  # fmt: skip
    model = VAR(cfg)
    model.reset_parameters(adaln=1.0, adaln_gamma=1.0, head=1.0)  # far from the identity start: a stronger test
    with torch.no_grad():
        for block in model.layers:
            block.attention.q_bias.normal_()
            block.attention.v_bias.normal_()
    return model.attach(random_tokenizer(patch_nums)).eval()


def cached_logits(model: VAR, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) scale by scale through prefill / code_logits / decode_block, fed the given codes."""
    state, out, start = model.new_decode_state(), [], 0
    context = model.prefill(ids, state)
    for k, size in enumerate(model.block_sizes):
        out.append(model.code_logits(context, codes.new_empty(len(codes), size, 0), state).float())
        if k + 1 < len(model.block_sizes):
            context = model.decode_block(codes[:, start : start + size, None], start, state)
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("fields", [{}, {"shared_adaln": True}, {"attn_l2_norm": False}], ids=str)
def test_cached_scales_equal_teacher_forcing(fields):
    model = tiny_var(**fields)
    codes = torch.randint(0, 32, (3, model.cfg.num_positions))
    cond = torch.tensor([0, 4, 2])
    with torch.no_grad():
        forced = model(codes, cond).logits
        torch.testing.assert_close(cached_logits(model, codes, cond), forced, atol=2e-5, rtol=1e-4)
        null = model(codes, None).logits  # cond=None: the null class
        torch.testing.assert_close(cached_logits(model, codes, model.cond_embedding.null_ids(3)), null,
                                   atol=2e-5, rtol=1e-4)  # fmt: skip
    assert forced.dtype == torch.float32 and forced.shape == (3, model.cfg.num_positions, 32)
    assert not torch.allclose(forced, null)


def test_block_causal_mask():
    """Changing the codes of scale k changes the logits of the later scales only (scale k's own logits predict
    its codes, so they must not see them)."""
    model = tiny_var(patch_nums=(1, 2, 3, 4))
    codes, cond = torch.randint(0, 32, (2, model.cfg.num_positions)), torch.tensor([1, 3])
    starts = model.scale_starts
    with torch.no_grad():
        base = model(codes, cond).logits
        for k in range(len(model.block_sizes)):
            changed = codes.clone()
            changed[:, starts[k] : starts[k + 1]] = (changed[:, starts[k] : starts[k + 1]] + 1) % 32
            logits = model(changed, cond).logits
            assert torch.equal(logits[:, : starts[k + 1]], base[:, : starts[k + 1]]), k
            if k + 1 < len(model.block_sizes):
                assert not torch.allclose(logits[:, starts[k + 1] :], base[:, starts[k + 1] :]), k


def test_smooth_with_one_code_left_equals_hard_codes():
    """more_smooth over logits filtered down to one code (top-k 1) feeds back exactly that code's vector."""
    model = tiny_var()
    codes, ids = torch.randint(0, 32, (2, model.cfg.num_positions)), torch.tensor([0, 1])
    size = model.block_sizes[0]
    one_hot = torch.full((2, size, 32), float("-inf")).scatter(-1, codes[:, :size, None], 3.0)
    noise = -torch.empty(2, size, 32).exponential_().log()
    with torch.no_grad():
        hard_state, soft_state = model.new_decode_state(), model.new_decode_state()
        model.prefill(ids, hard_state), model.prefill(ids, soft_state)
        hard = model.decode_block(codes[:, :size, None], 0, hard_state)
        soft = model.decode_block(codes[:, :size, None], 0, soft_state, smooth=(one_hot, noise))
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(soft_state.fhat, hard_state.fhat)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = tiny_var(drop_path_rate=0.1)
    model.reset_parameters()  # the official start
    model.train()
    codes, cond = torch.randint(0, 32, (8, model.cfg.num_positions)), torch.randint(0, 5, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(codes, cond).logits
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(p.grad is not None for name, p in model.named_parameters() if "log_scale" not in name)


def test_condition_dropout_in_training_only():
    model = tiny_var(class_dropout_prob=0.5)
    codes, cond = torch.randint(0, 32, (64, model.cfg.num_positions)), torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        kept = model(codes, cond).logits
        assert torch.equal(model(codes, cond).logits, kept)  # eval: no dropout (the official drops in eval too)
        model.train()
        dropped = model(codes, cond).logits
        null = model.eval()(codes, None).logits
    rows = [torch.allclose(dropped[i], null[i], atol=1e-5) for i in range(64)]
    assert 0 < sum(rows) < 64


def test_needs_a_fitting_tokenizer():
    cfg = VARConfig(vocab_size=32, code_shape=[14], patch_nums=[1, 2, 3], code_dim=8, num_classes=5, dim=32,
                    n_layer=1, n_head=2)  # fmt: skip
    model = VAR(cfg)
    codes = torch.zeros(1, 14, dtype=torch.long)
    with pytest.raises(RuntimeError, match="attach"):
        model(codes, torch.tensor([1]))
    state = model.new_decode_state()
    model.prefill(torch.tensor([1]), state)
    with pytest.raises(RuntimeError, match="attach"):
        model.decode_block(codes[:, :1, None], 0, state)
    with pytest.raises(ValueError, match="scales"):
        model.attach(random_tokenizer((1, 2, 4)))
    with pytest.raises(ValueError, match="multi-scale"):
        model.attach(object())
    model.attach(random_tokenizer((1, 2, 3)))
    with pytest.raises(ValueError, match="decode_block"):
        model.decode_block(codes[:, 5:14, None], 5, state)  # the last scale has no next one
    with pytest.raises(ValueError, match="code_shape"):
        VARConfig(code_shape=[13], patch_nums=[1, 2, 3]).validate()
    # the setting at fault is named with its value ("need code_dim >= 1, mlp_ratio > 0 and drop_path_rate in [0, 1)")
    for name, value, wanted in (("code_dim", 0, ">= 1"), ("drop_path_rate", 1.5, "in [0, 1)")):
        with pytest.raises(ValueError, match=re.escape(f"model.{name} must be {wanted}") + f".*got {value}$"):
            VARConfig(code_shape=[14], patch_nums=[1, 2, 3], **{name: value}).validate()


def test_a_raster_model_refuses_a_multi_scale_tokenizer_before_drawing():
    """Same codebook size, one code per position: only the layout tells a VAR tokenizer from a GPT's, and without
    the check a GPT given one would sample its whole run before the tokenizer fails to decode the grid."""
    from vqar.ar.gpt import GPT, GPTConfig
    from vqar.quantize.config import QuantizerConfig
    from vqar.sampling import SamplingSettings
    from vqar.sampling.draw import check_drawable
    from vqar.tokenizers.conv import ConvConfig
    from vqar.tokenizers.tokenizer import Tokenizer, TokenizerConfig

    conv = ConvConfig(in_channels=1, out_channels=1, resolution=8, ch=8, ch_mult=[1, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=8, norm_groups=4)  # fmt: skip
    quantizer = QuantizerConfig(kind="multiscale", codebook_size=32, dim=8, patch_nums=[1, 2, 4], ema=False)
    tokenizer = Tokenizer(TokenizerConfig(conv=conv, quantizer=quantizer)).eval()
    gpt = GPT(GPTConfig(vocab_size=32, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=5))
    with pytest.raises(ValueError, match="multi-scale .*GPT"):
        gpt.attach(tokenizer)
    with pytest.raises(ValueError, match="multi-scale .*GPT"):
        check_drawable(gpt, SamplingSettings(), tokenizer)


def test_cfg_interval_is_refused_for_var_whose_blocks_are_whole_scales():
    """The interval counts positions one by one; on VAR it guided every scale that began inside it (cfg_interval=3
    guided codes 0..13 of the scales 1, 2, 3), not the first N+2 codes it documents."""
    from vqar.sampling import SamplingSettings, generate
    from vqar.sampling.draw import check_drawable

    model = tiny_var()
    labels = torch.tensor([1, 2])
    for interval in (0, 3):
        settings = SamplingSettings(cfg_scale=3.0, cfg_interval=interval)
        with pytest.raises(ValueError, match="cfg_interval .*VAR draws a whole scale"):
            generate(model, labels, settings)
        with pytest.raises(ValueError, match="cfg_interval .*VAR draws a whole scale"):
            check_drawable(model, settings, model.tokenizer)
    plain = generate(model, labels, SamplingSettings(cfg_scale=3.0))
    assert torch.equal(generate(model, labels, SamplingSettings(cfg_scale=3.0, cfg_interval=-1)), plain)


def test_sizes():
    """The official rule (width 64 * depth, heads = depth) and the paper's parameter counts at 256 px."""
    counts = {"VAR-d16": 310e6, "VAR-d20": 601e6, "VAR-d24": 1.03e9, "VAR-d30": 2.01e9}
    for name, fields in VAR_SIZES.items():
        with torch.device("meta"):
            model = VAR(VARConfig(num_classes=1000, **fields))
        if name in counts:
            params = sum(p.numel() for p in model.parameters())
            assert abs(params / counts[name] - 1) < 0.005, (name, params)
            assert model.cfg.dim == 64 * model.cfg.n_layer == 64 * model.cfg.n_head
    assert VAR_SIZES["VAR-d36"]["shared_adaln"] and not VAR_SIZES["VAR-d30"].get("shared_adaln", False)


def test_smooth_images_depend_on_their_seed_and_index_not_the_batch():
    """`smooth`'s Gumbel noise came from streams of (seed, row in the batch): `--batch-size 1` and the default batch
    gave other pictures for the same seed, as did a server's batching."""
    from vqar.sampling import SamplingSettings, draw, make_conditions

    torch.manual_seed(0)
    model = tiny_var()
    # the codes as the pictures: this tokenizer is a quantizer alone, which decodes no images
    model.tokenizer.decode = lambda codes, depth=None: codes.float()[:, None, None, :] / 32  # within [-1, 1]
    conditions = make_conditions(model, classes=[1, 2], n_per_condition=3)
    settings = SamplingSettings(seed=0, cfg_scale=2.0, smooth=True)
    whole = draw(model, conditions, settings, batch_size=6)
    for batch_size in (1, 4):
        assert torch.equal(draw(model, conditions, settings, batch_size=batch_size).images, whole.images), batch_size
    plain = draw(model, conditions, SamplingSettings(seed=0, cfg_scale=2.0), batch_size=6)
    assert not torch.equal(plain.images, whole.images)  # the Gumbel mix is in the pictures


def test_greedy_smooth_sampling_is_greedy_sampling():
    """`--greedy --smooth` fed back a Gumbel mix of the unfiltered logits: neither greedy nor the same for two seeds.
    VAR's greedy is top-k 1, whose smooth mix is the code taken: so are vqar's now."""
    from vqar.sampling import SamplingSettings, draw, make_conditions

    torch.manual_seed(0)
    model = tiny_var()
    model.tokenizer.decode = lambda codes, depth=None: codes.float()[:, None, None, :] / 32  # the codes as pictures
    conditions = make_conditions(model, classes=[1, 2], n_per_condition=3)
    greedy = draw(model, conditions, SamplingSettings(cfg_scale=2.0, greedy=True)).codes
    for seed in (0, 1):
        smooth = draw(model, conditions, SamplingSettings(seed=seed, cfg_scale=2.0, greedy=True, smooth=True))
        assert torch.equal(smooth.codes, greedy), seed
