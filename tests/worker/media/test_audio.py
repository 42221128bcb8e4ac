"""Audio decoding: files written with soundfile and PyAV in the test."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from shared.errors import MediaError
from worker.media.audio import decode_audio, resample


def sine(freq: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None), ("OGG", "VORBIS")])
def test_files_become_mono_float32_at_the_model_rate(fmt, subtype):
    data = encoded(sine(440, 1.0, 44_100, channels=2), 44_100, fmt, subtype)
    audio = decode_audio(data, sampling_rate=16_000, max_duration=30)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.sampling_rate == 16_000
    assert audio.duration == pytest.approx(1.0, abs=0.01)
    assert dominant_hz(audio.samples, 16_000) == pytest.approx(440, abs=3)


def test_pyav_fallback_for_formats_soundfile_cannot_read():
    buf = io.BytesIO()
    rate = 48_000
    with av.open(buf, mode="w", format="ipod") as container:  # an .m4a: AAC in MP4
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        wave = sine(1000, 1.0, rate)
        for start in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(sf.LibsndfileError):
        sf.read(io.BytesIO(buf.getvalue()))
    audio = decode_audio(buf.getvalue(), sampling_rate=16_000, max_duration=30)
    assert audio.duration == pytest.approx(1.0, abs=0.1)
    assert dominant_hz(audio.samples, 16_000) == pytest.approx(1000, abs=5)


def test_duration_cap():
    data = encoded(sine(440, 3.0, 16_000), 16_000, "WAV")
    with pytest.raises(MediaError) as err:
        decode_audio(data, sampling_rate=16_000, max_duration=2.0, param="p")
    assert err.value.code == "audio_too_long" and err.value.param == "p"


def test_garbage_is_a_client_error_without_internals():
    for data in (b"", b"RIFF\x00\x00garbage", b"\x00" * 1000):
        with pytest.raises(MediaError) as err:
            decode_audio(data, sampling_rate=16_000, max_duration=30)
        assert err.value.code == "audio_decode_failed"
        assert "0x" not in err.value.message and "/" not in err.value.message


def test_resampling_is_band_limited():
    # 7 kHz at 44.1 kHz cannot exist at 8 kHz: it must vanish, not fold to 1 kHz.
    high = resample(sine(7000, 1.0, 44_100), 44_100, 8_000)
    assert np.abs(high).max() < 0.05
    kept = resample(sine(1000, 1.0, 44_100), 44_100, 8_000)
    assert dominant_hz(kept, 8_000) == pytest.approx(1000, abs=2)
    assert len(kept) == 8_000
