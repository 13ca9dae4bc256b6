"""MusicGen-Melody import: audiocraft 1.3.0's own melody LM (``chroma2music``: chroma and text prepended) and
transformers' ``MusicgenMelodyForConditionalGeneration``, with random weights, -> an ostinato export whose chroma,
logits and greedy tokens (CFG 1 and 3) equal the source's for a batch of prompts and melodies of different lengths;
generation with a melody file and fine-tuning of the import."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

import ostinato
from ostinato.engine.weights import load_weights
from ostinato.interop.musicgen_import import detect_source, import_musicgen
from ostinato.models.musicgen import MusicGen
from ostinato.nn.conditioners import default_text_model
from ostinato.nn.decoding import GenerationParams, generate
from ostinato.nn.patterns import DelayPattern
from tests.references import (
    audiocraft,
    audiocraft_export_lm,
    audiocraft_lm_cfg,
    copy_tokenizer,
    t5_config,
    use_local_t5,
    write_t5,
)
from tests.synth import tune

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

CARD, SR, T5_DIM = 64, 32000, 32
TEXTS = ["a baroque chorale for organ", "an irish reel on fiddle and flute at a fast tempo", "jazz"]
NOTES = [(0.9, [60, 64, 67, 72]), (0.45, [69, 62]), (0.7, [71, 66, 59])]  # seconds, MIDI notes: 3 lengths
# (name, audiocraft config overrides): melody and melody-large are one architecture at two sizes (tiny here);
# stereo-melody has 2 channels, 8 codebooks interleaved L/R, delays [0, 0, 1, 1, 2, 2, 3, 3]
SIZES = {"melody": dict(n_q=4, dim=48, num_heads=4, num_layers=2),
         "melody-large": dict(n_q=4, dim=64, num_heads=8, num_layers=3, hidden_scale=2),
         "stereo-melody": dict(n_q=8, dim=48, num_heads=4, num_layers=2, channels=2,
                               delays=[0, 0, 1, 1, 2, 2, 3, 3])}


MELODIES = [tune(s, n, SR) for s, n in NOTES]


def noise(seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    """``[1, T]`` white noise: its chroma is full of near-ties, which tell resamplers apart."""
    return 0.1 * torch.randn(1, round(seconds * sr), generator=torch.Generator().manual_seed(seed))






@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_t5(tmp_path_factory.mktemp("t5"))


def delay_seq(n_q: int, delays: list[int], b: int = 3, t: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq, _ = DelayPattern(n_q, delays).build(torch.randint(0, CARD, (b, n_q, t), generator=g), CARD)
    return seq


def prefix_of(model: MusicGen, texts: list[str] = TEXTS) -> torch.Tensor:
    """The imported model's prefix for ``texts`` and ``MELODIES`` (the chroma of the batch, as its source computes
    it): ``[B, P, dim]``."""
    chroma = model.melody.batch_features(MELODIES, SR)
    if model.melody.frames is not None:
        chroma = model.fit_chroma(chroma, model.melody.frames)
    return model.prefix(None, model.melody(chroma), model.text_tokens(texts))


def ours_greedy(model: MusicGen, n_frames: int, cfg: float, backend: str = "cache") -> torch.Tensor:
    pre = prefix_of(model)
    null = None
    if model.melody.chroma == "transformers":  # its null melody is pitch class C, not zeros
        frames = model.melody.frames
        text = torch.zeros_like(model.text_tokens(TEXTS))
        null = model.prefix(None, model.melody(model.melody.null(len(TEXTS), frames)), text)
    params = GenerationParams(temperature=0.0, cfg_scale=cfg, backend=backend)
    with torch.no_grad():
        return generate(model.lm, model.pattern, n_frames, params=params, batch_size=len(TEXTS),
                        prefix=(lambda s, n: (pre, null)) if null is not None else pre)


# -- audiocraft ---------------------------------------------------------------------------------------------
def audiocraft_attributes(texts: list[str] = TEXTS) -> list:
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    attrs = []
    for text, wav in zip(texts, MELODIES):
        attr = ConditioningAttributes(text={"description": text})
        attr.wav["self_wav"] = WavCondition(wav[None], torch.tensor([wav.shape[-1]]), sample_rate=[SR], path=[None],
                                            seek_time=[None])
        attrs.append(attr)
    return attrs


@pytest.fixture(scope="module", params=sorted(SIZES))
def audiocraft_melody(request, t5: Path, hf_import, tmp_path_factory: pytest.TempPathFactory):
    """(audiocraft LMModel, its state_dict.bin through audiocraft's export_lm, ostinato's import with the
    transformers model's 32 kHz EnCodec as its codec, size)."""
    audiocraft()
    size = dict(SIZES[request.param])
    cfg = audiocraft_lm_cfg("chroma", card=CARD, sample_rate=SR, **size)
    folder = tmp_path_factory.mktemp(f"ac_{request.param}")
    return (*audiocraft_import(cfg, t5, folder, str(hf_import.out / "codec")), size)


def audiocraft_import(cfg, t5: Path, folder: Path, codec: str):
    """(audiocraft's LMModel of ``cfg``, its state_dict.bin through audiocraft's export_lm, ostinato's import)."""
    from audiocraft.models.builders import get_lm_model

    torch.manual_seed(2)
    with pytest.MonkeyPatch.context() as mp:
        use_local_t5(mp, t5)
        lm = get_lm_model(cfg).eval()
    with torch.no_grad():  # sharp heads: greedy decoding without near-ties
        for head in lm.linears:
            head.weight.mul_(20)
    src = audiocraft_export_lm(lm, cfg, folder / "state_dict.bin")
    return lm, src, import_musicgen(src, folder / "import", text_encoder=t5, codec=codec)


def test_audiocraft_melody_import_records_the_source(audiocraft_melody) -> None:
    _, src, result, size = audiocraft_melody
    assert detect_source(src) == ("audiocraft", src)
    family = yaml.safe_load((result.out / "config.yaml").read_text())["family"]
    assert family["text"]["fuse"] == "prefix" and family["lm"]["cross_attention"] is False
    assert family["semantics"]["text_padding"] == "attended"
    assert family["melody"] == {"sample_rate": SR, "hop_seconds": 4096 / SR, "n_fft": 16384,
                                "chroma": "audiocraft", "stems": "mix", "dropout": 0.0}
    assert family["delays"] == size.get("delays", list(range(size["n_q"])))
    model = ostinato.load(result.out)
    assert model.lm.layers[0].cross_attn is None and model.condition(TEXTS) == (None, None)
    assert "audiocraft chroma of the whole melody" in result.summary() and "--melody" in result.finetune_hint()


def test_audiocraft_melody_chroma_equals_its_chroma_extractor(audiocraft_melody) -> None:
    lm, _, result, _ = audiocraft_melody
    model = ostinato.load(result.out)
    provider = lm.condition_provider
    tokenized = provider.tokenize(audiocraft_attributes())
    with torch.no_grad():
        ref, mask = provider.conditioners["self_wav"](tokenized["self_wav"])  # [B, F, dim], masked
        ours = model.melody(model.melody.batch_features(MELODIES, SR))
    assert ours.shape == ref.shape and mask.sum(1).tolist() == [math.ceil(w.shape[-1] / 4096) for w in MELODIES]
    assert (ours - ref).abs().max().item() <= 1e-5
    chroma = model.melody.features(MELODIES[0][None], SR)[0]
    assert chroma.sum(-1).tolist() == [1.0] * 8 and chroma.argmax(-1).tolist()[::2] == [0, 4, 7, 0]  # C E G C
    exact = model.melody.features(torch.randn(1, 1, 6 * 4096), SR)[0]  # T // hop + 1 frames, the last masked
    assert exact.sum(-1).tolist() == [1.0] * 6 + [0.0]
    # a 48 kHz melody: audiocraft's generate_with_chroma resamples it with its convert_audio (julius)
    from audiocraft.data.audio_utils import convert_audio
    from audiocraft.modules.conditioners import WavCondition

    tune = noise(0.9, 48000)  # near-ties between pitch classes: another resampler flips some frames
    at_sr = convert_audio(tune[None], 48000, SR, 1)
    cond = WavCondition(at_sr, torch.tensor([at_sr.shape[-1]]), [SR], [None], [None])
    with torch.no_grad():
        ref, _ = provider.conditioners["self_wav"](provider.conditioners["self_wav"].tokenize(cond))
        ours = model.melody(model.melody.batch_features([tune], 48000))
    assert (ours - ref).abs().max().item() <= 1e-5


def test_audiocraft_melody_logits_and_greedy_tokens_match(audiocraft_melody) -> None:
    lm, _, result, size = audiocraft_melody
    model = ostinato.load(result.out)
    delays = size.get("delays", list(range(size["n_q"])))
    seq = delay_seq(size["n_q"], delays)
    with torch.no_grad():
        ref = lm(seq, audiocraft_attributes())
        ours = model.lm(seq, prefix=prefix_of(model))
    assert ours.shape == ref.shape == (3, size["n_q"], seq.shape[-1], CARD)
    assert (ours - ref).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):
        with torch.no_grad():
            theirs = lm.generate(conditions=audiocraft_attributes(), max_gen_len=6, use_sampling=False,
                                 cfg_coef=cfg, two_step_cfg=False)
        mine = ours_greedy(model, 6, cfg)
        assert torch.equal(mine, theirs) and len(torch.unique(mine)) > 3, cfg
        assert torch.equal(ours_greedy(model, 6, cfg, backend="static"), theirs)  # the fast decoding step


