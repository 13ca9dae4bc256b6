"""DAC (descript-audio-codec) as a tokenizer: parity with the ``dac`` 1.0.0 package (built with random weights at
small non-default sizes from the package itself), its saved files through ``load_codec`` / ``ostinato import``, and
a tiny MusicGen trained on DAC tokens that generates through the DAC decoder."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import soundfile as sf
import torch

import ostinato
from ostinato.cli import main
from ostinato.data.tokens import TokenManifest
from ostinato.errors import UserError
from ostinato.interop.codecs import is_foreign_codec, load_codec, weights_hash
from ostinato.interop.dac import dac_kwargs, dac_state_to_codec
from ostinato.models.dac import DACCodec
from tests.references import dac
from tests.runner import ROOT, train
from tests.synth import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(encoder_dim=8, encoder_rates=[2, 4], decoder_dim=32, decoder_rates=[4, 2], n_codebooks=3,
             codebook_size=64, codebook_dim=4, sample_rate=16000)
# hop 256 at 22.05 kHz: the 44.1 kHz model's 86.13 frames per second, at a size that trains in seconds
TOKENIZER = dict(encoder_dim=4, encoder_rates=[4, 8, 8], decoder_dim=32, decoder_rates=[8, 8, 4], n_codebooks=3,
                 codebook_size=64, codebook_dim=4, sample_rate=22050)


def reference(seed: int, **sizes) -> torch.nn.Module:
    """The package's DAC with random weights, Snake alphas and weight-norm gains (its init sets alpha 1 and the
    gains to the norms, which would hide a swap of ``weight_g`` and ``weight_v``)."""
    torch.manual_seed(seed)
    model = dac().DAC(**sizes).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "weight_g")):
                p.mul_(torch.empty_like(p).uniform_(0.5, 2.0))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The small reference and the weights file its own ``save(..., package=False)`` wrote."""
    model = reference(0, **SMALL)
    path = tmp_path_factory.mktemp("dac") / "weights.pth"
    model.save(str(path), package=False)
    return model, path


def test_codes_and_audio_match_the_package(saved):
    ref, path = saved
    ours = load_codec(path)
    assert isinstance(ours, DACCodec) and is_foreign_codec(path)
    assert (ours.sample_rate, ours.hop_length, ours.n_q, ours.card) == (16000, 8, 3, 64)
    torch.manual_seed(1)
    wav = 0.3 * torch.randn(2, 1, 1003)  # two clips, not a whole number of hops: both pad on the right
    with torch.no_grad():
        out = ref(wav)
        ref_audio = ref.decode(ref.quantizer.from_codes(out["codes"])[0])
        ref_two = ref.encode(ref.preprocess(wav, 16000), 2)[1]
        codes = ours.encode(wav).codes
        audio = ours.decode(codes)
        recon = ours(wav).recon
    assert codes.shape == (2, 3, 126) and torch.equal(codes, out["codes"])
    assert len(set(codes[:, 2].flatten().tolist())) > 8  # the third residual stage still picks varied codes
    assert torch.equal(ours.encode(wav, n_q=2).codes, ref_two)
    assert audio.shape == ref_audio.shape == (2, 1, 1008)
    assert (audio - ref_audio).abs().max().item() <= 1e-4 and ref_audio.abs().max() > 1e-2
    assert (recon - out["audio"]).abs().max().item() <= 1e-4


def test_import_writes_an_export_that_loads_everywhere(saved, tmp_path, capsys):
    ref, path = saved
    main(["import", str(path), str(tmp_path / "dac")])
    assert f"--codec {tmp_path / 'dac'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "dac" / "export.json").read_text())["kind"] == "dac"
    direct, loaded, via_codec = load_codec(path), ostinato.load(tmp_path / "dac"), load_codec(tmp_path / "dac")
    assert type(loaded) is DACCodec and loaded.config == direct.config
    assert weights_hash(loaded) == weights_hash(direct) == weights_hash(via_codec)  # the same tensors, exactly
    wav = 0.3 * torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(wav).codes, ref(wav)["codes"])


