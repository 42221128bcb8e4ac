"""Audio bytes -> a mono float32 waveform at the model's sampling rate.

Pure: no I/O. soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3) reads
first; PyAV takes what it cannot (AAC/M4A, Opus, WebM). The duration is
checked from the header before the samples are decoded where the format
says it, and again on what was decoded. Resampling is band-limited (FFT),
so downsampling does not fold high frequencies into the band the model
hears.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from shared.errors import MediaError


@dataclass
class DecodedAudio:
    samples: np.ndarray  # (n,) float32 mono, at `sampling_rate`
    sampling_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sampling_rate


def decode_audio(
    data: bytes,
    *,
    sampling_rate: int,
    max_duration: float,
    format_hint: str | None = None,
    param: str | None = None,
) -> DecodedAudio:
    if not data:
        raise MediaError("The audio is empty.", param=param, code="audio_decode_failed")
    decoded = _with_soundfile(data, max_duration, param)
    if decoded is None:
        decoded = _with_pyav(data, max_duration, param)
    samples, rate = decoded
    if samples.size == 0:
        raise MediaError("The audio has no samples.", param=param, code="audio_decode_failed")
    _check_duration(len(samples) / rate, max_duration, param)
    if len(samples) / rate < MIN_DURATION:
        # A few samples (a truncated file) give the audio encoder no frame at all, which
        # models do not handle gracefully: refuse it here, typed, instead of failing inside.
        raise MediaError(f"The audio is shorter than {MIN_DURATION:g}s.", param=param, code="audio_too_short")
    if not np.isfinite(samples).all():
        raise MediaError("The audio has non-finite samples.", param=param, code="audio_decode_failed")
    return DecodedAudio(resample(samples, rate, sampling_rate).astype(np.float32), sampling_rate)


MIN_DURATION = 0.1


def _check_duration(seconds: float, max_duration: float, param: str | None) -> None:
    if seconds > max_duration:
        raise MediaError(
            f"The audio is {seconds:.1f}s long, over the limit of {max_duration:g}s.",
            param=param,
            code="audio_too_long",
        )


def _with_soundfile(data: bytes, max_duration: float, param: str | None) -> tuple[np.ndarray, int] | None:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.samplerate <= 0:
                return None
            if f.frames > 0:
                _check_duration(f.frames / f.samplerate, max_duration, param)
            # Read at most one sample past the limit, whatever the header claims.
            limit = int(max_duration * f.samplerate) + 1
            samples = f.read(frames=limit, dtype="float32", always_2d=True)
            return samples.mean(axis=1), int(f.samplerate)
    except MediaError:
        raise
    except Exception:
        return None


def _with_pyav(data: bytes, max_duration: float, param: str | None) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except Exception as exc:
        raise _undecodable(exc, param) from None
    with container:
        if not container.streams.audio:
            raise MediaError("The file has no audio stream.", param=param, code="audio_decode_failed")
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate or 0)
        if rate <= 0:
            raise MediaError("The audio's sampling rate is unknown.", param=param, code="audio_decode_failed")
        if stream.duration and stream.time_base:
            _check_duration(float(stream.duration * stream.time_base), max_duration, param)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        count = 0
        limit = int(max_duration * rate) + 1
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    count += len(chunk)
                if count > limit:
                    _check_duration(count / rate, max_duration, param)
        except MediaError:
            raise
        except Exception as exc:
            if not chunks:
                raise _undecodable(exc, param) from None
    if not chunks:
        raise MediaError("The audio has no samples.", param=param, code="audio_decode_failed")
    return np.concatenate(chunks).astype(np.float32), rate


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling through the FFT (what scipy.signal.resample does)."""
    if source_rate == target_rate or samples.size == 0:
        return samples
    n_out = max(1, round(len(samples) * target_rate / source_rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = n_out // 2 + 1
    if keep <= len(spectrum):
        spectrum = spectrum[:keep]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(keep - len(spectrum), dtype=spectrum.dtype)])
    return np.fft.irfft(spectrum, n_out) * (n_out / len(samples))


def _undecodable(exc: BaseException, param: str | None) -> MediaError:
    return MediaError(
        f"Could not decode the audio ({type(exc).__name__}); send WAV, FLAC, MP3, OGG, M4A or WebM.",
        param=param,
        code="audio_decode_failed",
    )
