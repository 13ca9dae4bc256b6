"""MusicLM (Agostinelli et al. 2023): three token LMs, MuLaN, its quantizer, a codec and a semantic tokenizer.

Stage models (what ``ostinato.load`` returns for a stage's export; ``families.musiclm`` trains them):

* ``SemanticLM``: semantic tokens ``[B, 1, Fs]``; prefix = the clip's MuLaN "semantic" tokens, embedded.
* ``CoarseLM``: codec codebooks ``0 .. coarse_q - 1`` (``unroll``: AudioLM's flattening, or ``delay``); prefix =
  MuLaN "coarse" tokens + the semantic tokens under the window, embedded.
* ``FineLM``: codebooks ``coarse_q .. K - 1``; prefix = the coarse codebooks of every frame, their embeddings
  summed per frame (one prefix position per frame).

Each holds a buffer ``rates`` (frames/s of the semantic and codec tokens, recorded from the training data) so that
a loaded stage knows how many frames a second holds.

``MusicLM`` bundles the parts and generates: MuLaN text embedding -> quantized MuLaN tokens -> semantic -> coarse
-> fine -> codec decode, ``num_candidates`` samples per prompt reranked by MuLaN audio-text similarity. Every stage
decodes with ``ostinato.nn.decoding.generate`` in windows of its training crop (a sliding window past it):

* semantic: CFG against a zero MuLaN prefix (what ``cfg_dropout`` trains);
* coarse: CFG drops only the MuLaN part of the prefix, the semantic tokens stay;
* fine: no guidance.

Candidates of all prompts run as one batch (``B = prompts x num_candidates``). An empty prompt is unconditional:
its MuLaN prefix is the null (zero) one and its candidates are not reranked (the first is kept). Continuation: the
prompt audio is tokenized by the semantic tokenizer and the codec, and every stage is teacher-forced on those
frames, so the output starts with the prompt's codes exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.audio import convert_channels, resample
from ostinato.nn.decoding import GenerationParams, Progress, generate
from ostinato.nn.patterns import CodebookPattern, DelayPattern, ParallelPattern, UnrollPattern
from ostinato.nn.transformer import CodebookLM, lm_config

__all__ = ["SemanticLM", "CoarseLM", "FineLM", "MuLaNPrefix", "MusicLM", "MusicLMOutput", "make_pattern"]


def make_pattern(name: str, n_q: int, key: str) -> CodebookPattern:
    if name == "unroll":
        return UnrollPattern(n_q)
    if name == "delay":
        return DelayPattern(n_q)
    if name == "parallel":
        return ParallelPattern(n_q)
    raise ValueError(f"{key} must be unroll, delay or parallel, got {name!r}")


class MuLaNPrefix(nn.Module):
    """MuLaN tokens ``[B, n_q]`` (one vocabulary per codebook) -> ``[B, n_q, dim]``."""

    def __init__(self, n_q: int, card: int, dim: int):
        super().__init__()
        self.n_q, self.card = int(n_q), int(card)
        self.emb = nn.Embedding(self.n_q * self.card, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.n_q:
            raise ValueError(f"expected MuLaN tokens [B, {self.n_q}], got {tuple(tokens.shape)}; "
                             f"family.mulan_n_q must match the MuLaN quantizer")
        offsets = torch.arange(self.n_q, device=tokens.device) * self.card
        return self.emb(tokens.clamp(0, self.card - 1) + offsets)


class _StageLM(nn.Module):
    """What the three stage models share: the LM, its pattern, the prefix modules and the recorded frame rates."""

    namespace: str | None = None  # MuLaN tokens of this stage's prefix
    training_keys: tuple[str, ...] = ("cfg_dropout", "lora", "optim")  # the wrapper's, not the model's

    def __init__(self, n_q: int, card: int, lm: Mapping[str, Any] | None, pattern: str, mulan_n_q: int,
                 mulan_card: int):
        super().__init__()
        self.n_q, self.card = int(n_q), int(card)
        self.cfg = lm_config(lm, n_q=self.n_q, card=self.card, cross_attention=False)
        self.lm = CodebookLM(self.cfg)
        self.pattern = make_pattern(pattern, self.n_q, "family.pattern")
        self.pattern_name = pattern
        self.prefix_modules = nn.ModuleDict()
        if self.namespace is not None:
            self.prefix_modules["mulan"] = MuLaNPrefix(mulan_n_q, mulan_card, self.cfg.dim)
        self.register_buffer("rates", torch.zeros(2))  # frames/s of the semantic and codec tokens

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> _StageLM:
        """The stage model of a stage wrapper's training config (``cfg["family"]`` less its training keys)."""
        kw = {k: v for k, v in cfg["family"].items() if k != "_target_" and k not in cls.training_keys}
        return cls(**kw)

    @property
    def semantic_rate(self) -> float:
        return float(self.rates[0])

    @property
    def frame_rate(self) -> float:
        return float(self.rates[1])

    @property
    def mulan_shape(self) -> tuple[int, int]:
        """(n_q, card) of the MuLaN tokens this stage reads."""
        pre = self.prefix_modules["mulan"]
        return pre.n_q, pre.card

    def mulan_prefix(self, tokens: Tensor, keep: Tensor | None = None) -> Tensor:
        """MuLaN tokens ``[B, n_q_m]`` -> ``[B, n_q_m, dim]``; items whose ``keep [B]`` is False get the null (zero)
        prefix."""
        pre = self.prefix_modules["mulan"](tokens.to(self.rates.device))
        return pre if keep is None else pre * keep.to(pre.device, pre.dtype)[:, None, None]


