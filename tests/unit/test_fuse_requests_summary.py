"""scripts/fuse-requests: the summary of the kernel's FUSE tracepoints that tells a walk's
time in the file system's answers from its own (read from saved `perf script` output)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/fuse-requests"

# Two requests of `find` one after the other (a READDIRPLUS of 100 us, a READLINK of
# 20 us, 50 us apart), one of another program on another mount meanwhile, an end whose
# send came before the recording, and a line that is no FUSE event.
PERF_SCRIPT = """\
            find   100 [000]   10.000000: fuse:fuse_request_send: connection 40 req 2 opcode 44 (FUSE_READDIRPLUS) len 80
          python   200 [001]   10.000100:  fuse:fuse_request_end: connection 40 req 2 len 512 error 0
  Trio thread 0   201 [001]   10.000110: fuse:fuse_request_send: connection 41 req 7 opcode 3 (FUSE_GETATTR) len 56
          python   202 [000]   10.000120:  fuse:fuse_request_end: connection 41 req 7 len 120 error 0
            find   100 [000]   10.000150: fuse:fuse_request_send: connection 40 req 4 opcode 5 (FUSE_READLINK) len 40
          python   200 [001]   10.000170:  fuse:fuse_request_end: connection 40 req 4 len 60 error 0
          python   200 [001]   10.000200:  fuse:fuse_request_end: connection 40 req 1 len 60 error 0
            find   100 [000]   10.000300: sched:sched_switch: prev_comm=find
"""


def _summary(tmp_path, *args) -> dict:
    saved = tmp_path / "perf.txt"
    saved.write_text(PERF_SCRIPT)
    out = subprocess.run([sys.executable, SCRIPT, "--json", "--perf-script", saved, *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_requests_of_one_caller_are_timed_by_type(tmp_path):
    s = _summary(tmp_path, "--comm", "find")
    assert list(s["ops"]) == ["FUSE_READDIRPLUS", "FUSE_READLINK"]  # most time first
    rd = s["ops"]["FUSE_READDIRPLUS"]
    assert rd["count"] == 1 and rd["total_s"] == pytest.approx(100e-6, abs=1e-9)
    assert rd["bands"] == {"<300us": {"count": 1, "total_s": pytest.approx(100e-6, abs=1e-9)}}
    assert s["ops"]["FUSE_READLINK"]["p50_us"] == pytest.approx(20, abs=1e-3)
    assert s["in_requests_s"] == pytest.approx(120e-6, abs=1e-9)
    assert s["between_requests_s"] == pytest.approx(50e-6, abs=1e-9)
    assert s["span_s"] == pytest.approx(170e-6, abs=1e-9)  # to the last counted end
    assert s["unmatched"] == 2  # the other program's end, the end sent before recording


def test_every_caller_counts_without_comm(tmp_path):
    s = _summary(tmp_path)
    assert s["ops"]["FUSE_GETATTR"]["count"] == 1
    # The GETATTR was sent while none was in flight: the gap before it is its own.
    assert s["between_requests_s"] == pytest.approx((10 + 30) * 1e-6, abs=1e-9)


def test_bad_use_is_refused_with_a_message(tmp_path):
    for args in ([], ["--perf-script", str(tmp_path / "missing")],
                 ["--perf-script", "x", "--", "true"]):
        done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
        assert done.returncode == 2 and "error:" in done.stderr, args
