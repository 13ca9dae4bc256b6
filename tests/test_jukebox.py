"""The Jukebox-style family: hierarchical VQ-VAE (hops 1 : 4 : 16), level priors with metadata and upper-level
conditions, top -> middle -> bottom generation, and train / resume / export / generate / eval through the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest

import soundfile as sf
import torch
from omegaconf import OmegaConf
from hydra.utils import instantiate

from ostinato.data.arrays import ArrayBatch, ArrayDataModule
from ostinato.families.jukebox import JukeboxPrior, JukeboxVQVAEFamily
from ostinato.models.jukebox import (HierarchicalVQVAE, Jukebox, LevelPrior, MetadataConditioner, UpperConditioner,
                                     parse_metadata)
from ostinato.nn.decoding import GenerationParams
from tests.runner import cli, train, xp_folders

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

SR = 24000
ROOT = Path(__file__).resolve().parents[1]
VQ = dict(ratios=[[4, 4, 4], [8, 8, 4], [8, 8, 4, 4]], card=32, dimension=16, n_filters=4)
LM = {"preset": "tiny", "dim": 32, "num_heads": 2, "num_layers": 2, "ffn_dim": 64}
META = {"fields": ["genre", "composer"], "buckets": 64, "dropout": 0.0}


def test_the_full_preset_is_jukebox_shaped():
    cfg = OmegaConf.load(ROOT / "conf/family/jukebox_vqvae.yaml")
    family = instantiate(cfg, _convert_="all")
    vq = family.model
    assert vq.hop_lengths == [8, 32, 128] and vq.card == 2048 and vq.sample_rate == 44100
    assert set(vq.array_streams()) == {"top", "middle", "bottom"}
    assert type(HierarchicalVQVAE.from_config({"family": OmegaConf.to_container(cfg)})) is HierarchicalVQVAE
    with pytest.raises(ValueError, match="must be 4 x the hop below"):
        HierarchicalVQVAE(SR, ratios=[[2, 2], [4, 2], [4, 4, 4, 2]])
    tiny = instantiate(OmegaConf.load(ROOT / "conf/family/jukebox_vqvae_tiny.yaml"), _convert_="all").model
    assert [h // tiny.hop_lengths[0] for h in tiny.hop_lengths] == [1, 4, 16]


def test_metadata_prompts_hash_to_stable_rows():
    assert parse_metadata("genre: baroque chorale, composer: Johann Sebastian Bach", ["genre", "composer"]) == {
        "genre": "baroque chorale", "composer": "Johann Sebastian Bach"}
    assert parse_metadata("Composer=Mozart; genre = string quartet.", ["genre", "composer"]) == {
        "composer": "Mozart", "genre": "string quartet"}
    with pytest.raises(ValueError, match="names no metadata field"):
        parse_metadata("a happy song", ["genre", "composer"])
    m = MetadataConditioner(8, ["genre", "composer"], buckets=64)
    ids = m.ids([{"genre": "Baroque  Chorale", "composer": "Bach"}, {"genre": "baroque chorale"}, {}])
    assert torch.equal(ids[0, 0], ids[1, 0]) and bool((ids[0, 0] > 0).all())
    assert ids[1, 1].tolist() == [0, 0] and ids[2].tolist() == [[0, 0], [0, 0]]
    assert m(ids).shape == (3, 2, 8)
    up = UpperConditioner(card=32, dim=8, ratio=4)
    codes = torch.randint(0, 32, (2, 1, 5))
    assert up(codes).shape == (2, 20, 8)
    # frames past the upper level's valid length read the padding row, whatever codes they hold
    other = codes.clone()
    other[0, 0, 3:] = 7
    cut = torch.tensor([3, 5])
    assert torch.allclose(up(codes, cut)[0, :8], up(other, cut)[0, :8])


def test_vqvae_losses_fall_on_a_fixed_batch():
    torch.manual_seed(0)
    family = JukeboxVQVAEFamily(SR, 1, vqvae=VQ)
    t = torch.arange(SR // 4) / SR
    x = torch.stack([0.3 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 330.0, 440.0, 550.0)])[:, None]
    opt = torch.optim.Adam(family.parameters(), 3e-3)
    history = []
    for _ in range(25):
        losses, _ = family.level_losses(x)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: round(float(v.detach()), 3) for k, v in losses.items()})
    print("VQ-VAE losses per level, first -> last:", history[0], "->", history[-1])
    assert all(history[-1][k] < 0.8 * history[0][k] for k in history[0])
    codes = family.model.encode_arrays(x)
    assert {k: tuple(v.shape) for k, v in codes.items()} == {"top": (4, 1, 6), "middle": (4, 1, 24),
                                                             "bottom": (4, 1, 94)}


def _code_batch(level: str, upper: str | None, window: int, b: int = 8) -> ArrayBatch:
    """Structured codes: each item repeats its own short motif; the level above holds the motif id."""
    g = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, 32, (4, 4), generator=g)
    ids = torch.arange(b) % 4
    codes = motifs[ids].repeat(1, window // 4)[:, None]  # [B, 1, window]
    up = ids[:, None, None].expand(b, 1, window // 4).clone()
    metas = [{"genre": f"genre {int(i)}", "composer": "x"} for i in ids]
    arrays = {level: codes}
    lengths = {level: torch.full((b,), window)}
    if upper is not None:
        arrays[upper] = up
        lengths[upper] = torch.full((b,), window // 4)
    return ArrayBatch(arrays, lengths, metas)


@pytest.mark.parametrize("level", ["top", "bottom"])
def test_prior_cross_entropy_falls_on_a_fixed_batch(level):
    torch.manual_seed(0)
    prior = JukeboxPrior(level, card=32, lm=LM, metadata=META, cfg_dropout=0.0)
    model = prior.model
    model.window_frames.fill_(16)
    batch = _code_batch(level, model.upper, 16)
    opt = torch.optim.Adam(prior.parameters(), 3e-3)
    history = []
    for _ in range(40):
        loss = prior.losses(batch, train=True).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(round(float(loss), 3))
    print(f"{level} prior cross-entropy, first -> last: {history[0]} -> {history[-1]} (uniform: 3.466)")
    assert history[-1] < 0.5 * history[0]
    assert model.metadata_prefix([{}, {}]).shape == (2, 2, 32)
    if level != "top":  # one upper condition row per frame, added to the LM's input at that frame
        assert model.upper_condition(torch.zeros(2, 1, 2, dtype=torch.long)).shape == (2, 8, 32)


def _tiny_jukebox(window: int = 8) -> Jukebox:
    vq = HierarchicalVQVAE(SR, 1, **VQ)
    priors = {}
    for level in ("top", "middle", "bottom"):
        prior = LevelPrior(level, card=32, lm=LM, metadata=META)
        prior.codes_per_second.fill_(vq.frame_rates[level])
        prior.window_frames.fill_(window)
        priors[level] = prior
    return Jukebox(vq, priors).eval()


def test_the_jukebox_model_generates_top_to_bottom_with_sliding_windows():
    torch.manual_seed(0)
    jukebox = _tiny_jukebox()
    assert not isinstance(jukebox, L.LightningModule) and jukebox.fields == ["genre", "composer"]
    seen = []
    params = GenerationParams(seed=3)
    wav = jukebox.generate(["genre: reel", {"composer": "Bach"}], 0.3, params, lambda d, t: seen.append((d, t)))
    assert wav.shape == (2, 1, round(0.3 * SR))
    total = seen[-1][1]
    assert seen[-1][0] == total and all(t == total for _, t in seen)
    codes = jukebox.generate_codes([{}], 0.3, params)  # 0.3 s = 8 top frames; the bottom's 128 slide 8-frame windows
    assert {k: tuple(v.shape) for k, v in codes.items()} == {"top": (1, 1, 8), "middle": (1, 1, 32),
                                                             "bottom": (1, 1, 128)}
    assert total == sum(jukebox.priors[k].decoding_steps(n) for k, n in {"top": 8, "middle": 32, "bottom": 128}.items())
    assert torch.equal(jukebox.generate([{}], 0.3, params), jukebox.generate([""], 0.3, params))  # seeded
    wrong = _tiny_jukebox()
    with pytest.raises(ValueError, match="the middle prior was trained on 32 codes at 1 Hz"):
        wrong.priors["middle"].codes_per_second.fill_(1.0)
        Jukebox(wrong.vqvae, dict(wrong.priors))
    with pytest.raises(ValueError, match="the bottom prior is missing"):
        Jukebox(wrong.vqvae, {"top": wrong.priors["top"], "middle": wrong.priors["middle"]})


def test_a_bundle_names_only_models_that_exist(capsys, tmp_path):
    from ostinato.cli import main

    (tmp_path / "top").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["bundle", "jukebox", str(tmp_path / "b"), "--top", str(tmp_path / "top"), "--middle",
              str(tmp_path / "nope"), "--bottom", str(tmp_path / "top")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "--middle" in err and "nope" in err and "no such file, folder or XP signature" in err
    assert not (tmp_path / "b").exists()


# -- through the CLI ---------------------------------------------------------------------------------------------
VQ_CLI = ["experiment=jukebox_vqvae_tiny", "family.vqvae.n_filters=4", "family.vqvae.card=32",
          "family.vqvae.dimension=16", "data.segment_seconds=0.25", "data.eval_segment_seconds=0.5",
          "data.eval_batch_size=8", "trainer.validate_first=false", "data.batches_per_epoch=2"]  # validation runs
LEVELS = ("top", "middle", "bottom")
PRIOR_CLI = {"top": ["data.segment_seconds=0.512"], "middle": ["data.segment_seconds=0.128"],
             "bottom": ["data.segment_seconds=0.032"]}


def _prior_args(level: str) -> list[str]:
    return [f"experiment=jukebox_{level}_tiny", "family.card=32", "family.lm.dim=32", "family.lm.num_layers=1",
            "family.lm.ffn_dim=64", "family.metadata.buckets=64", "data.eval_batch_size=8",
            "trainer.validate_first=false", "data.batches_per_epoch=2", *PRIOR_CLI[level]]


def test_cli_trains_resumes_exports_bundles_generates_and_evaluates(env, tmp_path):
    import ostinato
    from ostinato.encoding.arrays import encode_shards
    from ostinato.engine.weights import export, load_weights
    from ostinato.generation.jukebox import load_bundle, write_bundle
    from tests.synth import write_tiny_encodec

    data = Path(env["OSTINATO_DATA"]) / "demo"
    runs = [[*VQ_CLI, "trainer.max_steps=2"]] + [[*_prior_args(level), "trainer.max_steps=2"] for level in LEVELS]
    vq_folder, *prior_folders = xp_folders(env, *runs, [*_prior_args("bottom"), "trainer.max_steps=4"])
    folder4 = prior_folders.pop()
    train(env, *runs[0])
    # validation logs every level's codebook perplexity over the validation set into the XP's history
    valid = [e["valid"] for e in json.loads((vq_folder / "history.json").read_text()) if "valid" in e]
    assert valid and all(1.0 <= float(valid[-1][f"perplexity_level{k}"]) <= 32 for k in range(3)), valid
    export(vq_folder, tmp_path / "vqvae")  # what `ostinato export` runs
    for split in ("train", "valid", "test"):
        m = encode_shards(str(tmp_path / "vqvae"), data / "shards" / split, data / "jukebox" / split, progress=False)
    assert list(m.streams) == ["top", "middle", "bottom"] and m.streams["bottom"].card == 32
    assert m.streams["bottom"].rate == 4 * m.streams["middle"].rate == 16 * m.streams["top"].rate
    dm = ArrayDataModule(data / "jukebox" / "train", streams=["middle", "top"], segment_seconds=0.128, batch_size=4,
                         num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.arrays["middle"].shape == (4, 1, 12) and batch.arrays["top"].shape == (4, 1, 3)

    exports = {}
    for level, run, folder in zip(LEVELS, runs[1:], prior_folders):
        train(env, *run)
        exports[level] = tmp_path / level
        export(folder, exports[level])
    # an export loads as the plain inference model, not as its training wrapper
    prior, vq = ostinato.load(exports["top"]), ostinato.load(tmp_path / "vqvae")
    assert type(prior) is LevelPrior and type(vq) is HierarchicalVQVAE
    assert not isinstance(prior, L.LightningModule) and not isinstance(vq, L.LightningModule)
    assert prior.frame_rate == m.streams["top"].rate and prior.window == 12  # 0.512 s of top codes
    assert json.loads((exports["top"] / "export.json").read_text())["model"] == "ostinato.models.jukebox:LevelPrior"
    # continue_from: an export's model tensors and a checkpoint's wrapper tensors both land in the wrapper's model
    cfg = OmegaConf.load(exports["top"] / "config.yaml")
    for source in (exports["top"], prior_folders[0] / "checkpoints" / "last.ckpt"):
        wrapper = instantiate(cfg.family, _convert_="all")
        report = load_weights(wrapper, source)
        assert not report.missing and not report.unexpected and not report.mismatched, report.summary()
        mine = wrapper.model.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in prior.state_dict().items())
    # the bottom upsampler resumes mid-way from a 2-step checkpoint
    (folder4 / "checkpoints").mkdir(parents=True)
    shutil.copy(prior_folders[-1] / "checkpoints" / "last.ckpt", folder4 / "checkpoints" / "last.ckpt")
    resumed = train(env, *_prior_args("bottom"), "trainer.max_steps=4")
    assert "resuming" in resumed.stderr
    assert torch.load(folder4 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    bundle = tmp_path / "bundle"
    cli(env, "bundle", "jukebox", str(bundle), "--top", str(exports["top"]), "--middle", str(exports["middle"]),
        "--bottom", str(exports["bottom"]))
    out = tmp_path / "gen"
    cli(env, "generate", "--model", str(bundle), "--prompt", "genre: chorale, composer: Bach",
         "--prompt", "genre: reel", "--seconds", "1.0", "--seed", "0", "--out", str(out), "--quiet")
    wav, sr = sf.read(out / "001.wav", dtype="float32")
    record = json.loads((out / "000.json").read_text())
    assert sr == SR and wav.shape == (SR,) and record["metadata"] == {"genre": "chorale", "composer": "Bach"}
    assert record["models"]["vqvae"] == str(tmp_path / "vqvae")  # recorded by the priors' array shards
    jukebox = load_bundle(str(bundle))  # seeded: the same clips in-process
    assert type(jukebox) is Jukebox and not isinstance(jukebox, L.LightningModule)
    assert type(ostinato.load(bundle)) is Jukebox  # the bundle is a model ref like any other
    metas = [{"genre": "chorale", "composer": "Bach"}, {"genre": "reel"}]
    assert jukebox.metadata(["genre: chorale, composer: Bach", "genre: reel"]) == metas
    again = jukebox.generate(metas, 1.0, GenerationParams(cfg_scale=3.0, top_k=250, seed=0))
    assert (again[1, 0].clamp(-1, 1) - torch.from_numpy(wav)).abs().max() < 2 / 32768

    encodec = write_tiny_encodec(tmp_path / "encodec")
    # `ostinato eval jukebox_demo --model BUNDLE`: the registry finds Jukebox's producer by the bundle file
    proc = cli(env, "eval", "jukebox_demo", "--model", str(bundle), "--out", str(tmp_path / "eval"), "--quiet",
               "--num-samples", "2", "--set", "seconds=0.5", "--set", f"embedding=codec:{encodec}",
               "--set", f"reference={data / 'shards' / 'test'}", "--set", "batch_size=2")
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["suite"] == "jukebox_demo" and result["settings"]["family"] == "jukebox"
    assert result["metrics"]["fad"] >= 0 and result["metrics"]["diversity_pairs"] == 1
    assert -1 <= result["metrics"]["diversity_spectral_sim_mean"] <= 1 and "diversity_spectral_sim_mean" in proc.stdout
    write_bundle(tmp_path / "b2", str(exports["top"]), str(exports["middle"]), str(exports["bottom"]),
                 vqvae=str(tmp_path / "vqvae"))
    assert json.loads((tmp_path / "b2" / "jukebox.json").read_text())["vqvae"] == str(tmp_path / "vqvae")