class SemanticLM(_StageLM):
    """Semantic tokens ``[B, 1, Fs]`` given MuLaN "semantic" tokens.

    Args:
        card: semantic vocabulary (the k-means tokenizer's K).
        mulan_n_q, mulan_card: the MuLaN quantizer's "semantic" namespace.
        lm: ``LMConfig`` kwargs (``preset`` + overrides).
    """

    namespace = "semantic"

    def __init__(self, card: int, mulan_n_q: int = 12, mulan_card: int = 1024, lm: Mapping[str, Any] | None = None):
        super().__init__(1, card, lm, "parallel", mulan_n_q, mulan_card)


class CoarseLM(_StageLM):
    """Codec codebooks ``0 .. coarse_q - 1`` ``[B, coarse_q, F]`` given MuLaN "coarse" tokens and semantic tokens.

    Args:
        card: the codec's codebook size; coarse_q: coarse codebooks (MusicLM / AudioLM: 4 of 12).
        semantic_card: the semantic vocabulary; pattern: ``unroll`` (AudioLM) or ``delay``.
    """

    namespace = "coarse"

    def __init__(self, card: int, coarse_q: int, semantic_card: int, mulan_n_q: int = 12, mulan_card: int = 1024,
                 pattern: str = "unroll", lm: Mapping[str, Any] | None = None):
        super().__init__(coarse_q, card, lm, pattern, mulan_n_q, mulan_card)
        self.semantic_card = int(semantic_card)
        # row semantic_card: frames past an item's valid length
        self.prefix_modules["semantic"] = nn.Embedding(self.semantic_card + 1, self.cfg.dim)
        nn.init.normal_(self.prefix_modules["semantic"].weight, std=0.02)

    def semantic_prefix(self, semantic: Tensor, lengths: Tensor | None = None) -> Tensor:
        """semantic tokens ``[B, Fs]`` -> ``[B, Fs, dim]`` (frames past ``lengths [B]`` get the special row)."""
        sem = semantic.to(self.rates.device)
        if lengths is not None:
            ok = torch.arange(sem.shape[-1], device=sem.device)[None] < lengths.to(sem.device)[:, None]
            sem = sem.masked_fill(~ok, self.semantic_card)
        return self.prefix_modules["semantic"](sem)

    def prefix(self, mulan: Tensor, semantic: Tensor, semantic_lengths: Tensor | None = None,
               keep: Tensor | None = None) -> Tensor:
        """MuLaN tokens ``[B, n_q_m]`` + semantic ``[B, 1, Fs]`` -> ``[B, n_q_m + Fs, dim]``; ``keep [B]`` False
        zeroes an item's MuLaN part only."""
        return torch.cat([self.mulan_prefix(mulan, keep), self.semantic_prefix(semantic[:, 0], semantic_lengths)],
                         dim=1)


