"""Procedural sound makers of the synthetic EigenScape generator: mono signals at 48 kHz.

Cars, voices, birds, chimes, footsteps and hum, and the noise, envelope and spectrum shapes
the diffuse beds are built from. Each maker draws everything from the generator it is given,
so a scene is deterministic from its seed. numpy / scipy only (the generator runs without torch).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import signal

from utils.eigenscape import unit_vectors

SAMPLE_RATE = 48000


def spectral_shape(freqs: np.ndarray, slope: float, highpass: float, lowpass: float) -> np.ndarray:
    """Power spectrum f^-slope between a 4th-order high-pass and low-pass corner."""
    f = np.maximum(freqs, 1.0)
    hp = (f / highpass) ** 4 / (1 + (f / highpass) ** 4)
    lp = 1 / (1 + (f / lowpass) ** 4)
    return (f / 100.0) ** -slope * hp * lp


def slow_envelope(rng: np.random.Generator, n: int, rate_hz: float, depth: float,
                  sample_rate: float) -> np.ndarray:
    """Positive random modulation: 1 + depth * smoothed noise, evaluated at n points."""
    knots = max(int(n / sample_rate * rate_hz) + 4, 4)
    values = rng.uniform(-1, 1, knots)
    grid = np.linspace(0, knots - 3, n)
    env = np.interp(grid, np.arange(knots), values)
    return np.maximum(1 + depth * env, 0.05)


def lowpass_noise(rng: np.random.Generator, n: int, cutoff: float, order: int = 2) -> np.ndarray:
    """White noise through a Butterworth low-pass."""
    sos = signal.butter(order, cutoff, fs=SAMPLE_RATE, output="sos")
    return signal.sosfilt(sos, rng.normal(size=n))


def events(rng: np.random.Generator, seconds: float, rate_hz: float) -> np.ndarray:
    """Poisson event times in seconds."""
    count = rng.poisson(rate_hz * seconds)
    return np.sort(rng.uniform(0, seconds, count))


def car_pass(rng: np.random.Generator, n: int) -> tuple[np.ndarray, Callable]:
    """A car driving past: engine harmonics + tyre noise; loudest when passing, moving in
    azimuth."""
    t = np.arange(n) / SAMPLE_RATE
    seconds = n / SAMPLE_RATE
    t_pass = rng.uniform(0.2, 0.8) * seconds
    speed = rng.uniform(8, 15)  # m/s
    distance = rng.uniform(4, 12)
    f0 = rng.uniform(25, 45) * (1 + 0.05 * np.sin(2 * np.pi * 0.3 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    engine = sum(np.sin(k * phase) / k for k in range(1, 7))
    tyres = lowpass_noise(rng, n, 900.0)
    sig = engine * 0.6 + tyres / (tyres.std() + 1e-9)
    along = speed * (t - t_pass)
    sig *= 1.0 / np.sqrt(distance ** 2 + along ** 2)
    heading = rng.uniform(0, 360)

    def direction(times: np.ndarray) -> np.ndarray:
        az = heading + np.degrees(np.arctan2(speed * (times - t_pass), distance))
        return unit_vectors(np.full_like(times, 92.0), az)

    return sig, direction


def voice(rng: np.random.Generator, n: int) -> np.ndarray:
    """Speech-like babble of one talker: glottal pulses through moving formants, with pauses."""
    f_base = rng.uniform(95, 230)
    t = np.arange(n) / SAMPLE_RATE
    f0 = f_base * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = np.cumsum(f0) / SAMPLE_RATE
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per period
    pulses = signal.lfilter([1.0], [1.0, -0.95], pulses)  # glottal roll-off
    out = np.zeros(n)
    pos = int(rng.uniform(0, 0.5) * SAMPLE_RATE)
    while pos < n:
        length = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
        seg = pulses[pos:pos + length] + 0.05 * rng.normal(size=len(pulses[pos:pos + length]))
        for formant, bw in zip((rng.uniform(300, 800), rng.uniform(900, 2200),
                                rng.uniform(2400, 3200)),
                               (80, 120, 180)):
            r = np.exp(-np.pi * bw / SAMPLE_RATE)
            a = [1, -2 * r * np.cos(2 * np.pi * formant / SAMPLE_RATE), r * r]
            seg = seg + 0.5 * signal.lfilter([1 - r], a, seg)
        out[pos:pos + len(seg)] = seg * np.hanning(len(seg))
        pos += length + (int(rng.uniform(0.2, 1.0) * SAMPLE_RATE) if rng.random() < 0.2 else 0)
    return out


def bird(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bird song: bursts of short frequency sweeps between 2 and 5 kHz."""
    out = np.zeros(n)
    seconds = n / SAMPLE_RATE
    for start in events(rng, seconds, rng.uniform(0.2, 0.6)):
        f_lo, f_hi = sorted(rng.uniform(1800, 5000, 2))
        for k in range(rng.integers(2, 7)):
            dur = rng.uniform(0.04, 0.15)
            i0 = int((start + k * dur * 1.4) * SAMPLE_RATE)
            m = int(dur * SAMPLE_RATE)
            if i0 + m > n:
                break
            tt = np.arange(m) / SAMPLE_RATE
            freq = f_hi + (f_lo - f_hi) * tt / dur if k % 2 else f_lo + (f_hi - f_lo) * tt / dur
            out[i0:i0 + m] += np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * np.hanning(m)
    return out


def chime(rng: np.random.Generator, n: int) -> np.ndarray:
    """Struck bells / shop chimes: decaying inharmonic partials."""
    out = np.zeros(n)
    seconds = n / SAMPLE_RATE
    times = events(rng, seconds, 0.15)
    if len(times) == 0:
        times = np.array([rng.uniform(0, seconds)])
    for start in times:
        f0 = rng.uniform(400, 900)
        m = min(int(2.5 * SAMPLE_RATE), n - int(start * SAMPLE_RATE))
        tt = np.arange(m) / SAMPLE_RATE
        tone = sum(np.sin(2 * np.pi * f0 * r * tt) * np.exp(-tt * (1.5 + r)) / r
                   for r in (1.0, 2.76, 5.40, 8.93))
        i0 = int(start * SAMPLE_RATE)
        out[i0:i0 + m] += tone
    return out


def footsteps(rng: np.random.Generator, n: int) -> np.ndarray:
    """A walker: short low-passed noise thumps about twice per second."""
    out = np.zeros(n)
    period = rng.uniform(0.45, 0.6)
    thump = int(0.06 * SAMPLE_RATE)
    decay = np.exp(-np.arange(thump) / (0.012 * SAMPLE_RATE))
    t = rng.uniform(0, period)
    while (i0 := int(t * SAMPLE_RATE)) + thump < n:
        out[i0:i0 + thump] += rng.normal(size=thump) * decay * rng.uniform(0.6, 1.0)
        t += period * rng.uniform(0.9, 1.1)
    return signal.sosfilt(signal.butter(2, 1500, fs=SAMPLE_RATE, output="sos"), out)


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ventilation / mains hum: 50 Hz harmonics plus low broadband noise."""
    t = np.arange(n) / SAMPLE_RATE
    tones = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 2 * np.pi)) / k
                for k in (1, 2, 3, 4, 6))
    return tones + 0.5 * lowpass_noise(rng, n, 300.0)


POINT_GENERATORS = {"voice": voice, "bird": bird, "chime": chime, "footsteps": footsteps,
                    "hum": hum}
