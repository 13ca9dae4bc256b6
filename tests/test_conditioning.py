"""MusicGen's conditions are used: a small model learns to read an informative melody prefix, validation scores
each condition by nulling it alone, and every path that leaves the melody out (dropout, validation, generation
without a melody) feeds the same null prefix."""
from __future__ import annotations

import pytest
import torch

from ostinato.data.token_datamodule import TokenBatch
from ostinato.families.musicgen import MusicGenFamily
from ostinato.interop.codecs import load_codec
from ostinato.models.codec import Codec
from tests.synth import tune, write_tiny_encodec

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 8000  # the tiny EnCodec at 8 kHz runs at 25 frames per second
NOTE, NOTES = 0.256, 8  # each note holds two chroma frames (0.128 s), so its middle frame has a clean chroma
LM = dict(preset="tiny", dim=64, num_layers=2, num_heads=4, ffn_dim=128)
MELODY = dict(sample_rate=SR, hop_seconds=0.128, dropout=0.3)


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> Codec:
    return load_codec(write_tiny_encodec(tmp_path_factory.mktemp("codec") / "encodec", sample_rate=SR))


def melody_batch(codec: Codec, b: int, gen: torch.Generator) -> tuple[TokenBatch, torch.Tensor]:
    """Token items whose codes are the pitch class of the note sounding in each frame, and the audio of those notes
    (``[B, 1, S]`` at the codec's rate): without the melody every note's first frame is a guess among 12."""
    pcs = torch.randint(0, 12, (b, NOTES), generator=gen)
    wav = torch.stack([tune(NOTES * NOTE, (60 + p).tolist(), SR) for p in pcs])
    frames = int(NOTES * NOTE * codec.frame_rate)
    note = (torch.arange(frames) / codec.frame_rate / NOTE).long().clamp(max=NOTES - 1)
    codes = pcs[:, note][:, None]  # [B, 1, T]
    return TokenBatch(codes, torch.full((b,), frames), [""] * b, [{} for _ in range(b)]), wav


@pytest.fixture(scope="module")
def melody_family(codec: Codec) -> MusicGenFamily:
    """A melody-conditioned MusicGen trained 300 steps on ``melody_batch`` items (about 25 s on one core)."""
    torch.manual_seed(0)
    family = MusicGenFamily(n_q=1, card=codec.card, lm=LM, text=None, melody=MELODY, cfg_dropout=0.1)
    family.model.attach_codec(codec)
    opt = torch.optim.AdamW(family.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):  # the training step's path: melody (and CFG) dropout, the chroma of the segment's audio
        batch, wav = melody_batch(codec, 16, gen)
        c = family.batch_conditions(batch, batch.codes, batch.lengths, wav, train=True)
        ce, _ = family.compute_losses(batch.codes, batch.lengths, c.cond, c.mask, c.prefix, c.targets)
        opt.zero_grad()
        ce.mean().backward()
        opt.step()
    return family.eval()


