"""MusicLM's text -> audio pipeline: MuLaN text embedding -> quantized MuLaN tokens -> semantic -> coarse -> fine
-> codec decode, with ``num_candidates`` samples per prompt reranked by MuLaN audio-text similarity.

Every stage decodes with ``ostinato.nn.decoding.generate`` in windows of its training crop (a sliding window
past it, so any length works):

* semantic: prefix = MuLaN "semantic" tokens; CFG against a zero prefix (what ``cfg_dropout`` trains).
* coarse: prefix = MuLaN "coarse" tokens + the semantic tokens under the window; CFG drops only the MuLaN part.
* fine: prefix = the coarse codes of the window's frames; no guidance.

Candidates of all prompts run as one batch (``B = prompts x num_candidates`` rows per stage). An empty prompt is
unconditional: its MuLaN prefix is the null (zero) one and its candidates are not reranked (the first is kept).

Continuation: the prompt audio is tokenized by the semantic tokenizer and the codec, and every stage is
teacher-forced on those frames, so the output starts with the prompt's codes exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ostinato.nn.decoding import GenerationParams, Progress, generate
from ostinato.generation.request import AudioInput, GenerationRequest

__all__ = ["MusicLM", "MusicLMOutput", "load_musiclm", "generate_musiclm", "generate_clips"]


@dataclass
class MusicLM:
    """The parts of a MusicLM: three stages, MuLaN + its fitted quantizer, the codec, and (for continuation) the
    semantic tokenizer. ``windows``: seconds each stage decodes at once (its training crop)."""

    semantic: Any
    coarse: Any
    fine: Any
    mulan: Any
    quantizer: Any
    codec: Any
    semantic_tokenizer: Any = None
    windows: dict[str, float | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> MusicLM:
        for part in (self.semantic, self.coarse, self.fine, self.mulan, self.codec):
            part.to(device)
        return self

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
        if fine.total_q > codec.n_q or fine.card != codec.cardinality or coarse.card != codec.cardinality:
            problems.append(f"the stages predict {fine.total_q} x {fine.card} codes, the codec has "
                            f"{codec.n_q} x {codec.cardinality}")
        for stage, ns in ((sem, "semantic"), (coarse, "coarse")):
            have = (self.quantizer.n_q(ns), self.quantizer.bins(ns))
            want = (stage.prefix_modules["mulan"].n_q, stage.prefix_modules["mulan"].bins)
            if have != want:
                problems.append(f"the {ns} stage reads {want[0]} x {want[1]} MuLaN tokens, the quantizer gives "
                                f"{have[0]} x {have[1]}")
        if abs(coarse.frame_rate - codec.frame_rate) > 1e-6 and coarse.frame_rate > 0:
            problems.append(f"the coarse stage was trained at {coarse.frame_rate:g} frames/s, the codec runs at "
                            f"{codec.frame_rate:g}")
        if problems:
            raise ValueError("these MusicLM parts do not fit together: " + "; ".join(problems))


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


def _stage_window(cfg: dict) -> float | None:
    return (cfg.get("data") or {}).get("segment_seconds")


def _data_folder(cfg: dict, stream: str) -> str | None:
    train = (cfg.get("data") or {}).get("train") or {}
    return train.get(stream) if isinstance(train, dict) else None


def load_musiclm(semantic: str, coarse: str, fine: str, mulan: str | None = None, quantizer: str | None = None,
                 codec: str | None = None, semantic_tokenizer: str | None = None, trust: bool = False) -> MusicLM:
    """Load the three stages (XP signature, //sig/SIG, XP folder, checkpoint or export) and what they need.

    Defaults are read from the stages' training data: MuLaN and its quantizer from the MuLaN token folder's
    manifest (``write_mulan_tokens`` records both), the codec from the codec token manifest, the semantic
    tokenizer from the semantic token manifest.
    """
    import ostinato
    from ostinato.data.musiclm_tokens import MuLaNTokens
    from ostinato.data.tokens import TokenManifest
    from ostinato.store.records import read_weights
    from ostinato.models.mulan import as_mulan
    from ostinato.families.musiclm import CoarseStage, FineStage, SemanticStage
    from ostinato.interop.codecs import load_codec
    from ostinato.store.records import require_ref, xps_dir
    from ostinato.models.mulan import MuLaNQuantizer
    from ostinato.encoding.tokens import load_tokenizer

    stages, cfgs = {}, {}
    for name, ref, cls in (("semantic", semantic, SemanticStage), ("coarse", coarse, CoarseStage),
                           ("fine", fine, FineStage)):
        resolved = require_ref(ref, f"--{name}", f"the MusicLM {name} stage: an XP folder, a checkpoint or an export")
        module = ostinato.load(resolved, xps_dir=xps_dir(), trust=trust)
        if not isinstance(module, cls):
            raise ValueError(f"--{name} {ref} holds a {type(module).__name__}, not a {cls.__name__} (train one "
                             f"with `ostinato train experiment=musiclm_{name}_tiny`)")
        stages[name] = module.eval()
        cfgs[name] = read_weights(resolved, xps_dir(), trust)[1] or {}
    if mulan is None or quantizer is None:
        folder = _data_folder(cfgs["semantic"], "mulan")
        if folder is None or not Path(folder).is_dir():
            raise ValueError(f"the semantic stage's MuLaN token folder ({folder}) is not here; pass --mulan and "
                             "--quantizer")
        recorded = MuLaNTokens.load(folder)
        mulan, quantizer = mulan or recorded.source, quantizer or recorded.quantizer
        if not mulan or not quantizer:
            raise ValueError(f"{folder}: the MuLaN tokens record no MuLaN / quantizer path; pass --mulan and "
                             "--quantizer")
    codec_ref = codec
    if codec_ref is None:
        folder = _data_folder(cfgs["coarse"], "codec")
        if folder is None:
            raise ValueError("the coarse stage records no codec token folder; pass --codec")
        codec_ref = TokenManifest.load(folder).codec.id
    sem_ref = semantic_tokenizer  # given: it must load; recorded: only continuation needs it, so it may be gone
    if sem_ref is None and _data_folder(cfgs["semantic"], "semantic"):
        recorded_ref = TokenManifest.load(_data_folder(cfgs["semantic"], "semantic")).codec.id
        sem_ref = recorded_ref if Path(recorded_ref).exists() else None
    model = MusicLM(semantic=stages["semantic"], coarse=stages["coarse"], fine=stages["fine"],
                    mulan=as_mulan(mulan), quantizer=MuLaNQuantizer.load(quantizer),
                    codec=load_codec(str(codec_ref), trust=trust).eval(),
                    semantic_tokenizer=load_tokenizer(sem_ref) if sem_ref else None,
                    windows={k: _stage_window(c) for k, c in cfgs.items()},
                    sources={"semantic": semantic, "coarse": coarse, "fine": fine, "mulan": str(mulan),
                             "quantizer": str(quantizer), "codec": str(codec_ref), "semantic_tokenizer": str(sem_ref)})
    model.check()
    return model


def _params(params: GenerationParams, window_seconds: float | None, rate: float, **over: Any) -> GenerationParams:
    window = None if window_seconds is None else max(2, round(window_seconds * rate))
    return replace(params, max_window_frames=window, extend_stride_frames=None if window is None else
                   max(1, window // 2), **over)


def _decode_stage(stage: Any, n_frames: int, prompt: Tensor | None, params: GenerationParams, b: int,
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


@torch.no_grad()
def generate_musiclm(model: MusicLM, prompts: Sequence[str], seconds: float, params: GenerationParams, *,
                     num_candidates: int = 1, continuation: AudioInput | None = None,
                     progress: Progress | None = None) -> MusicLMOutput:
    """``prompts`` (P texts; "" = unconditional) -> ``MusicLMOutput`` with clips of exactly
    ``round(seconds * codec.sample_rate)`` samples.

    ``params``: sampling settings shared by the stages (``cfg_scale`` guides the semantic and coarse stages; the
    fine stage is never guided); ``seed`` makes the whole pipeline reproducible.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    sem_stage, coarse_stage, fine_stage, codec = model.semantic, model.coarse, model.fine, model.codec
    device = sem_stage.rates.device
    n_prompts, n = len(prompts), int(num_candidates)
    b = n_prompts * n
    texts = [p for p in prompts for _ in range(n)]
    empty = torch.tensor([not t.strip() for t in texts], device=device)
    text_emb = model.mulan.embed_text(texts).to(device)  # [B, D]
    sem_rate = sem_stage.semantic_rate or float(getattr(model.semantic_tokenizer, "frame_rate", 0) or 0)
    if sem_rate <= 0:
        raise ValueError("the semantic stage records no semantic frame rate (trained before rates were stored?)")
    fr = float(codec.frame_rate)
    n_sem, n_codes = max(1, round(seconds * sem_rate)), max(1, round(seconds * fr))
    sem_prompt = coarse_prompt = fine_prompt = None
    if continuation is not None:
        if model.semantic_tokenizer is None:
            raise ValueError("continuation needs the semantic tokenizer (--semantic-tokenizer DIR)")
        tok = model.semantic_tokenizer
        sem_prompt = tok.encode(continuation.at(tok.sample_rate, 1).to(device)).to(device)
        codes = codec.encode(continuation.at(codec.sample_rate, codec.channels).to(device),
                             n_q=fine_stage.total_q).codes
        coarse_prompt, fine_prompt = codes[:, :coarse_stage.n_q], codes[:, coarse_stage.n_q:fine_stage.total_q]
        if codes.shape[-1] >= n_codes:
            raise ValueError(f"the continued audio ({codes.shape[-1] / fr:.2f} s) is not shorter than the requested "
                             f"duration ({seconds:g} s); ask for a longer --duration")
        sem_prompt, coarse_prompt, fine_prompt = (t.expand(b, -1, -1) for t in (sem_prompt, coarse_prompt,
                                                                                fine_prompt))
    ticks = _Ticks(progress, [n_sem, n_codes, n_codes])

    def mulan_prefix(stage, namespace: str) -> Tensor:
        tokens = model.quantizer.tokens(text_emb, namespace).to(device)
        pre = stage.mulan_prefix(tokens, train=False)
        return pre.masked_fill(empty[:, None, None], 0.0)

    sem_pre = mulan_prefix(sem_stage, "semantic")
    semantic = _decode_stage(sem_stage, n_sem, sem_prompt, _params(params, model.windows.get("semantic"), sem_rate),
                             b, sem_pre, ticks.stage(0))  # [B, 1, Fs]
    coarse_mulan = mulan_prefix(coarse_stage, "coarse")
    sem_emb = coarse_stage.prefix_modules["semantic"]

    def coarse_prefix(start: int, frames: int) -> tuple[Tensor, Tensor]:
        first = min(int(start / fr * sem_rate), n_sem - 1)
        last = max(first + 1, min(n_sem, round((start + frames) / fr * sem_rate)))
        sem = sem_emb(semantic[:, 0, first:last])
        return torch.cat([coarse_mulan, sem], 1), torch.cat([torch.zeros_like(coarse_mulan), sem], 1)

    coarse = _decode_stage(coarse_stage, n_codes, coarse_prompt, _params(params, model.windows.get("coarse"), fr),
                           b, coarse_prefix, ticks.stage(1))  # [B, Qc, F]

    def fine_prefix(start: int, frames: int) -> Tensor:
        return fine_stage.prefix(coarse[..., start:start + frames])

    fine = _decode_stage(fine_stage, n_codes, fine_prompt,
                         _params(params, model.windows.get("fine"), fr, cfg_scale=1.0, cfg_beta=None),
                         b, fine_prefix, ticks.stage(2))  # [B, K - Qc, F]
    n_samples = round(seconds * codec.sample_rate)
    codes = torch.cat([coarse, fine], 1)
    wav = codec.decode(codes)[..., :n_samples]
    if wav.shape[-1] < n_samples:
        wav = F.pad(wav, (0, n_samples - wav.shape[-1]))
    audio_emb = model.mulan.embed_audio(wav, codec.sample_rate).to(device)
    scores = (audio_emb * text_emb).sum(-1).masked_fill(empty, 0.0).view(n_prompts, n)
    best = scores.argmax(dim=1)
    candidates = wav.view(n_prompts, n, *wav.shape[1:])
    return MusicLMOutput(candidates[torch.arange(n_prompts), best], candidates, scores, best,
                         semantic.view(n_prompts, n, *semantic.shape[1:]), codes.view(n_prompts, n, *codes.shape[1:]))


def generate_clips(request: GenerationRequest, progress: Progress | None) -> tuple[Tensor, int, list[dict]]:
    """``ostinato generate --semantic REF --coarse REF --fine REF [--mulan REF --quantizer FILE] --prompt TEXT
    [--num-candidates N] [--continue WAV]``."""
    missing = [f"--{k}" for k in ("semantic", "coarse", "fine") if getattr(request, k) is None]
    if missing:
        raise ValueError(f"MusicLM needs {', '.join(missing)} (the three trained stages)")
    model = load_musiclm(request.semantic, request.coarse, request.fine, request.mulan, request.quantizer,
                         request.codec, request.semantic_tokenizer, trust=request.trust)
    prompts = list(request.prompts) or [""]
    params = request.params
    out = generate_musiclm(model, prompts, request.duration, params, num_candidates=request.num_candidates,
                           continuation=request.continuation, progress=progress)
    records = [{"prompt": p, "family": "musiclm", **model.sources, "duration": request.duration,
                "continue": request.inputs.get("continue"), "num_candidates": request.num_candidates,
                "mulan_scores": [round(float(s), 5) for s in out.scores[i]], "chosen": int(out.best[i]),
                **params.__dict__} for i, p in enumerate(prompts)]
    return out.wav, model.codec.sample_rate, records