def test_a_torch_package_or_a_changed_file_is_refused_in_one_line(saved, tmp_path, capsys):
    ref, path = saved
    ref.save(str(tmp_path / "package.pth"))  # the package's default: a torch.package
    with pytest.raises(UserError, match=r"torch\.package .*save\(out, package=False\)"):
        load_codec(tmp_path / "package.pth")
    with pytest.raises(SystemExit) as exit_:
        main(["import", str(tmp_path / "package.pth"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "package=False" in err
    assert not (tmp_path / "out").exists()
    package = torch.load(path, weights_only=True)
    package["metadata"]["kwargs"]["n_codebooks"] = 4
    torch.save(package, tmp_path / "changed.pth")
    with pytest.raises(UserError, match=r"changed\.pth: its tensors do not fit .* 7 missing"):
        load_codec(tmp_path / "changed.pth")


def test_the_44khz_model_has_the_documented_dimensions():
    """The package's defaults are its 44.1 kHz model: built on the meta device, tensor for tensor."""
    defaults = {k: p.default for k, p in inspect.signature(dac().DAC).parameters.items()}
    with torch.device("meta"):
        ref = dac().DAC()
        ours = DACCodec.build(**dac_kwargs(defaults))
    assert (ours.sample_rate, ours.hop_length, ours.n_q, ours.card) == (44100, 512, 9, 1024)
    assert round(ours.frame_rate, 2) == 86.13
    theirs = {k: tuple(v.shape) for k, v in dac_state_to_codec(ref.state_dict()).items()}
    assert theirs == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_musicgen_trains_on_dac_tokens_and_generates_through_the_dac(tmp_path):
    path = tmp_path / "dac.pth"
    reference(2, **TOKENIZER).save(str(path), package=False)
    write_shards(tmp_path / "shards", n_shards=1, per_shard=8, sample_rate=16000)  # resampled to 22.05 kHz
    tokens = tmp_path / "data" / "dac44k" / "tokens" / "train"
    main(["tokenize", str(tmp_path / "shards"), str(tokens), "--codec", str(path), "--workers", "0"])
    manifest = TokenManifest.load(tokens)
    assert manifest.codec.id == str(path.resolve()) and manifest.model.kind == "codec"
    assert (manifest.codec.sample_rate, manifest.codec.n_q, manifest.codec.card) == (22050, 3, 64)
    assert manifest.codec.frame_rate == pytest.approx(22050 / 256)
    assert manifest.codec.hash == weights_hash(load_codec(path))
    env = {**os.environ, "OSTINATO_DATA": str(tmp_path / "data"), "OSTINATO_OUTPUTS": str(tmp_path / "out"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = ["experiment=musicgen_dac44k", f"data.valid={tokens}", "data.test=null", "trainer.max_steps=3",
           "trainer.checkpoint_every_steps=3", "trainer.precision=32-true", "data.batches_per_epoch=3",
           "trainer.limit_val_batches=1", "data.eval_batch_size=4", "data.num_workers=0", "family.lm.preset=tiny",
           "family.lm.dim=32", "family.lm.num_heads=2", "family.lm.num_layers=1", "family.lm.ffn_dim=64"]
    train(env, *run)
    [last] = (tmp_path / "out").rglob("last.ckpt")  # the one XP of this outputs folder
    folder = last.parent.parent
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["state_dict"]["model.lm.heads.0.weight"].shape == (64, 32)
    main(["generate", "--model", str(folder), "--prompt", "clip 3", "--seconds", "0.5", "--seed", "1", "--quiet",
          "--out", str(tmp_path / "gen")])  # the codec: the one the token manifest records, the DAC
    wav, sr = sf.read(tmp_path / "gen" / "000.wav")
    assert sr == 22050 and wav.shape == (round(0.5 * 22050),) and abs(wav).max() > 0
    main(["export", str(folder), str(tmp_path / "export")])  # the DAC travels inside it, as a codec export
    exported = ostinato.load(tmp_path / "export")
    assert (tmp_path / "export" / "codec" / "model.safetensors").is_file()
    assert type(exported.codec) is DACCodec and weights_hash(exported.codec) == manifest.codec.hash


def test_the_preset_composes_at_its_full_size(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from ostinato.engine.config import validate
    from ostinato.train import conf_dir

    monkeypatch.setenv("OSTINATO_DATA", str(tmp_path))  # no token shards there: the preset's own dimensions stand
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=musicgen_dac44k"])
    validate(cfg)
    assert (cfg.family.n_q, cfg.family.card) == (9, 1024)
    assert (cfg.family.lm.dim, cfg.family.lm.num_layers, cfg.trainer.precision) == (1024, 24, "bf16-mixed")
    assert cfg.data.train == f"{tmp_path}/dac44k/tokens/train"
