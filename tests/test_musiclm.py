"""The MusicLM family: aligned semantic / codec / MuLaN token streams, the three stages (semantic, coarse, fine),
the text -> audio pipeline with MuLaN reranking and continuation, and `ostinato generate --family musiclm`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from ostinato.data.musiclm_tokens import MuLaNTokens, MusicLMTokenDataModule, aligned_crop
from ostinato.encoding.mulan import write_mulan_tokens
from ostinato.data.tokens import CodecInfo, TokenManifest, TokenShard, encode_codes

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SEM = CodecInfo(id="semantic", hash="0", sample_rate=16000, channels=1, frame_rate=25.0, n_q=1, card=32)
CODEC = CodecInfo(id="synthetic", hash="0", sample_rate=24000, channels=1, frame_rate=75.0, n_q=4,
                  card=64)
MULAN_NQ, MULAN_CARD = 2, 8


def _write(folder: Path, info: CodecInfo, items: list[tuple[str, torch.Tensor]], per_shard: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(items), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for key, codes in items[s:s + per_shard]:
                meta = {"caption": f"clip {key}", "frames": codes.shape[-1], "frame_rate": info.frame_rate}
                w.write({"__key__": key, "codes.npy": encode_codes(codes), "json": json.dumps(meta).encode()})
        shards.append(TokenShard(name=name, samples=len(items[s:s + per_shard]),
                                 frames=sum(c.shape[-1] for _, c in items[s:s + per_shard])))
    TokenManifest(shards=shards, codec=info).save(folder)


def sem_codes(frames: int, shift: int = 0) -> torch.Tensor:
    """Semantic frame j -> (j + shift) % 8: a short repeating pattern, [1, F]."""
    return ((torch.arange(frames) + shift) % 8)[None]


def codec_codes(frames: int, shift: int = 0) -> torch.Tensor:
    """Codec frame t (semantic frame t // 3), codebook k -> ((t // 3 + shift) % 8) * 4 + k + (t % 3) * 16 ... mod 64."""
    t = torch.arange(frames)
    return torch.stack([(((t // 3 + shift) % 8) * 4 + k + (t % 3) * 32) % 64 for k in range(4)])


def write_streams(root: Path, seconds: list[float], first: int = 0, ramp: bool = False, sem_info: CodecInfo = SEM,
                  codec_info: CodecInfo = CODEC, mulan_source: str = "", quantizer: str = "") -> dict[str, str]:
    """Semantic (25 Hz) + codec (75 Hz) token shards and MuLaN tokens of the same clips; ``ramp``: frame values
    count up (for alignment checks)."""
    keys = [f"s{first + i:05d}" for i in range(len(seconds))]
    sem, cod = [], []
    for i, (key, sec) in enumerate(zip(keys, seconds)):
        fs, fc = round(sec * 25), round(sec * 75)
        if ramp:
            sem.append((key, torch.arange(fs)[None] % 32))
            cod.append((key, (torch.arange(fc)[None].repeat(4, 1)) % 64))
        else:
            sem.append((key, sem_codes(fs, i)))
            cod.append((key, codec_codes(fc, i)))
    _write(root / "semantic", sem_info, sem)
    _write(root / "codec", codec_info, cod)
    idx = torch.arange(len(keys))
    MuLaNTokens(keys, {"semantic": torch.stack([idx % MULAN_CARD, (idx + 1) % MULAN_CARD], 1),
                       "coarse": torch.stack([(idx + 2) % MULAN_CARD, idx % MULAN_CARD], 1)},
                {"semantic": MULAN_CARD, "coarse": MULAN_CARD}, mulan_source, quantizer).save(root / "mulan")
    return {"semantic": str(root / "semantic"), "codec": str(root / "codec"), "mulan": str(root / "mulan")}


# -- data ----------------------------------------------------------------------------------------------------
def test_aligned_crop_starts_at_the_same_time_in_every_stream():
    sem, cod = torch.arange(50)[None], torch.arange(150)[None]
    rng = np.random.default_rng(0)
    for _ in range(20):
        crops, valid, start = aligned_crop({"semantic": sem, "codec": cod}, {"semantic": 25.0, "codec": 75.0},
                                           0.4, rng)
        assert crops["semantic"].shape == (1, 10) and crops["codec"].shape == (1, 30)
        assert int(crops["codec"][0, 0]) == 3 * int(crops["semantic"][0, 0]) == round(start * 75)
        assert valid == {"semantic": 10, "codec": 30}
    # a clip shorter than the crop: padded, valid frames count the same duration in both streams
    crops, valid, start = aligned_crop({"semantic": sem[:, :5], "codec": cod[:, :16]},
                                       {"semantic": 25.0, "codec": 75.0}, 0.4, rng)
    assert start == 0 and valid == {"semantic": 5, "codec": 15}


def test_datamodule_joins_streams_by_key_with_aligned_crops(tmp_path):
    spec = write_streams(tmp_path / "train", [2.0] * 6 + [0.1], ramp=True)
    valid_spec = write_streams(tmp_path / "valid", [1.0] * 3, first=100, ramp=True)
    dm = MusicLMTokenDataModule(spec, valid_spec, segment_seconds=0.4, batch_size=3, batches_per_epoch=4,
                                num_workers=0, shuffle_buffer=2)
    dm.setup("fit")
    assert dm.codec.n_q == 4 and dm.semantic.frame_rate == 25.0 and dm.mulan_tokens.card["coarse"] == MULAN_CARD
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    mulan = MuLaNTokens.load(spec["mulan"])
    rows = mulan.lookup()
    for b in batches:
        assert b.semantic.shape == (3, 1, 10) and b.codes.shape == (3, 4, 30)
        assert b.semantic_lengths.tolist() == [10] * 3 and b.code_lengths.tolist() == [30] * 3
        for m, sem, codes in zip(b.meta, b.semantic, b.codes):  # both cut at the same start time
            start = m["offset_seconds"]
            assert torch.equal(sem[0], (round(start * 25) + torch.arange(10)) % 32)
            assert torch.equal(codes[0], (round(start * 75) + torch.arange(30)) % 64)
        for m, tok in zip(b.meta, b.mulan["semantic"]):
            assert torch.equal(tok, mulan.tokens["semantic"][rows[m["__key__"]]])
        assert all(m["__key__"] != "s00006" for m in b.meta)  # 0.1 s: under half a crop
    evals = list(dm.val_dataloader())
    assert sum(len(b) for b in evals) == 3 and all(m["offset_seconds"] == 0 for b in evals for m in b.meta)
    only = MusicLMTokenDataModule(spec, segment_seconds=0.4, batch_size=2, streams=["codec"], num_workers=0)
    b = next(iter(only.train_dataloader()))
    assert b.semantic is None and b.mulan == {} and b.codes.shape == (2, 4, 30)


class StubMuLaN(torch.nn.Module):
    """MuLaN's interface: ``embed_audio(wav [B, C, T], sr) -> [B, D]`` and ``embed_text(texts) -> [B, D]``,
    L2-normalised. Audio: a few band energies; text: a hash of the words."""

    sample_rate, dim = 8000, 4

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def embed_audio(self, wav, sample_rate=None, lengths=None):
        x = wav.float().mean(1) if wav.dim() == 3 else wav.float()
        spec = torch.fft.rfft(x, dim=-1).abs()
        bands = torch.stack([b.sum(-1) for b in spec.chunk(self.dim, dim=-1)], -1)
        return F.normalize(bands + 1e-6, dim=-1)

    def embed_text(self, texts):
        rows = [torch.tensor([float((hash(w) % 7) + 1) for w in (t + " a b c d").split()[:self.dim]]) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


class StubQuantizer:
    """``MuLaNQuantizer``'s interface: ``tokens(emb [B, D], namespace) -> [B, n_q]``."""

    namespaces = ("semantic", "coarse")

    def tokens(self, emb, namespace):
        q = (emb[:, :MULAN_NQ].abs() * MULAN_CARD).long().clamp(max=MULAN_CARD - 1)
        return q if namespace == "semantic" else q.flip(1)

    def card(self, namespace):
        return MULAN_CARD


def test_write_mulan_tokens_embeds_every_clip_once(tmp_path):
    from tests.synth import write_shards

    write_shards(tmp_path / "audio", n_shards=2, per_shard=3, sample_rate=8000, seconds=0.5)
    mulan, quantizer = StubMuLaN(), StubQuantizer()
    tokens = write_mulan_tokens(tmp_path / "audio", tmp_path / "mulan", mulan, quantizer, batch_size=4)
    loaded = MuLaNTokens.load(tmp_path / "mulan")
    assert loaded.keys == [f"s{i:05d}" for i in range(6)] and loaded.card == {"semantic": 8, "coarse": 8}
    assert loaded.tokens["semantic"].shape == (6, MULAN_NQ)
    assert torch.equal(loaded.tokens["coarse"], tokens.tokens["coarse"])
    # array shards of the shared writer: one per audio shard, one [n_q, 1] stream per namespace, resumable
    from ostinato.data.array_shards import ArrayManifest

    manifest = ArrayManifest.load(tmp_path / "mulan")
    assert manifest.model.kind == "mulan" and [s.name for s in manifest.shards] == ["shard-000000.tar",
                                                                                    "shard-000001.tar"]
    assert {ns: (s.channels, s.card) for ns, s in manifest.streams.items()} == {
        "semantic": (MULAN_NQ, MULAN_CARD), "coarse": (MULAN_NQ, MULAN_CARD)}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_mulan_tokens(tmp_path / "audio", tmp_path / "mulan", mulan, quantizer)
    (tmp_path / "mulan" / "manifest.json").unlink()  # a run stopped before its manifest: finished shards are kept
    (tmp_path / "mulan" / "shard-000001.json").unlink()
    again = write_mulan_tokens(tmp_path / "audio", tmp_path / "mulan", mulan, quantizer, batch_size=4)
    assert again.keys == loaded.keys and torch.equal(again.tokens["semantic"], loaded.tokens["semantic"])


# -- stages --------------------------------------------------------------------------------------------------
TINY_LM = {"preset": "tiny", "dim": 32, "num_heads": 2, "num_layers": 1, "ffn_dim": 64}


def stages(pattern: str = "unroll"):
    from ostinato.families.musiclm import CoarseStage, FineStage, SemanticStage

    torch.manual_seed(0)
    kw = dict(mulan_n_q=MULAN_NQ, mulan_card=MULAN_CARD, lm=TINY_LM, cfg_dropout=0.0)
    return (SemanticStage(SEM.card, **kw),
            CoarseStage(CODEC.card, coarse_q=2, semantic_card=SEM.card, pattern=pattern, **kw),
            FineStage(CODEC.n_q, CODEC.card, coarse_q=2, pattern=pattern, lm=TINY_LM))


def fixed_batch(b: int = 4, seconds: float = 0.4, short: int | None = None):
    from ostinato.data.musiclm_tokens import MusicLMBatch

    fs, fc = round(seconds * 25), round(seconds * 75)
    sem = torch.stack([sem_codes(fs, i) for i in range(b)])
    codes = torch.stack([codec_codes(fc, i) for i in range(b)])
    sl, cl = torch.full((b,), fs), torch.full((b,), fc)
    if short is not None:
        sl[0], cl[0] = short, 3 * short
    mulan = {"semantic": torch.arange(b * MULAN_NQ).view(b, MULAN_NQ) % MULAN_CARD,
             "coarse": (torch.arange(b * MULAN_NQ).view(b, MULAN_NQ) + 3) % MULAN_CARD}
    return MusicLMBatch(sem, sl, codes, cl, mulan, [{"__key__": str(i)} for i in range(b)])


@pytest.mark.parametrize("pattern", ["unroll", "delay"])
def test_stage_losses_ignore_invalid_positions(pattern):
    for stage in stages(pattern):
        stage.eval()
        batch = fixed_batch(short=4)
        ce = stage.losses(batch, train=False)
        assert ce.shape == (stage.model.n_q,) and torch.isfinite(ce).all()
        # codes past an item's valid length (all streams) change nothing
        batch.semantic[0, :, 4:] = 7 - batch.semantic[0, :, 4:]
        batch.codes[0, :, 12:] = 63 - batch.codes[0, :, 12:]
        assert torch.allclose(stage.losses(batch, train=False), ce, atol=1e-6)


def test_each_stage_learns_a_repeated_pattern_in_a_few_steps():
    for stage in stages():
        opt = torch.optim.Adam(stage.parameters(), lr=3e-3)
        batch = fixed_batch()
        first = None
        for _ in range(15):
            loss = stage.losses(batch, train=True).mean()
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.8 * first, (type(stage).__name__, first, loss.item())


# -- the pipeline -------------------------------------------------------------------------------------------
def tiny_semantic_tokenizer(seed: int = 0):
    """A real MFCC k-means tokenizer (16 kHz, 25 Hz, K = 32) with random centroids."""
    from ostinato.models.semantic import MFCCFeatures, SemanticTokenizer

    g = torch.Generator().manual_seed(seed)
    feats = MFCCFeatures(16000, 25.0)
    return SemanticTokenizer(feats, torch.randn(SEM.card, feats.dim, generator=g),
                             torch.zeros(feats.dim), torch.full((feats.dim,), 10.0))


def tiny_codec():
    """A random ostinato codec shaped like CODEC: 24 kHz, hop 320 (75 Hz), 4 x 64 codes."""
    from ostinato.models.codec import Codec

    torch.manual_seed(1)
    return Codec.build(sample_rate=24000, dimension=8, n_filters=4, ratios=[8, 5, 8], n_q=4, card=64,
                             kmeans_init=False).eval()


def pipeline(window: float | None = 0.4):
    from ostinato.models.mulan import MuLaNQuantizer
    from ostinato.models.musiclm import MusicLM

    sem, coarse, fine = (stage.model for stage in stages())
    for stage in (sem, coarse, fine):
        stage.rates.copy_(torch.tensor([25.0, 75.0]))
        stage.eval()
    mulan = StubMuLaN()
    quantizer = MuLaNQuantizer(mulan.dim, n_q=MULAN_NQ, card=MULAN_CARD, kmeans_iters=5)
    quantizer.fit_(F.normalize(torch.rand(64, mulan.dim, generator=torch.Generator().manual_seed(0)), dim=-1))
    model = MusicLM(sem, coarse, fine, mulan, quantizer, tiny_codec(), tiny_semantic_tokenizer(),
                    windows={"semantic": window, "coarse": window, "fine": window})
    model.check()
    return model


def test_pipeline_gives_the_requested_length_and_keeps_the_best_mulan_candidate():
    from ostinato.nn.decoding import GenerationParams

    model = pipeline(window=0.4)  # 1.03 s = past two and a half windows in every stage
    calls = []
    out = model.sample(["a chorale for organ", "a fiddle reel", ""], 1.03, params=GenerationParams(top_k=8, seed=0),
                       num_candidates=3, progress=lambda done, total: calls.append((done, total)))
    n = round(1.03 * 24000)
    assert out.wav.shape == (3, 1, n) and out.candidates.shape == (3, 3, 1, n)
    assert out.semantic.shape == (3, 3, 1, round(1.03 * 25)) and out.codes.shape == (3, 3, 4, round(1.03 * 75))
    assert calls[-1][0] == calls[-1][1] and all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    # the scores are the MuLaN cosines of each candidate's audio with its prompt, and the best one is kept
    texts = model.mulan.embed_text(["a chorale for organ", "a fiddle reel"])
    for p in range(2):
        scores = model.mulan.embed_audio(out.candidates[p], 24000) @ texts[p]
        assert torch.allclose(out.scores[p], scores, atol=1e-5)
        assert len(set(out.scores[p].tolist())) == 3  # distinct candidates: the choice means something
        assert int(out.best[p]) == int(scores.argmax()) and torch.equal(out.wav[p], out.candidates[p, scores.argmax()])
    assert out.scores[2].abs().sum() == 0 and int(out.best[2]) == 0  # unconditional: not reranked
    # the candidates differ; the seed reproduces the whole pipeline
    assert not torch.equal(out.codes[0, 0], out.codes[0, 1])
    again = model.sample(["a chorale for organ", "a fiddle reel", ""], 1.03, params=GenerationParams(top_k=8, seed=0),
                         num_candidates=3)
    assert torch.equal(again.codes, out.codes)
    # generate() is the best candidate's audio of the same pipeline
    wav = model.generate(["a chorale for organ", "a fiddle reel", ""], duration=1.03,
                         params=GenerationParams(top_k=8, seed=0), num_candidates=3)
    assert torch.equal(wav, out.wav)


def test_pipeline_continuation_starts_with_the_prompt_tokens():
    from ostinato.nn.decoding import GenerationParams
    from ostinato.generation.request import AudioInput

    model = pipeline(window=0.4)
    t = torch.arange(round(0.6 * 24000)) / 24000
    audio = AudioInput((0.3 * torch.sin(2 * torch.pi * 330 * t) * (1 + torch.sin(2 * torch.pi * 3 * t)))[None], 24000)
    out = model.sample(["a chorale"], 1.0, audio.wav, num_candidates=2, params=GenerationParams(top_k=8, seed=1),
                       continuation_sample_rate=audio.sample_rate)
    sem_prompt = model.semantic_tokenizer.encode(audio.at(16000, 1))
    codes_prompt = model.codec.encode(audio.at(24000, 1)).codes
    assert sem_prompt.shape[-1] == 15 and codes_prompt.shape[-1] == 45
    for c in range(2):
        assert torch.equal(out.semantic[0, c, :, :15], sem_prompt[0])
        assert torch.equal(out.codes[0, c, :, :45], codes_prompt[0])
    assert out.codes.shape[-1] == 75 and out.wav.shape == (1, 1, 24000)
    with pytest.raises(ValueError, match="not shorter than the requested duration"):
        model.sample(["x"], 0.5, audio.wav, params=GenerationParams(seed=1), continuation_sample_rate=24000)


def test_coarse_guidance_keeps_the_semantic_tokens_in_the_null_condition():
    """CFG's null condition of the coarse stage drops the MuLaN tokens only: with a guidance scale, the coarse
    codes still follow the semantic tokens (the stage sees them in both halves)."""
    from ostinato.nn import decoding as lm

    model = pipeline(window=None)
    seen = []
    real = lm._Decoder.window_prefix

    def spy(self, start, n_frames):
        pre = real(self, start, n_frames)
        seen.append((self.cfg_on, pre))
        return pre

    from ostinato.nn.decoding import GenerationParams

    lm._Decoder.window_prefix = spy
    try:
        model.generate(["a chorale"], 0.4, params=GenerationParams(top_k=8, seed=0, cfg_scale=3.0))
    finally:
        lm._Decoder.window_prefix = real
    (sem_cfg, sem_pre), (coarse_cfg, coarse_pre), (fine_cfg, fine_pre) = seen
    assert sem_cfg and coarse_cfg and not fine_cfg
    assert sem_pre.shape[0] == 2 and sem_pre[1].abs().sum() == 0  # semantic: zero null prefix
    full, null = coarse_pre[0], coarse_pre[1]
    assert null[:MULAN_NQ].abs().sum() == 0 and full[:MULAN_NQ].abs().sum() > 0
    assert torch.equal(full[MULAN_NQ:], null[MULAN_NQ:])  # the semantic part is kept
    assert fine_pre.shape[0] == 1


def test_parts_that_do_not_fit_are_named():
    model = pipeline()
    model.fine.coarse_q = 3
    with pytest.raises(ValueError, match="fine stage expects 3 coarse codebooks"):
        model.check()


# -- end to end ----------------------------------------------------------------------------------------------
STAGE_RUNS = {
    "semantic": ["family.card=32"],
    "coarse": ["family.card=256", "family.semantic_card=32"],
    "fine": ["family.card=256", "family.n_q=4"],
}
TINY_MULAN = {"sample_rate": 24000, "dim": 8, "text": {"model": None},
              "audio": {"window_seconds": 0.5, "depth": 1, "patch_time": 4, "dim": 16, "heads": 2, "ffn_dim": 32}}


def write_parts(root: Path) -> dict[str, str]:
    """What the stages' data records: a codec (tiny transformers EnCodec, 4 x 256 at 75 Hz), a semantic tokenizer,
    a MuLaN export and its fitted quantizer (2 x 8 per namespace)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ostinato.families.mulan import MuLaNFamily
    from ostinato.models.mulan import MuLaNQuantizer
    from tests.synth import write_tiny_encodec

    codec = write_tiny_encodec(root / "codec", 24000)
    tokenizer = tiny_semantic_tokenizer().save(root / "semantic_tokenizer")
    torch.manual_seed(0)
    family = MuLaNFamily(**TINY_MULAN)
    (root / "mulan").mkdir()
    save_file({k: v.contiguous() for k, v in family.model.state_dict().items()},  # an export: the model's tensors
              str(root / "mulan" / "model.safetensors"))
    OmegaConf.save({"family": {"_target_": "ostinato.families.mulan.MuLaNFamily", **TINY_MULAN}},
                   root / "mulan" / "config.yaml")
    with torch.no_grad():
        emb = family.model.embed_audio(torch.randn(32, 1, 12000) * 0.1, 24000)
    quantizer = MuLaNQuantizer(8, n_q=MULAN_NQ, card=MULAN_CARD, kmeans_iters=5).fit_(emb)
    quantizer.save(root / "quantizer.safetensors")
    return {"codec": str(codec), "semantic_tokenizer": str(tokenizer), "mulan": str(root / "mulan"),
            "quantizer": str(root / "quantizer.safetensors")}


@pytest.fixture(scope="module")
def demo_streams(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Aligned token streams in the demo layout whose manifests name real parts (``write_parts``)."""
    root = tmp_path_factory.mktemp("musiclm")
    parts = write_parts(root)
    data = root / "data"
    sem = CodecInfo(id=parts["semantic_tokenizer"], hash="0", sample_rate=16000, channels=1, frame_rate=25.0, n_q=1,
                    card=32)
    codec = CodecInfo(id=parts["codec"], hash="0", sample_rate=24000, channels=1, frame_rate=75.0, n_q=4,
                      card=256)
    for i, split in enumerate(("train", "valid", "test")):
        spec = write_streams(data / "staging" / split, [1.0] * 4, first=100 * i, sem_info=sem, codec_info=codec,
                             mulan_source=parts["mulan"], quantizer=parts["quantizer"])
        for stream, folder in (("semantic", "semantic"), ("codec", "tokens"), ("mulan", "mulan")):
            (data / "demo" / folder).mkdir(parents=True, exist_ok=True)
            Path(spec[stream]).rename(data / "demo" / folder / split)
    return data, parts


def _stage_run(stage: str, steps: int) -> list[str]:
    lm = ["family.lm.dim=32", "family.lm.num_heads=2", "family.lm.num_layers=1", "family.lm.ffn_dim=64"]
    mulan = [] if stage == "fine" else [f"family.mulan_n_q={MULAN_NQ}", f"family.mulan_card={MULAN_CARD}"]
    return [f"experiment=musiclm_{stage}_tiny", *STAGE_RUNS[stage], *lm, *mulan, "data.segment_seconds=0.4",
            f"trainer.max_steps={steps}", f"trainer.checkpoint_every_steps={steps}", "data.eval_batch_size=4",
            "trainer.limit_val_batches=1", "data.batches_per_epoch=4"]


@pytest.fixture(scope="module")
def stage_xps(env, demo_streams, tmp_path_factory) -> dict:
    """The three stages trained through `ostinato train` (3 steps each) on ``demo_streams``."""
    from tests.runner import train, xp_folder

    data, parts = demo_streams
    run_env = {**env, "OSTINATO_DATA": str(data), "OSTINATO_OUTPUTS": str(tmp_path_factory.mktemp("out")),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    folders = {}
    for stage in ("semantic", "coarse", "fine"):
        train(run_env, *_stage_run(stage, 3))
        folders[stage] = xp_folder(run_env, *_stage_run(stage, 3))
    return {"env": run_env, "folders": folders, "parts": parts}


def test_a_stage_whose_card_is_not_its_tokens_names_both_numbers_the_key_and_the_fix():
    from types import SimpleNamespace

    from ostinato.errors import DataMismatch
    from ostinato.families.musiclm import CoarseStage, SemanticStage

    fitted = CodecInfo(id="data/demo/semantic_tokenizer", hash="0", sample_rate=16000, channels=1, frame_rate=25.0,
                       n_q=1, card=500)  # `ostinato prep semantic`'s default k
    dm = SimpleNamespace(semantic=fitted, codec=CODEC)
    kw = dict(mulan_n_q=MULAN_NQ, mulan_card=MULAN_CARD, lm=TINY_LM)
    for stage, key in ((SemanticStage(64, **kw), "card"),
                       (CoarseStage(CODEC.card, coarse_q=2, semantic_card=64, **kw), "semantic_card")):
        stage._trainer = SimpleNamespace(datamodule=dm)
        with pytest.raises(DataMismatch) as e:
            stage.setup("fit")
        assert str(e.value) == (f"family.{key}=64 but the semantic tokens (data/demo/semantic_tokenizer) have 500 "
                                f"codes: set family.{key}=500 (or leave it out: the stage reads the data's manifest),"
                                " or `ostinato prep semantic --k 64` and tokenize the splits again")


def test_train_refuses_a_card_override_that_its_tokens_do_not_have_in_one_line(env, demo_streams, tmp_path):
    from tests.runner import train

    data, _ = demo_streams
    run_env = {**env, "OSTINATO_DATA": str(data), "OSTINATO_OUTPUTS": str(tmp_path / "out")}
    run = [a for a in _stage_run("semantic", 1) if not a.startswith("family.card=")] + ["family.card=64"]
    proc = train(run_env, *run, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "ostinato train: error: family.card=64 but the semantic tokens") and "set family.card=32" in proc.stderr
    assert not list((tmp_path / "out").rglob("*.ckpt"))  # refused before any step


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_stage_trains_through_the_engine(stage, stage_xps):
    folder = stage_xps["folders"][stage]
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    rates = ckpt["state_dict"]["model.rates"].tolist()  # frames/s of the streams the stage reads (the model's)
    assert ckpt["global_step"] == 3
    assert rates[0] == (25.0 if stage != "fine" else 0.0) and rates[1] == (75.0 if stage != "semantic" else 0.0)
    metrics = (folder / "csv" / "metrics.csv").read_text()
    assert "train/ce_q0" in metrics and "valid/ce" in metrics
    assert ("train/ce_q1" in metrics) == (stage != "semantic")


def test_a_stage_resumes_and_exports(stage_xps, tmp_path):
    import subprocess
    import sys

    import lightning.pytorch as pl

    import ostinato
    from ostinato.models.musiclm import SemanticLM
    from tests.runner import train

    folder = stage_xps["folders"]["semantic"]
    before = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    proc = train(stage_xps["env"], *_stage_run("semantic", 3))  # the same XP again resumes (and stops: it is done)
    assert "resuming" in proc.stderr + proc.stdout
    after = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 3 and all(torch.equal(before[k], after["state_dict"][k]) for k in before)
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "ostinato.cli", "export", str(folder), str(out)], env=stage_xps["env"],
                   check=True, capture_output=True)
    module = ostinato.load(out)  # the stage model, not its training wrapper
    assert type(module) is SemanticLM and not isinstance(module, pl.LightningModule)
    assert module.semantic_rate == 25.0 and module.card == 32
    from_xp = ostinato.load(folder)
    assert type(from_xp) is SemanticLM and all(torch.equal(v, from_xp.state_dict()[k])
                                               for k, v in module.state_dict().items())


def test_cli_generates_from_text_and_continues_audio(stage_xps, tmp_path):
    import subprocess
    import sys

    import soundfile as sf

    folders, env = stage_xps["folders"], stage_xps["env"]
    base = [sys.executable, "-m", "ostinato.cli", "generate", "--family", "musiclm", "--semantic",
            str(folders["semantic"]), "--coarse", str(folders["coarse"]), "--fine", str(folders["fine"]),
            "--top-k", "8", "--seed", "0", "--quiet"]
    out = tmp_path / "text"
    proc = subprocess.run(base + ["--prompt", "an organ chorale", "--prompt", "a fiddle reel", "--rerank", "3",
                                  "--seconds", "1.1", "--out", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(2):
        wav, sr = sf.read(out / f"{i:03d}.wav")
        assert sr == 24000 and len(wav) == round(1.1 * 24000)
        record = json.loads((out / f"{i:03d}.json").read_text())
        assert record["family"] == "musiclm" and len(record["mulan_scores"]) == 3
        assert record["chosen"] == max(range(3), key=record["mulan_scores"].__getitem__)
        # MuLaN and its quantizer were found through the stages' MuLaN tokens
        assert record["mulan"] == stage_xps["parts"]["mulan"] and record["quantizer"] == stage_xps["parts"]["quantizer"]
    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, (0.2 * np.sin(2 * np.pi * 220 * np.arange(12000) / 24000)).astype(np.float32), 24000)
    cont = tmp_path / "cont"
    proc = subprocess.run(base + ["--continue", str(prompt), "--seconds", "1.0", "--out", str(cont)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(sf.read(cont / "000.wav")[0]) == 24000
    bad = subprocess.run(base[:-6] + ["--quiet", "--out", str(tmp_path / "x")], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--fine" in bad.stderr


def test_a_bundle_generates_without_family_and_continues_from_an_export(stage_xps, tmp_path):
    """``ostinato bundle musiclm`` names the three stages; ``generate --model BUNDLE`` needs no --family; a stage
    wrapper continues from an export (the model's keys) and from a checkpoint (the wrapper's)."""
    import subprocess
    import sys

    import soundfile as sf
    from omegaconf import OmegaConf

    from ostinato.engine.weights import load_weights
    from ostinato.families.musiclm import CoarseStage
    from ostinato.generation.musiclm import load_bundle
    from ostinato.registry import bundle_family

    folders, env = stage_xps["folders"], stage_xps["env"]
    cli = [sys.executable, "-m", "ostinato.cli"]
    export = tmp_path / "coarse_export"
    subprocess.run(cli + ["export", str(folders["coarse"]), str(export)], env=env, check=True, capture_output=True)
    bundle = tmp_path / "bundle"
    proc = subprocess.run(cli + ["bundle", "musiclm", str(bundle), "--semantic", str(folders["semantic"]),
                                 "--coarse", str(export), "--fine", str(folders["fine"])],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bundle_family(str(bundle)).name == "musiclm"
    out = tmp_path / "clips"
    proc = subprocess.run(cli + ["generate", "--model", str(bundle), "--prompt", "a reel", "--seconds", "0.5",
                                 "--top-k", "8", "--seed", "0", "--quiet", "--out", str(out)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(sf.read(out / "000.wav")[0]) == 12000
    assert json.loads((out / "000.json").read_text())["coarse"] == str(export.resolve())
    # README's continuation: the bundle continues the clip the line before wrote
    proc = subprocess.run(cli + ["generate", "--model", str(bundle), "--continue", str(out / "000.wav"), "--seconds",
                                 "1.0", "--top-k", "8", "--seed", "0", "--quiet", "--out", str(tmp_path / "cont")],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(sf.read(tmp_path / "cont" / "000.wav")[0]) == 24000
    model = load_bundle(bundle)
    assert model.sources["mulan"] == stage_xps["parts"]["mulan"]
    import ostinato
    from ostinato.models.musiclm import MusicLM

    assert type(ostinato.load(bundle)) is MusicLM  # the bundle is a model ref like any other

    # the evaluation runner finds the family by the bundle file: a text_to_music suite runs, a retrieval one is refused
    from ostinato.evaluation.runner import run_suite
    from ostinato.evaluation.suite import SuiteError
    from tests.synth import write_shards

    write_shards(tmp_path / "ref", n_shards=1, per_shard=2, sample_rate=24000, seconds=0.5)
    result = run_suite("musiclm_demo", str(bundle), tmp_path / "eval", progress=False, cache=tmp_path / "cache",
                       overrides=["num_samples=2", "seconds=0.5", "batch_size=2", f"reference={tmp_path / 'ref'}",
                                  f"embedding=codec:{stage_xps['parts']['codec']}", "generation.top_k=8"])
    assert result["kind"] == "text_to_music" and result["settings"]["family"] == "musiclm"
    # the shipped suite reranks with the bundle's own MuLaN: 3 candidates per prompt, the best-scored one kept
    assert result["rerank"]["candidates"] == 3 and all(
        r["kept"] == max(range(3), key=r["scores"].__getitem__) for r in result["rerank"]["items"])
    assert result["metrics"]["rerank_score_kept"] >= result["metrics"]["rerank_score_all"]
    assert result["metrics"]["fad"] >= 0 and len(list((tmp_path / "eval" / "generated").glob("*.wav"))) == 2
    assert result["settings"]["parts"]["coarse"] == str(export.resolve())
    with pytest.raises(SuiteError, match=r"mulan_demo.yaml: kind: a retrieval suite cannot run here: --model .* is a "
                                         r"MusicLM bundle, which runs text_to_music suites \(demo, musiclm_demo\)"):
        run_suite("mulan_demo", str(bundle), tmp_path / "x", progress=False)

    family = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(export / "config.yaml"))["family"].items()
              if k != "_target_"}
    for source in (export, folders["coarse"] / "checkpoints" / "last.ckpt"):
        wrapper = CoarseStage(**family)
        report = load_weights(wrapper, source)
        assert not report.missing and not report.unexpected and not report.mismatched, report.summary()
        assert all(torch.equal(v, model.coarse.state_dict()[k]) for k, v in wrapper.model.state_dict().items())


def test_cli_prep_mulan_fits_the_quantizer_and_tokenizes_every_split(tmp_path):
    import subprocess
    import sys

    from ostinato.models.mulan import MuLaNQuantizer
    from tests.synth import write_shards

    parts = write_parts(tmp_path / "parts")
    for split in ("train", "valid", "test"):
        write_shards(tmp_path / "shards" / split, n_shards=1, per_shard=6, sample_rate=24000, seconds=0.5)
    out = tmp_path / "mulan"
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "prep", "mulan", "--mulan", parts["mulan"],
                           "--shards", str(tmp_path / "shards"), "--out", str(out), "--n-q", "2", "--card", "4"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    quantizer = MuLaNQuantizer.load(out / "quantizer.safetensors")
    assert quantizer.n_q("semantic") == 2 and quantizer.card("coarse") == 4 and quantizer.fitted("coarse")
    for split in ("train", "valid", "test"):
        tokens = MuLaNTokens.load(out / split)
        assert len(tokens.keys) == 6 and tokens.tokens["semantic"].shape == (6, 2)
        assert int(tokens.tokens["coarse"].max()) < 4
        # generation finds MuLaN and the quantizer through these manifests
        assert tokens.source == parts["mulan"] and Path(tokens.quantizer) == (out / "quantizer.safetensors").resolve()