def test_audiocraft_melody_matched_to_the_segment_length(t5: Path, hf_import, tmp_path: Path) -> None:
    """``chroma_stem.match_len_on_eval: true``: the chroma is looped or cut to the training segment's frames and
    never masked, so the null melody is pitch class C: the import records transformers' chroma semantics."""
    cfg = audiocraft_lm_cfg("chroma", card=CARD, sample_rate=SR, **SIZES["melody"])
    cfg.conditioners.self_wav.chroma_stem.match_len_on_eval = True
    cfg.dataset.segment_duration = 2.0
    cfg.attribute_dropout = {"args": {"active_on_eval": False}, "text": {}, "wav": {"self_wav": 0.5}}  # the yaml's
    lm, _, result = audiocraft_import(cfg, t5, tmp_path, str(hf_import.out / "codec"))
    model = ostinato.load(result.out)
    assert (model.melody.chroma, model.melody.frames) == ("transformers", 2 * SR // 4096 + 1)
    assert model_melody(result.out)["dropout"] == 0.5  # fine-tuning leaves the melody out as audiocraft trained
    seq = delay_seq(4, [0, 1, 2, 3])
    with torch.no_grad():
        ref = lm(seq, audiocraft_attributes())
        ours = model.lm(seq, prefix=prefix_of(model))
    assert (ours - ref).abs().max().item() <= 1e-4
    with torch.no_grad():
        theirs = lm.generate(conditions=audiocraft_attributes(), max_gen_len=6, use_sampling=False, cfg_coef=3.0,
                             two_step_cfg=False)
    assert torch.equal(ours_greedy(model, 6, 3.0), theirs)


@pytest.mark.parametrize("audiocraft_melody", ["melody"], indirect=True)
def test_generate_takes_the_whole_melody_as_audiocraft_does(audiocraft_melody) -> None:
    """One window: audiocraft's generate_with_chroma prepends the chroma of the whole melody (0.9 s here), not the
    part under the 0.06 s output."""
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningAttributes, WavCondition

    from ostinato.generation.request import AudioInput

    lm, _, result, _ = audiocraft_melody
    model = ostinato.load(result.out)
    tune = MELODIES[0]
    attrs = []
    for text in TEXTS[:2]:
        attr = ConditioningAttributes(text={"description": text})
        attr.wav["self_wav"] = WavCondition(tune[None], torch.tensor([tune.shape[-1]]), [SR], [None], [None])
        attrs.append(attr)
    with torch.no_grad():
        theirs = lm.generate(conditions=attrs, max_gen_len=6, use_sampling=False, cfg_coef=3.0, two_step_cfg=False)
        expected = model.codec.decode(theirs)[..., :round(0.06 * SR)]
    prefixes, forward = [], model.lm.forward

    def spy(*args, **kwargs):  # the prefix the LM reads (its first, prefilling call)
        if kwargs.get("prefix") is not None:
            prefixes.append(kwargs["prefix"])
        return forward(*args, **kwargs)

    model.lm.forward = spy
    params = GenerationParams(temperature=0.0, cfg_scale=3.0, backend="cache")
    wav = model.generate(TEXTS[:2], 0.06, melody=AudioInput(tune, SR), params=params)
    assert wav.shape == expected.shape and torch.allclose(wav, expected, atol=1e-6)
    provider = lm.condition_provider
    with torch.no_grad():
        null = ClassifierFreeGuidanceDropout(p=1.0)(attrs)
        tensors = provider(provider.tokenize(attrs + null))  # the conditional rows, then CFG's null ones
        ref, _ = lm.fuser(torch.zeros(4, 0, model.cfg.dim), tensors)
    assert tensors["self_wav"][0].shape[1] == 8  # the whole melody's chroma frames
    assert prefixes[0].shape == ref.shape and (prefixes[0] - ref).abs().max().item() <= 1e-5


def decoded_batch(codec, n_q: int = 4, n_frames: int = 30, seed: int = 3):
    """A token batch of 3 items (the last one shorter) and its audio as the family decodes it."""
    from ostinato.data.token_datamodule import TokenBatch

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (3, n_q, n_frames), generator=g)
    lengths = torch.tensor([n_frames, n_frames, n_frames - 7])
    codes[2, :, -7:] = 0
    with torch.no_grad():
        wav = codec.decode(codes)
    wav = wav * (torch.arange(wav.shape[-1])[None] < (lengths * codec.hop_length)[:, None])[:, None]
    return TokenBatch(codes, lengths, TEXTS, [{"caption": t} for t in TEXTS]), wav


