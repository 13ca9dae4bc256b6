"""``ostinato app --model REF``: a Gradio web app to generate with a MusicGen (an XP, export or import folder).

Controls: text prompt, duration (fixed, past the training window by a sliding window or chained segments, or
unlimited), classifier-free guidance, top-k / top-p, temperature, seed, and reference uploads: the audio to
continue, and the melody and style references when the model has those conditioners. A progress bar follows the
decoding; the result plays in the page and downloads as a wav (every clip is also kept in ``--out`` with a
``.json`` of its parameters).

Unlimited: the piece grows chunk by chunk, each chunk continuing the last ``context`` seconds of the piece (the
audio prompt of ``MusicGen.generate``, crossfaded back over that overlap), until Stop; the player follows the
newest chunk and Stop hands over the whole piece.

Offline: analytics are off and the page's scripts, styles and fonts are the ones of the gradio package.
"""
from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from ostinato.devices import resolve_device  # noqa: E402
from ostinato.fileio import atomic_write_json, write_wav  # noqa: E402
from ostinato.nn.decoding import GenerationParams, crossfade  # noqa: E402
from ostinato.generation.musicgen import LongForm, load_generator  # noqa: E402
from ostinato.generation.request import AudioInput  # noqa: E402

__all__ = ["Request", "Studio", "build_app", "launch_app"]


class Stopped(Exception):
    """Raised inside a generation when its session asked to stop."""


@dataclass
class Request:
    """One generation: what the page's controls hold. ``seed`` < 0 = a random seed (reported back)."""

    prompt: str = ""
    seconds: float = 10.0
    unlimited: bool = False
    long_form: str = "window"
    chunk_seconds: float | None = None
    cfg_scale: float = 3.0
    cfg_beta: float | None = None
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    seed: int = -1
    melody: str | None = None
    style: str | None = None
    continuation: str | None = None


def _read(path: str | None, what: str) -> AudioInput | None:
    from ostinato.data.audio import AudioDecodeError, load_audio

    if not path:
        return None
    try:
        wav, sr = load_audio(path)
    except AudioDecodeError as e:
        raise ValueError(f"the {what} upload: {e}") from e
    return AudioInput(wav, sr)


def _looped_from(ref: AudioInput | None, seconds: float) -> AudioInput | None:
    """The reference as heard from ``seconds`` on (looped), so a chunk's melody continues the previous one's."""
    if ref is None:
        return None
    shift = round(seconds * ref.sample_rate) % ref.wav.shape[-1]
    return AudioInput(torch.roll(ref.wav, -shift, dims=-1), ref.sample_rate)


