"""audiocraft 1.3.0 text MusicGens (small / medium / large shapes, tiny sizes) built and exported by the audiocraft
package itself, imported with ``ostinato import``: for a batch of prompts of different lengths the logits, the
greedy tokens (CFG 1 and 3) and the training loss are audiocraft's, because the import records audiocraft's
semantics (padded text attended, the last delays[k] frames of codebook k no loss targets)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import ostinato
from ostinato.cli import main
from ostinato.engine.weights import load_weights
from ostinato.families.codebook_lm import masked_lm_losses
from ostinato.families.musicgen import ImportedMusicGenFamily
from ostinato.interop.musicgen_import import import_musicgen
from ostinato.models.musicgen import MusicGen
from ostinato.nn.decoding import GenerationParams, generate
from tests.references import (
    audiocraft,
    audiocraft_encodec_cfg,
    audiocraft_export_compression,
    audiocraft_export_lm,
    audiocraft_lm_cfg,
    use_local_t5,
    write_t5,
)

pytestmark = pytest.mark.usefixtures("one_thread")

K, CARD, FRAMES = 4, 64, 12
# three prompts of different token lengths: the shorter ones are padded in the batch
TEXTS = ["organ", "a baroque chorale for a church organ", "an irish reel on fiddle and flute at a fast tempo"]
# the shapes of small (24 layers x 16 heads of 64), medium (48 x 24) and large (48 x 32), at 16-wide heads
SIZES = {"small": dict(dim=32, num_heads=2, num_layers=2), "medium": dict(dim=48, num_heads=3, num_layers=3),
         "large": dict(dim=64, num_heads=4, num_layers=3),
         # a fine-tune with biases (audiocraft initialises them to zero: set at random below)
         "biased": dict(dim=32, num_heads=2, num_layers=2, bias_attn=True, bias_ff=True)}
ATTENDED = {"text_padding": "attended", "loss_frames": "trim_delays"}


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 encoder with a tokenizer: the stand-in for t5-base."""
    return write_t5(tmp_path_factory.mktemp("t5"))


def audiocraft_source(t5: Path, folder: Path, seed: int, **size) -> torch.nn.Module:
    """audiocraft's own LM (``builders.get_lm_model``) and EnCodec, exported by audiocraft as ``state_dict.bin`` and
    ``compression_state_dict.bin`` in ``folder``; the LM's heads sharpened so that greedy decoding has no ties."""
    audiocraft()
    from audiocraft.models import builders

    torch.manual_seed(seed)
    cfg = audiocraft_lm_cfg("text", n_q=K, card=CARD, **size)
    with pytest.MonkeyPatch.context() as mp:
        use_local_t5(mp, t5)
        lm = builders.get_lm_model(cfg).eval()
    with torch.no_grad():
        for head in lm.linears:
            head.weight.mul_(20)
        for name, param in lm.named_parameters():
            if name.startswith("transformer.") and name.endswith("bias") and "norm" not in name:
                param.normal_(0.0, 0.5)
    codec_cfg = audiocraft_encodec_cfg(n_q=K, bins=CARD, dimension=16, n_filters=4, lstm=1)
    audiocraft_export_lm(lm, cfg, folder / "state_dict.bin")
    audiocraft_export_compression(builders.get_compression_model(codec_cfg), codec_cfg,
                              folder / "compression_state_dict.bin")
    return lm


@pytest.fixture(scope="module", params=list(SIZES))
def pair(request, t5: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """(audiocraft LM, its ostinato import folder) for one size."""
    folder = tmp_path_factory.mktemp(f"audiocraft_{request.param}")
    lm = audiocraft_source(t5, folder, seed=len(request.param), **SIZES[request.param])
    out = import_musicgen(folder / "state_dict.bin", folder / "import", text_encoder=t5)
    return lm, out.out


def ac_conditions(lm: torch.nn.Module, texts: list[str]) -> dict:
    """audiocraft's condition tensors of ``texts`` (its T5 conditioner, padded to the batch's longest)."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    attrs = [ConditioningAttributes(text={"description": t}) for t in texts]
    return lm.condition_provider(lm.condition_provider.tokenize(attrs))


def random_codes(b: int = len(TEXTS), t: int = FRAMES, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, CARD, (b, K, t), generator=torch.Generator().manual_seed(seed))


def frame_logits(model: MusicGen, codes: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ostinato's teacher-forced logits ``[B, K, T, card]`` of ``codes [B, K, T]``, at each code's frame."""
    b, k, t = codes.shape
    seq, _ = model.pattern.build(codes, CARD)
    logits = model.lm(seq[:, :, :-1], cond, mask)  # step s predicts step s + 1
    pos = model.pattern.positions(t) - 1  # [K, T]
    return torch.stack([logits[:, q, pos[q]] for q in range(k)], dim=1)


def test_cli_import_records_audiocraft_semantics(t5: Path, tmp_path: Path, capsys) -> None:
    audiocraft_source(t5, tmp_path, seed=0, **SIZES["small"])
    main(["import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"), "--text-encoder", str(t5)])
    assert "audiocraft" in capsys.readouterr().out
    family = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["family"]
    assert family["semantics"] == ATTENDED and family["codec"] == "codec/compression_state_dict.bin"
    model = ostinato.load(tmp_path / "out")
    assert (model.codec.n_q, model.codec.card, model.codec.frame_rate) == (K, CARD, 100)  # audiocraft's export
    assert (model.semantics.text_padding, model.semantics.loss_frames) == ("attended", "trim_delays")
    assert ImportedMusicGenFamily(export=str(tmp_path / "out")).model.semantics == model.semantics