def test_finetuning_an_audiocraft_melody_import_prepends_like_audiocraft(audiocraft_melody) -> None:
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    from ostinato.families.musicgen import ImportedMusicGenFamily

    lm, _, result, size = audiocraft_melody
    family = ImportedMusicGenFamily(export=str(result.out)).eval()
    assert not load_weights(family, result.out).missing  # what continue_from=OUT does
    batch, wav = decoded_batch(family.model.codec, size["n_q"])
    assert wav.shape[1] == size.get("channels", 1)  # stereo-melody: the interleaved stereo codec of the import
    c = family.batch_conditions(batch, batch.codes, batch.lengths, None, train=False)
    assert c.cond is None and c.mask is None
    attrs = []
    for text, item in zip(TEXTS, wav):  # the whole decoded segment, as audiocraft's solver gives self_wav
        attr = ConditioningAttributes(text={"description": text})
        attr.wav["self_wav"] = WavCondition(item[None], torch.tensor([item.shape[-1]]), [SR], [None], [None])
        attrs.append(attr)  # audiocraft averages a stereo melody's channels, as ostinato does
    with torch.no_grad():
        tensors = lm.condition_provider(lm.condition_provider.tokenize(attrs))
        ref, _ = lm.fuser(torch.zeros(3, 0, size["dim"]), tensors)  # the prefix audiocraft prepends
    assert c.prefix.shape == ref.shape and (c.prefix - ref).abs().max().item() <= 1e-5
    # the loss: audiocraft's solver cross-entropy per codebook (its mask: the batch's padding, the pattern's steps)
    from audiocraft.solvers.musicgen import MusicGenSolver

    padding = torch.arange(batch.codes.shape[-1])[None, None, :] < batch.lengths[:, None, None]
    with torch.no_grad():
        pred = lm.compute_predictions(batch.codes, attrs)
        _, theirs = MusicGenSolver._compute_cross_entropy(None, pred.logits, batch.codes, padding & pred.mask)
        ours, _ = family.compute_losses(batch.codes, batch.lengths, c.cond, c.mask, c.prefix)
    assert (ours - torch.stack(theirs)).abs().max().item() <= 1e-4  # of losses ~40 (sharpened heads)
    loss = family.losses(batch, train=True).mean()
    loss.backward()
    assert torch.isfinite(loss) and family.model.melody.proj.weight.grad.abs().sum() > 0
    assert family.model.text.proj.weight.grad.abs().sum() > 0