class Studio:
    """The model and codec behind the app: fixed-length and unlimited generation, files in ``out``."""

    def __init__(self, model: str, codec: str | None = None, *, out: str | Path | None = None,
                 window: float | None = None, device: str = "auto", trust: bool = False) -> None:
        self.model_ref = model
        self.model, self.codec, cfg, self.codec_ref = load_generator(model, codec, trust=trust)
        self.device = torch.device(resolve_device(device))
        self.model.to(self.device)
        self.codec.to(self.device)
        self.window = window if window is not None else (cfg.get("data") or {}).get("segment_seconds")
        self.sample_rate = self.codec.sample_rate
        self.has_melody = self.model.melody is not None
        self.has_style = self.model.style is not None
        base = Path(out) if out is not None else Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "app"
        self.out = base.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem) for p in self.out.glob("[0-9][0-9][0-9]*.wav") if p.stem.isdigit()]
        self._numbers = itertools.count(max(taken, default=-1) + 1)
        self._lock = threading.Lock()  # one decoding at a time: the model and its caches are shared
        self._stop: dict[str, threading.Event] = {}

    # -- sessions ---------------------------------------------------------------------------------------
    def stop_event(self, session: str) -> threading.Event:
        return self._stop.setdefault(session, threading.Event())

    def stop(self, session: str) -> None:
        self.stop_event(session).set()

    # -- generation -------------------------------------------------------------------------------------
    def _params(self, req: Request, seed: int) -> GenerationParams:
        beta = req.cfg_beta if self.has_style and req.cfg_beta else None
        return GenerationParams(temperature=req.temperature, top_k=int(req.top_k), top_p=req.top_p,
                                cfg_scale=req.cfg_scale, cfg_beta=beta, seed=seed)

    def _long_form(self, mode: str) -> LongForm:
        window = self.window
        overlap = 2.0 if window is None else min(2.0, window / 4)
        return LongForm(mode=mode, window=window, overlap=overlap)

    def _generate(self, req: Request, seconds: float, seed: int, melody: AudioInput | None,
                  style: AudioInput | None, continuation: AudioInput | None,
                  progress: Callable[[int, int], None]) -> torch.Tensor:
        with self._lock:
            wav = self.model.generate([req.prompt.strip()], seconds, params=self._params(req, seed), melody=melody,
                                      style=style, continuation=continuation,
                                      long_form=self._long_form(req.long_form), progress=progress)
        return wav[0].float().cpu().clamp(-1, 1)

    def _inputs(self, req: Request) -> tuple[AudioInput | None, AudioInput | None, AudioInput | None]:
        melody, style = _read(req.melody, "melody"), _read(req.style, "style")
        if melody is not None and not self.has_melody:
            raise ValueError("this model has no melody conditioner; leave the melody upload empty")
        if style is not None and not self.has_style:
            raise ValueError("this model has no style conditioner; leave the style upload empty")
        return melody, style, _read(req.continuation, "continuation")

    def _save(self, wav: torch.Tensor, record: dict, path: Path | None = None) -> Path:
        path = path or self.out / f"{next(self._numbers):03d}.wav"
        write_wav(path, wav, self.sample_rate)
        atomic_write_json(path.with_suffix(".json"), {**record, "model": self.model_ref, "codec": self.codec_ref,
                                                      "seconds": wav.shape[-1] / self.sample_rate})
        return path

    def generate(self, req: Request, progress: Callable[[int, int], None] | None = None,
                 session: str = "") -> tuple[Path, int]:
        """One clip of ``req.seconds`` (the continuation included) -> (its wav in ``out``, the seed used)."""
        if req.seconds <= 0:
            raise ValueError(f"duration must be positive, got {req.seconds}")
        seed = req.seed if req.seed >= 0 else random.randrange(2**31)
        melody, style, continuation = self._inputs(req)
        wav = self._generate(req, req.seconds, seed, melody, style, continuation, self._checked(progress, session))
        return self._save(wav, {**asdict(req), "seed": seed}), seed

    def chunk_plan(self, req: Request) -> tuple[int, int]:
        """Unlimited mode: (samples of context each chunk continues, new samples per chunk), whole codec frames."""
        hop = self.codec.hop_length
        window = self.window or 10.0
        context = max(1, round(min(window / 2, 5.0) * self.codec.frame_rate)) * hop
        new = req.chunk_seconds or window - context / self.sample_rate
        return context, max(1, round(new * self.codec.frame_rate)) * hop

    def unlimited(self, req: Request, progress: Callable[[int, int], None] | None = None,
                  session: str = "") -> Iterator[tuple[Path, Path, int]]:
        """Grow a piece until the session stops: yields (the newest chunk's wav, the whole piece's wav, seed)
        after every chunk. The piece file is rewritten in place; the chunk files are kept beside it."""
        seed = req.seed if req.seed >= 0 else random.randrange(2**31)
        melody, style, continuation = self._inputs(req)
        context, new = self.chunk_plan(req)
        sr, check = self.sample_rate, self._checked(progress, session)
        record = {**asdict(req), "seed": seed, "context_seconds": context / sr, "chunk_seconds": new / sr}
        piece_path = self.out / f"{next(self._numbers):03d}.wav"
        piece: torch.Tensor | None = None
        for i in itertools.count():
            if piece is None:
                lead = 0 if continuation is None else continuation.wav.shape[-1] / continuation.sample_rate
                # a whole window first, so that the piece is longer than the context of the next chunk
                piece = chunk = self._generate(req, lead + (context + new) / sr, seed, melody, style, continuation,
                                               check)
            else:
                tail = AudioInput(piece[:, -context:], sr)
                start = (piece.shape[-1] - context) / sr
                wav = self._generate(req, (context + new) / sr, seed + i, _looped_from(melody, start), style, tail,
                                     check)
                piece = crossfade([piece[None], wav[None]], context)[0]
                chunk = wav[:, context:]
            self._save(piece, {**record, "chunks": i + 1}, piece_path)
            chunk_path = self._save(chunk, {**record, "chunk": i, "piece": str(piece_path)},
                                    piece_path.with_name(f"{piece_path.stem}_chunk{i:04d}.wav"))
            yield chunk_path, piece_path, seed
            if session and self.stop_event(session).is_set():
                return

    def _checked(self, progress: Callable[[int, int], None] | None, session: str) -> Callable[[int, int], None]:
        stop = self.stop_event(session) if session else None

        def report(done: int, total: int) -> None:
            if stop is not None and stop.is_set():
                raise Stopped()
            if progress is not None:
                progress(done, total)

        return report