def test_small_musicgen_learns_to_use_an_informative_melody(melody_family: MusicGenFamily, codec: Codec) -> None:
    family = melody_family
    batch, wav = melody_batch(codec, 64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        losses = {k: v.mean().item() for k, v in
                  family.condition_losses(batch, batch.codes, batch.lengths, wav).items()}
    assert set(losses) == {"ce", "ce_no_melody", "ce_text_only"}
    # 8 notes x ln 12 over 51 frames = 0.39 nats per token is what the melody can tell; 300 steps learn most of it
    assert losses["ce_no_melody"] - losses["ce"] >= 0.3, losses
    assert losses["ce_text_only"] == losses["ce_no_melody"]


def test_generation_follows_the_learned_melody(melody_family: MusicGenFamily, codec: Codec) -> None:
    from ostinato.generation.request import AudioInput
    from ostinato.nn.decoding import GenerationParams, generate

    model = melody_family.model
    batch, wav = melody_batch(codec, 8, torch.Generator().manual_seed(7))
    melodies = [AudioInput(w, SR) for w in wav]
    frames = batch.codes.shape[-1]
    accuracy = {}
    for name, melody in (("melody", melodies), ("none", None)):  # model.generate's prefix, before the decoder
        prefix = model._melody_prefix(melody, len(melodies), frames)
        codes = generate(model.lm, model.pattern, frames, params=GenerationParams(seed=0), batch_size=len(melodies),
                         prefix=prefix)
        accuracy[name] = (codes == batch.codes).float().mean().item()
    # the codes are the melody's pitch classes: followed with it, a guess among 12 per note without it
    assert accuracy["melody"] >= 0.9 and accuracy["none"] <= 0.3, accuracy


def test_validation_nulls_each_condition_alone(codec: Codec) -> None:
    torch.manual_seed(0)
    style = dict(features="codec", feature_dim=codec.dimension, width=32, num_layers=1, num_heads=2, n_q=2, card=16,
                 eval_q=1, downsample=5, excerpt_seconds=[0.5, 1.0], eval_excerpt_seconds=0.5, dropout=0.3)
    family = MusicGenFamily(n_q=2, card=codec.card, lm=LM, text={"max_length": 16}, melody=MELODY, style=style)
    family.model.attach_codec(codec)
    family.eval()
    batch, wav = melody_batch(codec, 2, torch.Generator().manual_seed(3))
    batch.meta = [{"caption": "a reel"}, {"caption": "a chorale"}]
    codes = torch.cat([batch.codes, batch.codes], dim=1)
    with torch.no_grad():
        c = family.batch_conditions(batch, codes, batch.lengths, wav, train=False)
        losses = family.condition_losses(batch, codes, batch.lengths, wav)
    assert set(losses) == {"ce", "ce_no_text", "ce_no_melody", "ce_no_style", "ce_text_only"}
    assert len({round(v.mean().item(), 6) for v in losses.values()}) == 5  # each scores a different input
    style_n = family.model._null_style_tokens()  # the style tokens come first, then the melody
    assert c.prefix is not None and c.cond is not None
    cond, mask, prefix = c.without["text"]  # the empty text of CFG dropout; the prefix kept
    assert torch.equal(prefix, c.prefix) and not mask[:, 1:].any() and not torch.equal(cond, c.cond)
    for name, kept, nulled in (("melody", slice(0, style_n), slice(style_n, None)),
                               ("style", slice(style_n, None), slice(0, style_n))):
        cond, mask, prefix = c.without[name]
        assert cond is c.cond and mask is c.mask and prefix is not None
        assert torch.equal(prefix[:, kept], c.prefix[:, kept])
        assert not prefix[:, nulled].any() and c.prefix[:, nulled].any()


def test_a_left_out_melody_is_the_same_null_in_training_validation_and_generation(codec: Codec) -> None:
    torch.manual_seed(0)
    family = MusicGenFamily(n_q=1, card=codec.card, lm=LM, text=None, melody={**MELODY, "dropout": 1.0})
    model = family.model
    model.attach_codec(codec)
    assert model.melody is not None and model.melody.proj.bias.abs().sum() > 0  # proj(zero chroma) is no null
    batch, wav = melody_batch(codec, 2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        dropped = family.batch_conditions(batch, batch.codes, batch.lengths, wav, train=True).prefix
        valid = family.batch_conditions(batch, batch.codes, batch.lengths, wav, train=False).text_only
        generation = model._melody_prefix(None, 2, batch.codes.shape[-1])  # generate() without --melody
        assert generation is not None
        generated = generation(0, batch.codes.shape[-1])
    assert dropped is not None and valid is not None
    assert not dropped.any() and torch.equal(dropped, valid) and torch.equal(generated, dropped)


def test_melody_adherence_scores_generations_with_and_without_the_melody(codec: Codec) -> None:
    from ostinato.generation.melody_adherence import melody_adherence
    from ostinato.generation.request import AudioInput
    from ostinato.nn.decoding import GenerationParams

    torch.manual_seed(0)
    model = MusicGenFamily(n_q=2, card=codec.card, lm=LM, text=None, melody=MELODY).model
    melodies = [AudioInput(tune(1.0, [60, 64, 67, 72], SR), SR), AudioInput(tune(0.6, [69, 65], 16000), 16000)]
    params = GenerationParams(seed=0, top_k=20)
    scores = melody_adherence(model, ["", ""], melodies, 1.0, params, codec=codec)
    assert set(scores) == {"chroma_cos_melody", "chroma_cos_unconditioned"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    # the melody reaches generation: the same seed gives other codes with it than without it
    torch.manual_seed(0)
    with_melody = model.generate(["", ""], 1.0, melody=melodies, params=params)
    assert not torch.equal(with_melody, model.generate(["", ""], 1.0, params=params))
    with pytest.raises(ValueError, match="one each"):
        melody_adherence(model, ["a"], melodies, 1.0, params)


def test_the_demo_shows_what_each_condition_adds(tmp_path) -> None:
    from ostinato.demo.pipeline import RETRIEVAL_SHOWN, condition_ces, condition_gaps, demo_table
    from ostinato.demo.report import write_demo_report

    valid = {"ce": 4.0, "ce_no_text": 4.2, "ce_no_melody": 4.35, "ce_no_style": 4.01, "ce_text_only": 4.4}
    ces = condition_ces(valid)
    assert list(ces) == ["valid/ce_no_text", "valid/ce_no_melody", "valid/ce_no_style"]
    assert condition_gaps(4.0, ces) == "text +0.200, melody +0.350, style +0.010"
    table = demo_table({}, 4.0, 4.4, 5.5, dict.fromkeys(RETRIEVAL_SHOWN, 0.5), None, None, ces)
    assert table["MusicGen"]["valid/ce_no_melody"] == 4.35
    page = write_demo_report(tmp_path / "report.html", [], table, {}).read_text()
    for name in ("ce_no_text", "ce_no_melody", "ce_no_style"):  # each row says which way is better
        assert f"<code>valid/{name}</code>" in page and "what the" in page


def test_melody_through_codec_scores_what_token_training_is_shown(codec: Codec) -> None:
    from ostinato.generation.melody_adherence import melody_through_codec
    from ostinato.generation.request import AudioInput

    clips = [AudioInput(tune(1.0, [60, 64, 67, 72], SR), SR), AudioInput(tune(1.0, [69, 65, 62, 70], 16000), 16000)]
    score = melody_through_codec(codec, clips)
    assert 0.0 <= score < 0.5  # a random codec keeps no melody: a melody prefix from its tokens would be noise


def test_small_musicgen_learns_to_use_its_style_tokens(codec: Codec) -> None:
    """Items of 16 kinds, each a fixed code sequence: the style excerpt (through the RVQ bottleneck) tells the kind,
    which nothing else tells before the first frame."""
    kinds, frames = 16, 20
    sequences = torch.randint(0, codec.card, (kinds, frames), generator=torch.Generator().manual_seed(0))

    def batch(b: int, gen: torch.Generator) -> TokenBatch:
        codes = sequences[torch.randint(0, kinds, (b,), generator=gen)][:, None]
        return TokenBatch(codes, torch.full((b,), frames), [""] * b, [{} for _ in range(b)])

    torch.manual_seed(0)
    style = dict(features="codec", feature_dim=codec.dimension, width=32, num_layers=1, num_heads=2, n_q=2, card=16,
                 eval_q=2, downsample=5, excerpt_seconds=[0.2, 0.4], eval_excerpt_seconds=0.4, dropout=0.3)
    family = MusicGenFamily(n_q=1, card=codec.card, lm=LM, text=None, style=style, cfg_dropout=0.1)
    family.model.attach_codec(codec)
    opt = torch.optim.AdamW(family.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(900):
        b = batch(16, gen)
        c = family.batch_conditions(b, b.codes, b.lengths, None, train=True)
        ce, _ = family.compute_losses(b.codes, b.lengths, c.cond, c.mask, c.prefix, c.targets)
        assert c.penalty is not None
        opt.zero_grad()
        (ce.mean() + c.penalty).backward()
        opt.step()
    family.eval()
    b = batch(64, torch.Generator().manual_seed(9))
    first = torch.zeros(64, frames, dtype=torch.bool)
    first[:, 0] = True  # the frame only the style can tell (ln 16 = 2.77 nats without it)
    with torch.no_grad():
        losses = family.condition_losses(b, b.codes, b.lengths, None)
        c = family.batch_conditions(b, b.codes, b.lengths, None, train=False)
        with_style = family.compute_losses(b.codes, b.lengths, c.cond, c.mask, c.prefix, first)[0].item()
        without = family.compute_losses(b.codes, b.lengths, *c.without["style"], first)[0].item()
    assert losses["ce_no_style"].mean() > losses["ce"].mean()
    assert without - with_style >= 0.8, (with_style, without)


def test_melody_training_on_audio_without_a_codec_is_one_line(tmp_path) -> None:
    """The demo's melody experiment reads audio shards and tokenizes them with ``family.codec``: without one (or
    with one that is not there) training stops in one line naming the key, exit 2."""
    from tests.runner import make_env, train

    env = make_env(tmp_path)
    for extra in ([], [f"family.codec={tmp_path / 'missing'}"]):
        proc = train(env, "experiment=musicgen_tiny_melody_style", "trainer.max_steps=1", "data.num_workers=0",
                     *extra, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("ostinato train: error: family.codec: "), proc.stderr[-2000:]


def test_small_musicgen_learns_to_use_its_text(codec: Codec) -> None:
    """Items of 12 kinds, each a fixed code sequence named by its caption: only the text tells the first frame."""
    names = ["C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B"]
    frames = 10
    sequences = torch.randint(0, codec.card, (len(names), frames), generator=torch.Generator().manual_seed(0))

    def batch(b: int, gen: torch.Generator) -> TokenBatch:
        kinds = torch.randint(0, len(names), (b,), generator=gen).tolist()
        return TokenBatch(sequences[kinds][:, None], torch.full((b,), frames), [""] * b,
                          [{"caption": f"a tune in {names[k]}"} for k in kinds])

    torch.manual_seed(0)
    family = MusicGenFamily(n_q=1, card=codec.card, lm=LM, text={"max_length": 16}, cfg_dropout=0.1)
    family.model.attach_codec(codec)
    opt = torch.optim.AdamW([p for p in family.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        b = batch(16, gen)
        c = family.batch_conditions(b, b.codes, b.lengths, None, train=True)
        ce, _ = family.compute_losses(b.codes, b.lengths, c.cond, c.mask, c.prefix, c.targets)
        opt.zero_grad()
        ce.mean().backward()
        opt.step()
    family.eval()
    b = batch(64, torch.Generator().manual_seed(9))
    first = torch.zeros(64, frames, dtype=torch.bool)
    first[:, 0] = True  # ln 12 = 2.48 nats without the text
    with torch.no_grad():
        c = family.batch_conditions(b, b.codes, b.lengths, None, train=False)
        with_text = family.compute_losses(b.codes, b.lengths, c.cond, c.mask, c.prefix, first)[0].item()
        without = family.compute_losses(b.codes, b.lengths, *c.without["text"], first)[0].item()
    assert without - with_text >= 1.5, (with_text, without)