# -- transformers ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_melody(tmp_path_factory: pytest.TempPathFactory):
    return build_hf_melody(tmp_path_factory.mktemp("hf_melody"))


def build_hf_melody(folder: Path, channels: int = 1):
    """A tiny random MusicgenMelodyForConditionalGeneration (T5 32 wide, EnCodec 32 kHz 4 x 64, decoder 48 wide
    over 4 codebooks per channel, chroma_length 11) saved in ``folder`` with its feature extractor and the MiniLM
    tokenizer."""
    from transformers import (
        EncodecConfig,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyFeatureExtractor,
        MusicgenMelodyForConditionalGeneration,
    )

    torch.manual_seed(channels)
    codec = EncodecConfig(sampling_rate=SR, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2],
                          codebook_size=CARD, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                          target_bandwidths=[2.56], use_causal_conv=False, normalize=False)
    decoder = MusicgenMelodyDecoderConfig(num_codebooks=4 * channels, vocab_size=CARD, hidden_size=48,
                                          num_attention_heads=4, num_hidden_layers=2, ffn_dim=96,
                                          max_position_embeddings=256, dropout=0.0, pad_token_id=CARD,
                                          bos_token_id=CARD, audio_channels=channels)
    config = MusicgenMelodyConfig(text_encoder=t5_config().to_dict(), audio_encoder=codec.to_dict(),
                                  decoder=decoder.to_dict(), chroma_length=11)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    with torch.no_grad():
        for head in model.decoder.lm_heads:
            head.weight.mul_(20)
    model.save_pretrained(folder)
    features = MusicgenMelodyFeatureExtractor(sampling_rate=SR)
    features.save_pretrained(folder)
    copy_tokenizer(folder)
    return model, features, folder