class FineLM(_StageLM):
    """Codec codebooks ``coarse_q .. n_q - 1`` ``[B, n_q - coarse_q, F]`` given the coarse codebooks of every frame.

    Args:
        n_q: all codec codebooks (K); coarse_q: how many of them the coarse stage predicts.
        pattern: ``unroll`` (AudioLM) or ``delay`` over the K - coarse_q fine codebooks.
    """

    def __init__(self, n_q: int, card: int, coarse_q: int, pattern: str = "unroll",
                 lm: Mapping[str, Any] | None = None):
        if not 0 < int(coarse_q) < int(n_q):
            raise ValueError(f"family.coarse_q must be in [1, family.n_q - 1] = [1, {int(n_q) - 1}], got {coarse_q}")
        super().__init__(int(n_q) - int(coarse_q), card, lm, pattern, 0, 0)
        self.total_q, self.coarse_q = int(n_q), int(coarse_q)
        self.prefix_modules["coarse"] = nn.ModuleList(
            [nn.Embedding(self.card + 1, self.cfg.dim) for _ in range(self.coarse_q)])
        for emb in self.prefix_modules["coarse"]:
            nn.init.normal_(emb.weight, std=0.02)

    def prefix(self, coarse: Tensor, lengths: Tensor | None = None) -> Tensor:
        """coarse codes ``[B, coarse_q, F]`` -> summed embeddings ``[B, F, dim]`` (frames past ``lengths`` get the
        special row)."""
        coarse = coarse.to(self.rates.device)
        if lengths is not None:
            ok = torch.arange(coarse.shape[-1], device=coarse.device)[None] < lengths.to(coarse.device)[:, None]
            coarse = coarse.masked_fill(~ok[:, None], self.card)
        return sum(emb(coarse[:, q]) for q, emb in enumerate(self.prefix_modules["coarse"]))


# ------------------------------------------------------------------------------------------------ the bundle


@dataclass
class MusicLMOutput:
    """wav ``[P, C, T]``: the best candidate per prompt; candidates ``[P, N, C, T]``; scores ``[P, N]`` (MuLaN
    cosine of each candidate with its prompt); best ``[P]``: the chosen candidate's index; the tokens of every
    candidate: semantic ``[P, N, 1, Fs]`` and codec codes ``[P, N, K, F]``."""

    wav: Tensor
    candidates: Tensor
    scores: Tensor
    best: Tensor
    semantic: Tensor
    codes: Tensor


