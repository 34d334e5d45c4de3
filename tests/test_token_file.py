"""coding/token_file.py against hostile files: every header field is checked before use, and
no mutation of a token file makes decoding allocate more than the file implies or fail with
anything but TokenFileError / CheckpointMismatchError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import codec
from coding import file_codec, token_file
from modules.level_side_info import LevelSideInfo
from coding.token_file import MAGIC, TokenFileError, read_tokens
from test_codec import _write_wav, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint and four small token files of it: independent, shared-content
    with the reference stream and with the mean stream, and shared-content with level side
    information (version 3)."""
    from conftest import make_config

    tmp = tmp_path_factory.mktemp("tokens")
    save_tiny_checkpoint(make_config(), tmp / "tiny.pt")
    _write_wav(tmp / "in.wav", channels=2, rate=16000, seconds=0.1)
    file_codec.encode_file(tmp / "tiny.pt", tmp / "in.wav", tmp / "i.tok")
    file_codec.encode_file(tmp / "tiny.pt", tmp / "in.wav", tmp / "s.tok",
                           shared_content_coding=True)
    file_codec.encode_file(tmp / "tiny.pt", tmp / "in.wav", tmp / "m.tok",
                           shared_content_coding=True, content_stream="mean")
    file_codec.encode_file(tmp / "tiny.pt", tmp / "in.wav", tmp / "l.tok",
                           shared_content_coding=True, level_side=LevelSideInfo(bands=4))
    return tmp


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[8:12], "little")
    return json.loads(raw[12:12 + length]), raw[12 + length:]