def hf_inputs(features, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_text_model(), local_files_only=True)
    enc = tok(texts, padding=True, return_tensors="pt")
    chroma = features([w[0].numpy() for w in MELODIES], sampling_rate=SR, return_tensors="pt")["input_features"]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "input_features": chroma}


@pytest.fixture(scope="module")
def hf_import(hf_melody, tmp_path_factory: pytest.TempPathFactory):
    _, _, folder = hf_melody
    return import_musicgen(folder, tmp_path_factory.mktemp("hf_import") / "import")


def hf_greedy(model, inputs: dict[str, torch.Tensor], n_frames: int, cfg: float,
              pattern: DelayPattern | None = None) -> torch.Tensor:
    """transformers' own conditional (+ null, for CFG) prefix rows, decoded step by step without a cache."""
    from transformers import GenerationConfig

    kwargs = model._prepare_encoder_hidden_states_kwargs_for_generation(
        inputs["input_ids"], {"attention_mask": inputs["attention_mask"],
                              "input_features": inputs["input_features"]}, "input_ids",
        GenerationConfig(guidance_scale=cfg))
    states = kwargs["encoder_hidden_states"]
    pattern = pattern or DelayPattern(4)
    b, k = inputs["input_ids"].shape[0], pattern.n_q
    valid = pattern.valid_mask(n_frames)
    seq = torch.full((b, k, pattern.max_steps(n_frames)), CARD)
    for step in range(seq.shape[-1] - 1):
        rows = seq[:, :, :step + 1].repeat(states.shape[0] // b, 1, 1)
        with torch.no_grad():
            logits = model(encoder_hidden_states=states, decoder_input_ids=rows.reshape(-1, step + 1)).logits
        logits = logits.reshape(-1, k, logits.shape[1], CARD)[:, :, -1]
        if cfg != 1.0:
            cond, null = logits.split(b)
            logits = null + (cond - null) * cfg
        seq[:, :, step + 1] = torch.where(valid[:, step + 1], logits.argmax(-1), CARD)
    return pattern.revert(seq, n_frames)[0]


def test_transformers_melody_import_matches(hf_melody, hf_import) -> None:
    model, features, folder = hf_melody
    assert detect_source(folder) == ("transformers-melody", folder)
    family = yaml.safe_load((hf_import.out / "config.yaml").read_text())["family"]
    assert family["melody"] == {"sample_rate": SR, "hop_seconds": 4096 / SR, "n_fft": 16384,
                                "chroma": "transformers", "frames": 11, "stems": "mix", "dropout": 0.0}
    assert family["text"]["fuse"] == "prefix" and family["semantics"]["text_padding"] == "attended"
    ours_model = ostinato.load(hf_import.out)
    inputs = hf_inputs(features)
    assert torch.equal(ours_model.melody.batch_features(MELODIES, SR), inputs["input_features"])
    at_48k = [noise(s, 48000, seed=i) for i, (s, _) in enumerate(NOTES)]  # resampled as its extractor does
    longest = max(w.shape[-1] for w in at_48k)  # it resamples a batch tensor (zero-padded to the longest)
    batch = torch.stack([torch.nn.functional.pad(w[0], (0, longest - w.shape[-1])) for w in at_48k])
    theirs = features(batch, sampling_rate=48000, return_tensors="pt")["input_features"]
    assert torch.equal(ours_model.melody.batch_features(at_48k, 48000), theirs)
    seq = delay_seq(4, [0, 1, 2, 3])
    b, k, s = seq.shape
    with torch.no_grad():
        ref = model(**inputs, decoder_input_ids=seq.reshape(b * k, s)).logits.reshape(b, k, -1, CARD)[:, :, -s:]
        ours = ours_model.lm(seq, prefix=prefix_of(ours_model))
    assert (ours - ref).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):
        mine, theirs = ours_greedy(ours_model, 6, cfg), hf_greedy(model, inputs, 6, cfg)
        assert torch.equal(mine, theirs) and len(torch.unique(mine)) > 3, cfg
        assert torch.equal(ours_greedy(ours_model, 6, cfg, backend="static"), theirs)