def _throttled(progress: gr.Progress, desc: str, every: float = 0.25) -> Callable[[int, int], None]:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every or done >= total:
            last[0] = now
            progress((done, max(total, 1)), desc=desc, unit="steps")

    return report


def build_app(studio: Studio) -> gr.Blocks:
    """The page: controls on the left, output (player, download, status) on the right."""
    window = studio.window
    window_text = f"{window:g} s" if window else "the whole clip"
    with gr.Blocks(title="ostinato", analytics_enabled=False, delete_cache=(900, 3600)) as app:
        gr.Markdown(f"## ostinato: MusicGen\n`{studio.model_ref}`: {studio.sample_rate} Hz, decoding window "
                    f"{window_text}, on {studio.device.type}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="A baroque chorale for church organ, in G major, at 90 BPM")
                with gr.Row():
                    seconds = gr.Number(label="Duration (s)", value=min(10.0, window or 10.0), minimum=0.1,
                                        elem_id="duration")
                    unlimited = gr.Checkbox(label="Unlimited (grow until Stop)", value=False, elem_id="unlimited")
                long_form = gr.Radio(["window", "chain"], value="window", elem_id="long_form",
                                     label=f"Past one window ({window_text}): sliding window or chained segments")
                with gr.Row():
                    cfg = gr.Slider(1.0, 10.0, value=3.0, step=0.1, label="CFG scale", elem_id="cfg")
                    temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="temperature")
                with gr.Row():
                    top_k = gr.Slider(0, 1000, value=250, step=1, label="Top-k (0 = off)", elem_id="top_k")
                    top_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Top-p (0 = off)", elem_id="top_p")
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="seed")
                continuation = gr.Audio(label="Continue this audio (optional)", type="filepath", sources=["upload"],
                                        elem_id="continuation")
                melody = gr.Audio(label="Melody reference (optional)", type="filepath", sources=["upload"],
                                  visible=studio.has_melody, elem_id="melody")
                style = gr.Audio(label="Style reference (optional)", type="filepath", sources=["upload"],
                                 visible=studio.has_style, elem_id="style")
                cfg_beta = gr.Slider(0.0, 10.0, value=0.0, step=0.1, visible=studio.has_style, elem_id="cfg_beta",
                                     label="Style double-CFG beta (0 = plain CFG)")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column():
                audio = gr.Audio(label="Output", type="filepath", interactive=False, elem_id="output",
                                 buttons=["download"])
                file = gr.File(label="Download (wav)", interactive=False, elem_id="download")
                status = gr.Markdown(elem_id="status")
        inputs = [prompt, seconds, unlimited, long_form, cfg, cfg_beta, top_k, top_p, temperature, seed,
                  melody, style, continuation]

        def run(prompt_, seconds_, unlimited_, long_form_, cfg_, beta_, top_k_, top_p_, temperature_, seed_,
                melody_, style_, continuation_, request: gr.Request, progress=gr.Progress()):
            session = request.session_hash or ""
            studio.stop_event(session).clear()
            req = Request(prompt=prompt_ or "", seconds=float(seconds_ or 0), unlimited=bool(unlimited_),
                          long_form=long_form_, cfg_scale=float(cfg_), cfg_beta=float(beta_) or None,
                          top_k=int(top_k_), top_p=float(top_p_), temperature=float(temperature_),
                          seed=int(-1 if seed_ is None else seed_), melody=melody_, style=style_,
                          continuation=continuation_)
            t0, whole = time.time(), None
            running.add(session)
            try:
                if not req.unlimited:
                    path, used = studio.generate(req, _throttled(progress, "generating"), session)
                    yield (str(path), str(path), f"{req.seconds:g} s in {time.time() - t0:.1f} s, seed {used}: "
                           f"`{path}`")
                    return
                for n, (chunk, whole, used) in enumerate(
                        studio.unlimited(req, _throttled(progress, "generating the next chunk"), session), 1):
                    so_far = sf.info(str(whole)).duration
                    yield (str(chunk), gr.skip(), f"chunk {n}: {so_far:.1f} s so far (seed {used}); Stop to get "
                           f"the whole piece: `{whole}`")
                yield stopped(whole)  # the session stopped after a chunk
            except (ValueError, FileNotFoundError) as e:
                raise gr.Error(str(e)) from e
            except Stopped:  # the session stopped inside a chunk
                yield stopped(whole)
            finally:
                running.discard(session)

        def stopped(whole: Path | None) -> tuple:
            if whole is None or not Path(whole).is_file():
                return gr.skip(), gr.skip(), "stopped"
            return str(whole), str(whole), f"stopped: {sf.info(str(whole)).duration:.1f} s in `{whole}`"

        def halt(request: gr.Request):
            # Stop is cooperative: the generation sees the flag within a decoding step and writes the final status
            # itself, so nothing lands after it (a cancelled event could still deliver a chunk message late)
            session = request.session_hash or ""
            if session not in running:
                return "nothing to stop"
            studio.stop(session)
            return gr.skip()

        running: set[str] = set()  # sessions with a generation under way
        generate.click(run, inputs=inputs, outputs=[audio, file, status], concurrency_limit=1)
        stop.click(halt, outputs=[status], queue=False)
    return app


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port that is taken or an address this machine cannot serve on."""
    import errno
    import socket

    from ostinato.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"--host {host}: not an address or name of this machine; use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: in use on {host}; choose another port (--port {port + 1}) or stop "
                                "what serves there") from None
            if e.errno == errno.EACCES:
                raise UserError(f"--port {port}: needs privileges below 1024; choose a port from 1024 up") from None
            raise UserError(f"--host {host} --port {port}: cannot serve there ({e.strerror}); use 127.0.0.1 or "
                            "0.0.0.0") from None


def launch_app(model: str, codec: str | None = None, *, host: str = "127.0.0.1", port: int = 7860,
               out: str | Path | None = None, window: float | None = None, device: str = "auto",
               trust: bool = False) -> None:
    """Load the model, then serve the app until interrupted (prints its local URL)."""
    check_port(host, port)  # before the model loads
    studio = Studio(model, codec, out=out, window=window, device=device, trust=trust)
    print(f"ostinato app: {model} ({'melody, ' if studio.has_melody else ''}{'style, ' if studio.has_style else ''}"
          f"window {studio.window or 'none'}); clips go to {studio.out}", flush=True)
    build_app(studio).queue().launch(server_name=host, server_port=port, share=False, inbrowser=False,
                                     allowed_paths=[str(studio.out)], show_error=True, ssr_mode=False,
                                     mcp_server=False, pwa=False, enable_monitoring=False)