def test_logits_match_audiocraft_for_prompts_of_different_lengths(pair) -> None:
    lm, out = pair
    model = ostinato.load(out)
    codes = random_codes()
    with torch.no_grad():
        ref = lm.compute_predictions(codes, [], ac_conditions(lm, TEXTS))
        cond, mask = model.condition(TEXTS)
        ours = frame_logits(model, codes, cond, mask)
        valid = ref.mask[..., None].expand_as(ours)
        assert valid[:, 0].all() and not valid[:, -1].all()  # the last delays[k] frames have no logits
        assert (ours - ref.logits)[valid].abs().max().item() <= 1e-4
        # with the padding masked (transformers' and ostinato's own), the shorter prompts' logits differ
        raw_cond, raw_mask = model.text(TEXTS)
        assert not raw_mask.all()
        masked = frame_logits(model, codes, raw_cond, raw_mask)
        diff = (masked - ref.logits)[valid].view(len(TEXTS), -1).abs().amax(dim=1)
        assert diff[0] > 1e-3 and diff[-1] <= 1e-4  # the longest prompt has no padding


@pytest.mark.parametrize("cfg_coef", [1.0, 3.0])
def test_greedy_tokens_match_audiocraft(pair, cfg_coef: float) -> None:
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm, out = pair
    model = ostinato.load(out)
    attrs = [ConditioningAttributes(text={"description": t}) for t in TEXTS]
    with torch.no_grad():
        ref = lm.generate(conditions=attrs, max_gen_len=FRAMES, use_sampling=False, cfg_coef=cfg_coef)
        cond, mask = model.condition(TEXTS)
        for backend in ("cache", "static"):  # the model's forward; the fused static-shape step
            params = GenerationParams(temperature=0.0, cfg_scale=cfg_coef, backend=backend)
            ours = generate(model.lm, model.pattern, FRAMES, cond=cond, cond_mask=mask, params=params,
                            null_mask=model.null_mask(mask))
            assert ours.shape == ref.shape == (len(TEXTS), K, FRAMES)
            assert torch.equal(ours, ref) and len(torch.unique(ours)) > 8, backend
    wav = model.generate(TEXTS, FRAMES / model.codec.frame_rate, params=params)  # the same through MusicGen
    assert (wav - model.codec.decode(ref)[..., :wav.shape[-1]]).abs().max().item() <= 1e-5


def test_training_loss_matches_audiocraft(pair) -> None:
    """audiocraft's solver loss (its mask: the batch's padding and the pattern's valid steps) per codebook."""
    from audiocraft.solvers.musicgen import MusicGenSolver

    lm, out = pair
    family = ImportedMusicGenFamily(export=str(out)).eval()
    load_weights(family, out)  # what continue_from= does
    codes = random_codes(seed=5)
    lengths = torch.tensor([FRAMES, FRAMES - 2, FRAMES - 7])  # one short of the delays, one far shorter
    padding = torch.arange(FRAMES)[None, None, :] < lengths[:, None, None]
    with torch.no_grad():
        pred = lm.compute_predictions(codes, [], ac_conditions(lm, TEXTS))
        _, ref = MusicGenSolver._compute_cross_entropy(None, pred.logits, codes, padding & pred.mask)
        cond, mask = family.model.condition(TEXTS)
        ours, count = family.compute_losses(codes, lengths, cond, mask)
        assert count.tolist() == (padding & pred.mask).sum(dim=(0, 2)).tolist()
        assert (ours - torch.stack(ref)).abs().max().item() <= 1e-5
        every, _ = masked_lm_losses(family.model.lm, family.model.pattern, codes, lengths, None, cond, mask)
        assert (every - torch.stack(ref))[1:].abs().min().item() > 1e-4  # "all" frames is not audiocraft's loss


def test_a_semantics_value_that_is_none_is_one_line(t5: Path, tmp_path: Path, capsys) -> None:
    """A hand-edited ``family.semantics`` names the key and the values it takes."""
    audiocraft_source(t5, tmp_path, seed=0, **SIZES["small"])
    edited = import_musicgen(tmp_path / "state_dict.bin", tmp_path / "edited", text_encoder=t5).out
    config = yaml.safe_load((edited / "config.yaml").read_text())
    config["family"]["semantics"]["text_padding"] = "padded"
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()  # transformers' loading progress
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(edited), "--prompt", "organ", "--seconds", "0.1", "--out",
              str(tmp_path / "gen")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "family.semantics.text_padding='padded': use masked or attended" in err