def test_transformers_stereo_melody_import_matches(tmp_path: Path) -> None:
    """musicgen-stereo-melody: 8 codebooks (L/R interleaved, delays 0,0,1,1,2,2,3,3) over the mono EnCodec."""
    from ostinato.nn.patterns import stereo_delays

    model, features, folder = build_hf_melody(tmp_path / "src", channels=2)
    result = import_musicgen(folder, tmp_path / "import")
    ours = ostinato.load(result.out)
    assert ours.pattern.delays == stereo_delays(4) == [0, 0, 1, 1, 2, 2, 3, 3] and ours.codec.channels == 2
    inputs = hf_inputs(features)
    seq = delay_seq(8, stereo_delays(4))
    b, k, s = seq.shape
    with torch.no_grad():
        ref = model(**inputs, decoder_input_ids=seq.reshape(b * k, s)).logits.reshape(b, k, -1, CARD)[:, :, -s:]
        assert (ours.lm(seq, prefix=prefix_of(ours)) - ref).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):
        mine = ours_greedy(ours, 6, cfg)
        assert torch.equal(mine, hf_greedy(model, inputs, 6, cfg, DelayPattern(8, stereo_delays(4)))), cfg
        assert len(torch.unique(mine)) > 3


def test_generate_with_a_melody_file_from_an_import(hf_melody, hf_import, tmp_path: Path) -> None:
    import soundfile as sf

    from ostinato.cli import main
    from ostinato.generation.request import AudioInput

    model, features, _ = hf_melody
    ours = ostinato.load(hf_import.out)
    tune = MELODIES[0]
    # MusicGen.generate (what `ostinato generate` runs) and transformers' generate: one melody, two prompts,
    # greedy, CFG 3
    ref_inputs = hf_inputs(features, TEXTS[:2])
    ref_inputs["input_features"] = features([tune[0].numpy()] * 2, sampling_rate=SR,
                                            return_tensors="pt")["input_features"]
    params = GenerationParams(temperature=0.0, cfg_scale=3.0, backend="cache")
    wav = ours.generate(TEXTS[:2], 0.06, melody=AudioInput(tune, SR), params=params)
    with torch.no_grad():  # transformers' own generate: 6 frames + 3 delay steps, decoded by its EnCodec
        expected = model.generate(**ref_inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=9)
    assert wav.shape == expected.shape == (2, 1, round(0.06 * SR))
    assert torch.allclose(wav, expected, atol=1e-6) and expected.abs().max() > 1e-3
    # the CLI, with a melody file
    sf.write(tmp_path / "tune.wav", tune[0].numpy(), SR)
    main(["generate", "--model", str(hf_import.out), "--prompt", TEXTS[0], "--melody", str(tmp_path / "tune.wav"),
          "--seconds", "0.06", "--temperature", "0", "--out", str(tmp_path / "clips"), "--quiet"])
    clip, rate = sf.read(tmp_path / "clips" / "000.wav")
    assert rate == SR and clip.shape[0] == round(0.06 * SR)
    assert torch.allclose(torch.from_numpy(clip).float(), expected[0, 0], atol=1e-4)