class MusicLM(nn.Module):
    """The parts of a MusicLM: three stage models, MuLaN + its fitted quantizer, the codec, and (for continuation)
    the semantic tokenizer. ``windows``: seconds each stage decodes at once (its training crop); ``sources``: where
    each part was read from (what generation records)."""

    def __init__(self, semantic: SemanticLM, coarse: CoarseLM, fine: FineLM, mulan: nn.Module, quantizer: nn.Module,
                 codec: nn.Module, semantic_tokenizer: nn.Module | None = None,
                 windows: Mapping[str, float | None] | None = None, sources: Mapping[str, str] | None = None):
        super().__init__()
        self.semantic, self.coarse, self.fine = semantic, coarse, fine
        self.mulan, self.quantizer, self.codec = mulan, quantizer, codec
        self.semantic_tokenizer = semantic_tokenizer
        self.windows = dict(windows or {})
        self.sources = dict(sources or {})

    @property
    def sample_rate(self) -> int:
        return int(self.codec.sample_rate)

    def check(self) -> None:
        """Stage and codec shapes agree; raises ValueError naming the mismatch."""
        sem, coarse, fine, codec = self.semantic, self.coarse, self.fine, self.codec
        problems = []
        if coarse.semantic_card != sem.card:
            problems.append(f"the coarse stage reads {coarse.semantic_card} semantic tokens, the semantic stage "
                            f"writes {sem.card}")
        if fine.coarse_q != coarse.n_q:
            problems.append(f"the fine stage expects {fine.coarse_q} coarse codebooks, the coarse stage has "
                            f"{coarse.n_q}")
        if fine.total_q > codec.n_q or fine.card != codec.card or coarse.card != codec.card:
            problems.append(f"the stages predict {fine.total_q} x {fine.card} codes, the codec has "
                            f"{codec.n_q} x {codec.card}")
        for stage, ns in ((sem, "semantic"), (coarse, "coarse")):
            have, want = (self.quantizer.n_q(ns), self.quantizer.card(ns)), stage.mulan_shape
            if have != want:
                problems.append(f"the {ns} stage reads {want[0]} x {want[1]} MuLaN tokens, the quantizer gives "
                                f"{have[0]} x {have[1]}")
        if abs(coarse.frame_rate - codec.frame_rate) > 1e-6 and coarse.frame_rate > 0:
            problems.append(f"the coarse stage was trained at {coarse.frame_rate:g} frames/s, the codec runs at "
                            f"{codec.frame_rate:g}")
        if problems:
            raise ValueError("these MusicLM parts do not fit together: " + "; ".join(problems))

    @torch.no_grad()
    def generate(self, descriptions: Sequence[str], duration: float = 10.0, continuation: Tensor | None = None,
                 num_candidates: int = 1, params: GenerationParams | None = None,
                 progress: Progress | None = None, continuation_sample_rate: int | None = None) -> Tensor:
        """``descriptions`` (P texts; "" = unconditional) -> wav ``[P, C, round(duration * sample_rate)]``, the
        best of ``num_candidates`` per prompt by MuLaN score. ``continuation``: wav ``[C, T]`` (or ``[1, C, T]``) at
        ``continuation_sample_rate`` (default the codec's) that every clip starts with. See ``sample``."""
        return self.sample(descriptions, duration, continuation, num_candidates, params, progress,
                           continuation_sample_rate).wav

    @torch.no_grad()
    def sample(self, descriptions: Sequence[str], duration: float = 10.0, continuation: Tensor | None = None,
               num_candidates: int = 1, params: GenerationParams | None = None, progress: Progress | None = None,
               continuation_sample_rate: int | None = None) -> MusicLMOutput:
        """``generate`` with every candidate, its MuLaN score and its tokens (``MusicLMOutput``).

        ``params``: sampling settings shared by the stages (``cfg_scale`` guides the semantic and coarse stages; the
        fine stage is never guided); ``seed`` makes the whole pipeline reproducible.
        """
        params = params or GenerationParams()
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        sem_stage, coarse_stage, fine_stage, codec = self.semantic, self.coarse, self.fine, self.codec
        device = sem_stage.rates.device
        n_prompts, n = len(descriptions), int(num_candidates)
        b = n_prompts * n
        texts = [p for p in descriptions for _ in range(n)]
        keep = torch.tensor([bool(t.strip()) for t in texts], device=device)  # "" = the null condition
        text_emb = self.mulan.embed_text(texts).to(device)  # [B, D]
        sem_rate = sem_stage.semantic_rate or float(getattr(self.semantic_tokenizer, "frame_rate", 0) or 0)
        if sem_rate <= 0:
            raise ValueError("the semantic stage records no semantic frame rate (trained before rates were stored?)")
        fr = float(codec.frame_rate)
        n_sem, n_codes = max(1, round(duration * sem_rate)), max(1, round(duration * fr))
        sem_prompt = coarse_prompt = fine_prompt = None
        if continuation is not None:
            sem_prompt, coarse_prompt, fine_prompt = self._prompt_tokens(
                continuation, continuation_sample_rate or self.sample_rate, n_codes, duration)
            sem_prompt, coarse_prompt, fine_prompt = (t.expand(b, -1, -1) for t in (sem_prompt, coarse_prompt,
                                                                                    fine_prompt))
        ticks = _Ticks(progress, [n_sem, n_codes, n_codes])

        def tokens(namespace: str) -> Tensor:
            return self.quantizer.tokens(text_emb, namespace).to(device)  # [B, n_q_m]

        sem_pre = sem_stage.mulan_prefix(tokens("semantic"), keep)
        semantic = _decode_stage(sem_stage, n_sem, sem_prompt,
                                 _params(params, self.windows.get("semantic"), sem_rate), b, sem_pre,
                                 ticks.stage(0))  # [B, 1, Fs]
        coarse_mulan = coarse_stage.mulan_prefix(tokens("coarse"), keep)

        def coarse_prefix(start: int, frames: int) -> tuple[Tensor, Tensor]:
            first = min(int(start / fr * sem_rate), n_sem - 1)
            last = max(first + 1, min(n_sem, round((start + frames) / fr * sem_rate)))
            sem = coarse_stage.semantic_prefix(semantic[:, 0, first:last])
            return torch.cat([coarse_mulan, sem], 1), torch.cat([torch.zeros_like(coarse_mulan), sem], 1)

        coarse = _decode_stage(coarse_stage, n_codes, coarse_prompt, _params(params, self.windows.get("coarse"), fr),
                               b, coarse_prefix, ticks.stage(1))  # [B, Qc, F]

        def fine_prefix(start: int, frames: int) -> Tensor:
            return fine_stage.prefix(coarse[..., start:start + frames])

        fine = _decode_stage(fine_stage, n_codes, fine_prompt,
                             _params(params, self.windows.get("fine"), fr, cfg_scale=1.0, cfg_beta=None),
                             b, fine_prefix, ticks.stage(2))  # [B, K - Qc, F]
        n_samples = round(duration * codec.sample_rate)
        codes = torch.cat([coarse, fine], 1)
        wav = codec.decode(codes)[..., :n_samples]
        if wav.shape[-1] < n_samples:
            wav = F.pad(wav, (0, n_samples - wav.shape[-1]))
        audio_emb = self.mulan.embed_audio(wav, codec.sample_rate).to(device)
        scores = (audio_emb * text_emb).sum(-1).masked_fill(~keep, 0.0).view(n_prompts, n)
        best = scores.argmax(dim=1)
        candidates = wav.view(n_prompts, n, *wav.shape[1:])
        return MusicLMOutput(candidates[torch.arange(n_prompts), best], candidates, scores, best,
                             semantic.view(n_prompts, n, *semantic.shape[1:]),
                             codes.view(n_prompts, n, *codes.shape[1:]))

    def _prompt_tokens(self, wav: Tensor, sample_rate: int, n_codes: int,
                       duration: float) -> tuple[Tensor, Tensor, Tensor]:
        """The continued audio's semantic ``[1, 1, Fs']``, coarse ``[1, Qc, F']`` and fine ``[1, K - Qc, F']``."""
        if self.semantic_tokenizer is None:
            raise ValueError("continuation needs the semantic tokenizer (--semantic-tokenizer DIR)")
        device = self.semantic.rates.device
        wav = wav[0] if wav.dim() == 3 else wav  # [C, T]

        def at(rate: int, channels: int) -> Tensor:
            mixed = convert_channels(wav.float(), "mono" if channels == 1 else "stereo")
            return resample(mixed, sample_rate, rate).unsqueeze(0).to(device)  # [1, channels, T']

        tok, codec = self.semantic_tokenizer, self.codec
        sem = tok.encode(at(tok.sample_rate, 1)).to(device)
        codes = codec.encode(at(codec.sample_rate, codec.channels), n_q=self.fine.total_q).codes
        if codes.shape[-1] >= n_codes:
            raise ValueError(f"the continued audio ({codes.shape[-1] / codec.frame_rate:.2f} s) is not shorter than "
                             f"the requested duration ({duration:g} s); ask for a longer --seconds")
        qc = self.coarse.n_q
        return sem, codes[:, :qc], codes[:, qc:self.fine.total_q]


