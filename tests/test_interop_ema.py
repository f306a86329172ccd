"""`ema=True` / `--ema`: the EMA weights an upstream checkpoint carries (an RQ release's `state_dict_ema`, a LlamaGen
file's `ema`) load; a source with no separate EMA weights (a vqar folder or Hub repository, whose one set already is
the EMA average where the run used `train.ema_decay`; VAR's files; an RQ / LlamaGen file without the entry) is
refused in one line naming it, before its weights (or a tokenizer's) are read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import vqar
from conftest import run_cli
from vqar.utils.safe_load import load_checkpoint

V1 = Path(__file__).parent / "data" / "vqar_v1"
ONE_SET = "it holds one set of weights, no separate EMA ones"


@pytest.fixture()
def gpt_folder(tmp_path):
    """A vqar model folder whose weights file is no weights at all: anything that reads it fails otherwise."""
    from vqar.ar import GPT, GPTConfig

    folder = tmp_path / "gpt"
    vqar.save_pretrained(GPT(GPTConfig(vocab_size=16, code_shape=[2, 2], dim=32, n_layer=1, n_head=2,
                                       num_classes=3)), folder)  # fmt: skip
    (folder / "model.safetensors").write_bytes(b"not read")
    return folder


def _halved(state: dict) -> dict:
    return {k: v * 0.5 if torch.is_floating_point(v) else v for k, v in state.items()}


def _assert_halved(ema: torch.nn.Module, raw: torch.nn.Module, but: tuple[str, ...] = ()) -> None:
    """Every float weight of `ema` is half the raw one: the EMA entry (written as half the raw weights) was read.
    `but`: weights that come from elsewhere (an RQ-Transformer's code embeddings are its tokenizer's codebook)."""
    raw_state = raw.state_dict()
    checked = 0
    for name, value in ema.state_dict().items():
        if torch.is_floating_point(value) and value.abs().sum() > 0 and "cluster_size" not in name and name not in but:
            torch.testing.assert_close(value, raw_state[name] * 0.5, msg=name)
            checked += 1
    assert checked > 10


# ---------------------------------------------------------------- no separate EMA weights: refused
def test_a_vqar_folder_refuses_ema_before_reading_it(gpt_folder, tmp_path):
    with pytest.raises(ValueError) as refused:
        vqar.load_pretrained(gpt_folder, ema=True)
    assert str(refused.value) == f"ema= (--ema) does not apply to {gpt_folder}: a vqar model folder: {ONE_SET} (a " \
        "vqar run trained with train.ema_decay exported its EMA average as those weights); drop --ema"


@pytest.mark.parametrize("arch", ["gpt", "rq", "vim"])
def test_a_vqar_0_1_folder_refuses_ema(arch):
    with pytest.raises(ValueError, match=f"ema= \\(--ema\\) does not apply to {V1 / arch}: a vqar model folder"):
        vqar.load_pretrained(V1 / arch, ema=True)


def test_a_hub_repository_refuses_ema_before_downloading(monkeypatch):
    import vqar.bundle

    def no_download(repo_id):
        raise AssertionError(f"{repo_id} was downloaded")

    monkeypatch.setattr(vqar.bundle, "download_from_hub", no_download)
    hub = f"to no-such-org/model: a Hub repository \\(a vqar model folder\\): {ONE_SET}"
    with pytest.raises(ValueError, match=hub):
        vqar.load_pretrained("no-such-org/model", ema=True)


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--model", "{model}", "--ema", "--out", "{out}"],
        ["convert", "{model}", "{out}", "--ema"],
        ["serve", "--model", "{model}", "--ema", "--port", "0"],
    ],
)
def test_ema_of_a_vqar_folder_is_one_line_from_the_commands(gpt_folder, tmp_path, capsys, command):
    out = tmp_path / "out"
    code, err = run_cli([word.format(model=gpt_folder, out=out) for word in command], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"vqar: error: ema= (--ema) does not apply to {gpt_folder}: a vqar model folder: {ONE_SET}")
    assert not out.exists()


def test_var_files_refuse_ema(fixtures):
    for name, kind in (("vae.pth", "a VAR VQVAE"), ("var.pth", "a VAR transformer")):
        path = fixtures / "var" / name
        with pytest.raises(ValueError, match=f"to {path}: {kind}: VAR's released checkpoints hold one set of weights, "
                           "with no EMA entry; drop --ema"):  # fmt: skip
            vqar.load_pretrained(path, ema=True)


# ---------------------------------------------------------------- RQ releases
@pytest.fixture()
def rq_release(fixtures, tmp_path):
    folder = tmp_path / "release"
    shutil.copytree(fixtures / "rqvae", folder)
    return folder


def _add_ema_entry(path: Path, key: str, base: str) -> None:
    checkpoint = load_checkpoint(path)
    torch.save({**checkpoint, key: _halved(checkpoint[base])}, path)


def test_rq_release_files_without_state_dict_ema_are_refused_naming_the_file(rq_release):
    """The EMA weights asked for are the model's: a stage 2 without them is refused, naming the file; its stage 1
    is read with its EMA weights where it has them, else with its one set (a release whose stage 2 alone carried
    EMA weights could not be read with them at all)."""
    stage1, stage2 = rq_release / "stage1" / "model.pt", rq_release / "stage2" / "model.pt"
    with pytest.raises(ValueError, match=f"^{stage1} has no 'state_dict_ema' \\(ema=True\\); it holds \\['epoch', "
                       "'state_dict'\\]$"):  # fmt: skip
        vqar.load_pretrained(rq_release / "stage1", ema=True)
    with pytest.raises(ValueError, match=f"^{stage2} has no 'state_dict_ema'"):
        vqar.load_pretrained(rq_release, ema=True)
    _add_ema_entry(stage2, "state_dict_ema", "state_dict")
    ema, raw = vqar.load_pretrained(rq_release, ema=True), vqar.load_pretrained(rq_release)
    _assert_halved(ema, raw, but=("code_embeddings",))  # the raw stage 1's codebook
    assert all(torch.equal(a, b) for a, b in zip(ema.tokenizer.state_dict().values(),
                                                 raw.tokenizer.state_dict().values(), strict=True))  # fmt: skip


def test_an_rq_release_with_state_dict_ema_loads_it(rq_release):
    for stage in ("stage1", "stage2"):
        _add_ema_entry(rq_release / stage / "model.pt", "state_dict_ema", "state_dict")
    raw, ema = vqar.load_pretrained(rq_release), vqar.load_pretrained(rq_release, ema=True)
    _assert_halved(ema, raw)
    _assert_halved(ema.tokenizer, raw.tokenizer)


def test_a_vqar_folder_as_the_tokenizer_of_an_ema_load_is_read_with_its_one_set_of_weights(rq_release, tmp_path):
    """It was refused ("drop --ema"), and the advice loaded the model's raw weights instead of its EMA ones."""
    for stage in ("stage1", "stage2"):
        _add_ema_entry(rq_release / stage / "model.pt", "state_dict_ema", "state_dict")
    vqar.save_pretrained(vqar.load_pretrained(rq_release / "stage1"), tmp_path / "tokenizer")
    given = vqar.load_pretrained(rq_release / "stage2", ema=True, tokenizer=tmp_path / "tokenizer")
    _assert_halved(given, vqar.load_pretrained(rq_release / "stage2"), but=("code_embeddings",))
    assert all(torch.equal(a, b) for a, b in zip(given.tokenizer.state_dict().values(),
               vqar.load_pretrained(tmp_path / "tokenizer").state_dict().values(), strict=True))  # fmt: skip
    ema = vqar.load_pretrained(rq_release / "stage2", ema=True, tokenizer=rq_release / "stage1")  # an RQ one has EMA
    _assert_halved(ema.tokenizer, vqar.load_pretrained(rq_release / "stage1"))