def test_finetuning_a_transformers_melody_import_uses_its_null_melody(hf_melody, hf_import) -> None:
    from transformers import GenerationConfig

    from ostinato.families.musicgen import ImportedMusicGenFamily

    model, features, _ = hf_melody
    family = ImportedMusicGenFamily(export=str(hf_import.out), cfg_dropout=1.0)
    assert not load_weights(family, hf_import.out).missing
    batch, wav = decoded_batch(family.model.codec)
    chroma = features([w[0].numpy() for w in wav], sampling_rate=SR, return_tensors="pt")["input_features"]
    inputs = {**hf_inputs(features), "input_features": chroma}
    kwargs = model._prepare_encoder_hidden_states_kwargs_for_generation(
        inputs["input_ids"], {"attention_mask": inputs["attention_mask"], "input_features": chroma}, "input_ids",
        GenerationConfig(guidance_scale=3.0))
    cond, null = kwargs["encoder_hidden_states"].split(3)  # transformers' conditional and null prefix rows
    with torch.no_grad():
        c = family.batch_conditions(batch, batch.codes, batch.lengths, None, train=False)
        dropped = family.batch_conditions(batch, batch.codes, batch.lengths, None, train=True)
    assert (c.prefix - cond).abs().max().item() <= 1e-5  # chroma of the decoded audio, looped, then the text
    # what valid/ce_text_only scores: the null melody, the texts kept
    assert torch.equal(c.text_only[:, 11:], c.prefix[:, 11:])
    assert (c.text_only[:, :11] - null[:, :11]).abs().max().item() <= 1e-6
    # CFG dropout: transformers' null melody (pitch class C), and the empty texts' zero states
    assert (dropped.prefix[:, :11] - null[:, :11]).abs().max().item() <= 1e-6
    assert not dropped.prefix[:, 11:].any() and not torch.equal(null[:, :11], cond[:, :11])