def join(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode("utf-8")
    return MAGIC + len(text).to_bytes(4, "little") + text + payload


# ----------------------------------------------------------------------------------------
# Each field's bad values


BAD_VALUES = {
    "version": [None, "2", 2.0, True, 0, 3, -1, [2]],
    "mode": [None, 5, "joint", ["independent"]],
    "sample_rate": [None, "24000", 0, -24000, 768001, 24000.5, True, 10**12],
    "original_sample_rate": [None, "16000", 0, -1, 768001, 16000.0, 10**12, 1],
    "channels": [None, "2", 0, -2, 2.5, 10**9, False],
    "n_q": [None, "2", 0, -1, 1.5, 10**9],
    "bins": [None, 0, -32, 65537, 32.5, "32"],
    "frames": [None, 0, -8, 8.0, 10**9, "8"],
    "length": [None, 0, -1600, "1600", 1600.5, 10**9, 1],
    "original_length": [None, 0, -1, 1600.0, 10**12, 5],
    "checkpoint_sha256": [None, 5, "abc", "g" * 64, ["0" * 64]],
    "scales": ["x", 1.0, {"0": 1.0}, [1.0], [1.0, 1.0, 1.0], [1.0, None], [1.0, "1"],
               [1.0, -1.0], [0.0, 1.0], [1.0, float("nan")], [float("inf"), 1.0],
               [1e39, 1.0], [1e-46, 1.0], [True, 1.0]],
    "frame_rate": [None, "75", 0, -75, 75.0, 10**9, 100],
}
SHARED_BAD_VALUES = {
    "reference_channel": [None, "0", -1, 2, 1.0, 10**12],
    "scales": [[1.0, 1.0], [-1.0], [float("nan")], "x"],
    "n_q": [1],
    "channels": [1],
}


def _cases(table: dict) -> list:
    return [(key, value) for key, values in table.items() for value in values]


def _check_names_field(error: pytest.ExceptionInfo, key: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    names = {"n_q": ("n_q", "codebooks"), "scales": ("scales",), "version": ("version",),
             "mode": ("mode",)}.get(key, (key,))
    assert any(name in message for name in names), message


@pytest.mark.parametrize("key,value", _cases(BAD_VALUES))
def test_a_bad_header_field_is_one_line_naming_it(files, tmp_path, key, value):
    header, payload = split(files / "i.tok")
    assert token_file.read_tokens(files / "i.tok")[1] == header  # the good file reads
    (tmp_path / "bad.tok").write_bytes(join(header | {key: value}, payload))
    with pytest.raises(TokenFileError) as error:
        read_tokens(tmp_path / "bad.tok")
    _check_names_field(error, key)


@pytest.mark.parametrize("key,value", _cases(SHARED_BAD_VALUES))
def test_a_bad_shared_content_header_field_is_one_line_naming_it(files, tmp_path, key, value):
    header, payload = split(files / "s.tok")
    (tmp_path / "bad.tok").write_bytes(join(header | {key: value}, payload))
    with pytest.raises(TokenFileError) as error:
        read_tokens(tmp_path / "bad.tok")
    _check_names_field(error, key if key in ("reference_channel", "scales") else "channels")


LEVEL_SIDE_BAD_VALUES = {
    "level_side": [None, 4, [], {"bands": 4}, "x"],
    "level_side.bands": [None, 0, -4, 65, 4.0, "4", True, 10**12, 40],
    "level_side.bits": [None, 0, 9, 3.0, "3", -1],
    "level_side.step_db": [None, 0, -1.5, 24.5, "1.5", True, float("nan"), float("inf")],
    "level_side.block_ms": [None, 0, 25, 15.5, -40, 10001, "40", float("nan")],
    "level_side.blocks": [None, 0, 1, 4, 10**9, 3.0, "3"],
    "level_side.max_boost_db": [None, -1.5, 1.0, 6.0, "4.5", True, float("nan"), float("inf")],
    "version": [2],
}


@pytest.mark.parametrize("key,value", _cases(LEVEL_SIDE_BAD_VALUES))
def test_a_bad_level_side_field_is_one_line_naming_it(files, tmp_path, key, value):
    header, payload = split(files / "l.tok")
    assert token_file.read_token_file(files / "l.tok").level_steps.shape == (2, 4, 3)
    if key.startswith("level_side."):
        header["level_side"] = header["level_side"] | {key.split(".")[1]: value}
    else:
        header[key] = value
    (tmp_path / "bad.tok").write_bytes(join(header, payload))
    with pytest.raises(TokenFileError) as error:
        read_tokens(tmp_path / "bad.tok")
    message = str(error.value)
    assert "\n" not in message and "level_side" in message, message


def test_level_side_bytes_short_or_extra_are_refused(files, tmp_path):
    header, payload = split(files / "l.tok")
    for cut, word in ((payload[:-1], "truncated"), (payload + b"\0", "trailing data"),
                      (split(files / "s.tok")[1], "truncated")):
        (tmp_path / "bad.tok").write_bytes(join(header, cut))
        with pytest.raises(TokenFileError, match=f"level side information.*{word}"):
            read_tokens(tmp_path / "bad.tok")


# (file, header change, the field the one-line refusal names)
CONTENT_STREAM_CASES = [
    ("s.tok", {"content_stream": "joint"}, "content_stream"),
    ("s.tok", {"content_stream": None}, "content_stream"),
    ("s.tok", {"content_stream": 1}, "content_stream"),
    ("s.tok", {"content_stream": ["mean"]}, "content_stream"),
    ("m.tok", {"content_stream": "Mean"}, "content_stream"),
    ("i.tok", {"content_stream": "reference"}, "content_stream"),
    ("i.tok", {"content_stream": "mean"}, "content_stream"),
    ("m.tok", {"reference_channel": 0}, "reference_channel"),
    ("m.tok", {"reference_channel": "x"}, "reference_channel"),
    ("m.tok", {"content_stream": "reference"}, "reference_channel"),
    ("s.tok", {"content_stream": "reference", "reference_channel": 2}, "reference_channel"),
    ("m.tok", {"channels": 1}, "channels"),
    ("m.tok", {"n_q": 1}, "n_q"),
]


@pytest.mark.parametrize("name,change,field", CONTENT_STREAM_CASES)
def test_a_content_stream_that_does_not_fit_the_header_is_one_line_naming_it(
        files, tmp_path, name, change, field):
    header, payload = split(files / name)
    # A payload the changed header would describe: the header check alone must refuse it.
    payload = payload[:token_file.code_streams(header | change) * header["frames"] * 2]
    (tmp_path / "bad.tok").write_bytes(join(header | change, payload))
    with pytest.raises(TokenFileError) as error:
        read_tokens(tmp_path / "bad.tok")
    _check_names_field(error, field)
    assert f"{field}={json.dumps(change.get(field, header.get(field)))}" in str(error.value)


def test_a_mean_stream_file_holds_one_stream_and_reads_without_a_reference(files, tmp_path):
    header, payload = split(files / "m.tok")
    assert header["content_stream"] == "mean" and "reference_channel" not in header
    assert len(payload) == len(split(files / "s.tok")[1])     # the reference mode's streams
    codes, meta = read_tokens(files / "m.tok")
    assert (codes[:, 0] == codes[0, 0]).all() and meta == header
    (tmp_path / "null.tok").write_bytes(join(header | {"reference_channel": None}, payload))
    assert (read_tokens(tmp_path / "null.tok")[0] == codes).all()


def test_the_header_is_refused_before_the_payload_is_allocated(files, tmp_path, monkeypatch):
    header, payload = split(files / "m.tok")
    (tmp_path / "bad.tok").write_bytes(join(header | {"reference_channel": 0}, payload))

    def no_payload(*args, **kwargs):
        raise AssertionError("the payload was decoded before the header was checked")

    monkeypatch.setattr(token_file, "_codes_from_payload", no_payload)
    with pytest.raises(TokenFileError, match="reference_channel"):
        read_tokens(tmp_path / "bad.tok")


@pytest.mark.parametrize("key", token_file._REQUIRED_KEYS)
def test_a_missing_header_field_is_named(files, tmp_path, key):
    header, payload = split(files / "i.tok")
    del header[key]
    (tmp_path / "bad.tok").write_bytes(join(header, payload))
    with pytest.raises(TokenFileError, match=key):
        read_tokens(tmp_path / "bad.tok")


def test_a_consistent_header_of_an_absurd_sample_rate_is_refused_before_resampling(files, tmp_path):
    # 0.1 s at 767999 Hz, consistent with 1600 samples at 16 kHz... of a 24 kHz model: the
    # resampling filter between rates that share no factor would take ~74 GB.
    header, payload = split(files / "i.tok")
    header |= {"original_sample_rate": 767999, "original_length": 76800}
    (tmp_path / "odd.tok").write_bytes(join(header, payload))
    read_tokens(tmp_path / "odd.tok")  # a consistent header: the reader accepts it
    with pytest.raises(TokenFileError, match=r"original_sample_rate=767999: resampling .* GB"):
        file_codec.decode_file(files / "tiny.pt", tmp_path / "odd.tok", tmp_path / "odd.wav")


def test_frames_that_the_models_hop_does_not_give_are_refused(files, tmp_path):
    # A version-1 header (no frame_rate) whose frames fit the payload but not the length.
    header, payload = split(files / "i.tok")
    header = {key: header[key] for key in token_file._REQUIRED_KEYS} | {"version": 1}
    header |= {"length": header["length"] * 3, "original_length": header["original_length"] * 3}
    (tmp_path / "v1.tok").write_bytes(join(header, payload))
    with pytest.raises(TokenFileError, match=r"header field frames=\d+: length="):
        file_codec.decode_file(files / "tiny.pt", tmp_path / "v1.tok", tmp_path / "v1.wav")


def test_max_seconds_caps_what_a_file_may_decode_to(files, tmp_path, capsys):
    read_tokens(files / "i.tok", max_seconds=0.1)
    with pytest.raises(TokenFileError, match=r"original_length=1600 .* more than the 0.05 s"):
        read_tokens(files / "i.tok", max_seconds=0.05)
    args = ["decode", "--checkpoint", str(files / "tiny.pt"), "--device", "cpu",
            str(files / "i.tok"), str(tmp_path / "x.wav")]
    assert codec.main(args + ["--max-seconds", "0.05"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--max-seconds" in err
    assert not (tmp_path / "x.wav").exists()
    assert codec.main(args + ["--max-seconds", "0.1"]) == 0


# ----------------------------------------------------------------------------------------
# Seeded fuzzing, under an address-space cap


FUZZ_CHILD = textwrap.dedent('''
    import json, random, resource, signal, sys
    import torch  # maps ~3 GB of address space by itself: the cap comes after it

    root, work, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sys.path.insert(0, root)
    from pathlib import Path
    from coding import file_codec
    from coding.file_codec import CheckpointMismatchError
    from coding.token_file import TokenFileError
    from model import load_model

    work = Path(work)
    loaded = load_model(work / "tiny.pt")
    file_codec.load_model = lambda *args, **kwargs: loaded  # build it once, not per case
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (3 << 29), resource.RLIM_INFINITY))

    def on_alarm(*_):
        raise TimeoutError("a case ran past its time limit")
    signal.signal(signal.SIGALRM, on_alarm)

    EXTREMES = [None, "", "x", True, -1, 0, 1, 2, 3, 7, 2 ** 31, 2 ** 63, 10 ** 12, 10 ** 400,
                -10 ** 9, 0.5, 1e308, -1e308, float("nan"), float("inf"), [], {}, [1.0] * 3,
                [float("nan")], 767999, 768000, 768001, 24000, 16000, "independent",
                "shared_content", "reference", "mean", "0" * 64]
    rng = random.Random(seed)
    sources = [(work / name).read_bytes() for name in ("i.tok", "s.tok", "m.tok", "l.tok")]

    def mutate(raw):
        length = int.from_bytes(raw[8:12], "little")
        header, payload = json.loads(raw[12:12 + length]), raw[12 + length:]
        kind = rng.choice(["flip", "flip", "truncate", "field", "field", "field", "length",
                           "drop"])
        if kind == "flip":
            data = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            return kind, bytes(data)
        if kind == "truncate":
            return kind, raw[:rng.randrange(len(raw))]
        if kind == "length":
            lie = rng.choice([0, 1, length - 1, length + 1, len(raw), 2 ** 32 - 1,
                              rng.randrange(2 ** 32)])
            return kind, raw[:8] + lie.to_bytes(4, "little") + raw[12:]
        keys = sorted(header) + ["reference_channel", "frame_rate", "mode", "content_stream",
                                 "level_side"]
        key = rng.choice(keys)
        target = header
        side = header.get("level_side")
        if isinstance(side, dict) and rng.random() < 0.5:  # a field of the level side information
            target, key = side, rng.choice(sorted(side))
        if kind == "drop":
            target.pop(key, None)
        else:
            target[key] = rng.choice(EXTREMES)
            kind = f"{key}={json.dumps(target[key])[:30]}"
        text = json.dumps(header).encode()
        return kind, raw[:8] + len(text).to_bytes(4, "little") + text + payload

    outcome = {"decoded": 0, "refused": 0, "failures": []}
    for case in range(count):
        kind, data = mutate(sources[case % len(sources)])
        (work / "case.tok").write_bytes(data)
        signal.alarm(20)
        try:
            file_codec.decode_file(work / "tiny.pt", work / "case.tok", work / "case.wav")
            outcome["decoded"] += 1
        except (TokenFileError, CheckpointMismatchError) as error:
            assert "\\n" not in str(error), str(error)
            outcome["refused"] += 1
        except BaseException as error:
            outcome["failures"].append(f"case {case} ({kind}): {type(error).__name__}: "
                                       f"{str(error)[:200]}")
        finally:
            signal.alarm(0)
    print(json.dumps(outcome))
''')


def test_fuzzed_token_files_decode_or_are_refused_within_bounded_memory(files):
    count = 400
    result = subprocess.run(
        [sys.executable, "-c", FUZZ_CHILD, str(ROOT), str(files), "1234", str(count)],
        capture_output=True, text=True, timeout=240, cwd=files,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["failures"] == [], "\n".join(outcome["failures"][:20])
    assert outcome["decoded"] + outcome["refused"] == count
    assert outcome["decoded"] > 0 and outcome["refused"] > count // 2