def _params(params: GenerationParams, window_seconds: float | None, rate: float, **over: Any) -> GenerationParams:
    window = None if window_seconds is None else max(2, round(window_seconds * rate))
    return replace(params, max_window_frames=window, extend_stride_frames=None if window is None else
                   max(1, window // 2), **over)


def _decode_stage(stage: _StageLM, n_frames: int, prompt: Tensor | None, params: GenerationParams, b: int,
                  prefix: Any, progress: Progress | None) -> Tensor:
    """One stage's codes ``[B, n_q, n_frames]``. A prompt as long as a window is kept as is and only its last
    ``window - stride`` frames prompt the decoding (the prefix function then sees output-frame positions)."""
    window, head = params.max_window_frames, None
    if prompt is not None and window is not None and prompt.shape[-1] >= window:
        keep = max(1, window - (params.extend_stride_frames or max(1, window // 2)))
        head, prompt = prompt[..., :-keep], prompt[..., -keep:]
        if callable(prefix):
            whole, offset = prefix, head.shape[-1]
            prefix = lambda start, n: whole(start + offset, n)  # noqa: E731
    out = generate(stage.lm, stage.pattern, n_frames - (0 if head is None else head.shape[-1]), prompt=prompt,
                   batch_size=b, params=params, prefix=prefix, progress=progress)
    return out if head is None else torch.cat([head, out], dim=-1)


class _Ticks:
    """One progress bar over the three stages: each reports (done, total) of its own steps."""

    def __init__(self, progress: Progress | None, totals: list[int]):
        self.progress, self.totals = progress, totals

    def stage(self, i: int) -> Progress | None:
        if self.progress is None:
            return None
        base, total = sum(self.totals[:i]), sum(self.totals)

        def tick(done: int, stage_total: int) -> None:
            scale = self.totals[i] / max(1, stage_total)
            self.progress(base + round(done * scale), total)

        return tick