# -- what the melody import refuses -----------------------------------------------------------------------------
@pytest.mark.parametrize("audiocraft_melody", ["melody"], indirect=True)
def test_melody_imports_refuse_what_they_cannot_reproduce(hf_melody, audiocraft_melody, tmp_path: Path,
                                                          capsys) -> None:
    from omegaconf import OmegaConf

    from ostinato.cli import main
    from ostinato.nn.chroma import MelodyConditioner

    model, _, _ = hf_melody
    model.decoder.save_pretrained(tmp_path / "decoder")  # a MusicgenMelodyForCausalLM: no chroma projection
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(tmp_path / "decoder"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "import the whole MusicgenMelodyForConditionalGeneration folder" in capsys.readouterr().err
    _, src, _, _ = audiocraft_melody
    package = torch.load(src, weights_only=False)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.conditioners.self_wav.chroma_stem.argmax = False
    torch.save({**package, "xp.cfg": OmegaConf.to_yaml(cfg)}, tmp_path / "soft.bin")
    with pytest.raises(ValueError, match=r"conditioners\.self_wav\.chroma_stem needs n_chroma=12 and argmax=true"):
        import_musicgen(tmp_path / "soft.bin", tmp_path / "out2", text_encoder=tmp_path)
    with pytest.raises(ValueError, match="set family.semantics.text_padding=attended"):
        MusicGen(n_q=4, card=CARD, lm={"preset": "tiny"}, text={"fuse": "prefix"})
    with pytest.raises(ValueError, match="family.melody.chroma='librosa': use one of ostinato, audiocraft"):
        MelodyConditioner(8, SR, chroma="librosa")


# -- end to end: audiocraft's MusicGen.generate_with_chroma ------------------------------------------------------
@pytest.fixture(scope="module")
def audiocraft_musicgen(t5: Path, tmp_path_factory: pytest.TempPathFactory):
    """audiocraft's whole melody MusicGen (its LM and EnCodec, random weights, max_duration 0.1 s) and the import of
    its exported state_dict.bin + compression_state_dict.bin."""
    audiocraft()
    from audiocraft.models import builders
    from audiocraft.models.musicgen import MusicGen as ACMusicGen

    from tests.references import audiocraft_encodec_cfg, audiocraft_export_compression

    folder = tmp_path_factory.mktemp("ac_musicgen")
    codec_cfg = audiocraft_encodec_cfg(n_q=4, bins=CARD, dimension=16, n_filters=4, lstm=1)
    torch.manual_seed(5)
    codec = builders.get_compression_model(codec_cfg).eval()
    audiocraft_export_compression(codec, codec_cfg, folder / "compression_state_dict.bin")
    cfg = audiocraft_lm_cfg("chroma", card=CARD, sample_rate=SR, **SIZES["melody"])
    lm, src, result = audiocraft_import(cfg, t5, folder, str(folder / "compression_state_dict.bin"))
    ac = ACMusicGen("melody-test", codec, lm, max_duration=30.0)  # its constructor checks its 18 s default stride
    ac.max_duration = 0.1  # the window: 10 frames at 100 Hz
    return ac, result


@pytest.mark.parametrize("duration", [0.08, 0.25])  # one window; three windows of 0.1 s sliding by 0.05 s
def test_generation_equals_audiocraft_generate_with_chroma(audiocraft_musicgen, duration: float) -> None:
    from ostinato.generation.request import AudioInput
    from ostinato.models.musicgen import LongForm

    ac, result = audiocraft_musicgen
    model = ostinato.load(result.out)
    tune = MELODIES[0]
    ac.set_generation_params(use_sampling=False, duration=duration, cfg_coef=3.0, extend_stride=0.05)
    with torch.no_grad():
        theirs = ac.generate_with_chroma(TEXTS[:2], tune[None].expand(2, -1, -1), SR)
    params = GenerationParams(temperature=0.0, cfg_scale=3.0, backend="cache")
    ours = model.generate(TEXTS[:2], duration, melody=AudioInput(tune, SR), params=params,
                          long_form=LongForm("window", window=0.1, stride=0.05))
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() <= 1e-5


def test_lora_on_a_melody_import_trains_adapters_from_its_loss(hf_import) -> None:
    """``family.lora`` on a melody import: the adapters start at the import's loss (zero-initialised) and are the
    only trained tensors; the chroma and text projections stay the import's."""
    from ostinato.families.musicgen import ImportedMusicGenFamily

    base = ImportedMusicGenFamily(export=str(hf_import.out))
    tuned = ImportedMusicGenFamily(export=str(hf_import.out), lora={"rank": 4})
    for family in (base, tuned):
        load_weights(family, hf_import.out)
        family.eval()
    batch, _ = decoded_batch(base.model.codec)
    with torch.no_grad():
        assert (tuned.losses(batch, train=False) - base.losses(batch, train=False)).abs().max().item() <= 1e-5
    tuned.train()
    tuned.losses(batch, train=True).mean().backward()
    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained) and all(p.grad is not None for n, p in
                                                                     tuned.named_parameters() if n in trained)
    assert tuned.model.melody.proj.weight.grad is None and tuned.model.text.proj.weight.grad is None


def model_melody(export: Path) -> dict:
    """The ``melody`` section an import's config.yaml records."""
    return yaml.safe_load((export / "config.yaml").read_text())["family"]["melody"]