# ---------------------------------------------------------------- LlamaGen
@pytest.fixture()
def llamagen(fixtures, tmp_path):
    folder = tmp_path / "llamagen"
    shutil.copytree(fixtures / "llamagen", folder)
    return folder


def test_llamagen_files_without_an_ema_entry_are_refused(llamagen):
    for name in ("vq_ckpt.pt", "gpt_ckpt.pt"):
        config = llamagen / name.replace("ckpt.pt", "config.json")
        with pytest.raises(ValueError, match=f"^{llamagen / name} has no ema weights; it holds \\['model'\\]$"):
            vqar.load_pretrained(llamagen / name, config=config, ema=True)


def test_llamagen_files_with_an_ema_entry_load_it_and_their_tokenizer_too(llamagen, tmp_path):
    vq, gpt = llamagen / "vq_ckpt.pt", llamagen / "gpt_ckpt.pt"
    vq_config, gpt_config = llamagen / "vq_config.json", llamagen / "gpt_config.json"
    for path in (vq, gpt):
        _add_ema_entry(path, "ema", "model")
    _assert_halved(vqar.load_pretrained(vq, config=vq_config, ema=True), vqar.load_pretrained(vq, config=vq_config))
    for word in ("no", 0, None):  # ema="no" is truthy: it loaded the EMA weights
        with pytest.raises(TypeError, match=rf"^ema must be True or False, got {word!r}$"):
            vqar.load_pretrained(vq, config=vq_config, ema=word)
    raw_gpt = vqar.load_pretrained(gpt, config=gpt_config)
    _assert_halved(vqar.load_pretrained(gpt, config=gpt_config, ema=True), raw_gpt)
    # The tokenizer is loaded with ema where it can be: a vqar folder, which holds one set, is read with it.
    vqar.save_pretrained(vqar.load_pretrained(vq, config=vq_config), tmp_path / "vq")
    _assert_halved(vqar.load_pretrained(gpt, config=gpt_config, ema=True, tokenizer=tmp_path / "vq"), raw_gpt)
