"""Non-temporal stores of large outputs (csrc/cpu/cbn_cpu.cpp, stream_output): the AVX2
and AVX-512 CPU kernels write y and dx that are at least `cpu_stream_min_bytes` long, and whose rows
are whole cache lines, by streaming stores. They must write the same bits as ordinary
stores, at any thread count. The threshold is read once per process
(CBN_EXT_STREAM_MIN_BYTES), so each setting runs in a process of its own: 0 streams every
output whose rows allow it, -1 none; cbn_ext._C._stream_count() says how many were. At 0
the channels-last evaluation (K = 2 and 3 here) also prefetches the lines of the outputs
it does not stream (cbn_cpu.cpp, prefetch_output: from half the threshold; here
the channels-last rows of 20 channels, and the (N, C) rows of 48 in float16 and
bfloat16, 96 bytes), at -1 none: that must not change a bit either."""

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import cbn_ext
from conftest import cpu_isas_run

HERE = os.path.dirname(os.path.abspath(__file__))

# Rows of whole 64-byte lines (streamed at 0): planar rows of 64 and 4096 positions (the
# latter cut into chunks of 128 for a batch of one), 1d rows of 32, interleaved rows of 32
# channels, and of 48 (float32 and float64 only); and rows that are not (never streamed).
SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {here!r})
    import cbn_ext
    from conftest import Fc, make_stable_case, run
    assert cbn_ext.build_info()["cpu_stream_min_bytes"] == {expect}, cbn_ext.build_info()
    assert {isa!r} is None or cbn_ext.build_info()["cpu_isa"] == {isa!r}, cbn_ext.build_info()
    if {threads}:
        torch.set_num_threads({threads})
    out = []
    for shape, cl in [((4, 24, 8, 8), False), ((1, 8, 64, 64), False), ((6, 16, 32), False),
                      ((4, 32, 5, 7), True), ((64, 48), False), ((4, 10, 5, 7), False),
                      ((3, 20, 3, 3), True)]:
        for K in (1, 2, 3):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for groups in (False, True):
                    case = make_stable_case(shape, K, dtype, channels_last=cl, seed=K,
                                            groups=groups)
                    elt = case.x.element_size()
                    row = (shape[1] if cl or len(shape) == 2 else shape[-1] * shape[-2]
                           if len(shape) == 4 else shape[-1]) * elt
                    lines = row % 64 == 0 and {expect} == 0
                    for training in (True, False):
                        n0 = cbn_ext._C._stream_count()
                        r = run(Fc.compound_batch_norm, case, training)
                        # y (forward) and dx (backward), streamed or not
                        streamed = cbn_ext._C._stream_count() - n0
                        assert streamed == (2 if lines else 0), (shape, cl, dtype, streamed)
                        assert r.y.stride() == case.x.stride(), (r.y.stride(), case.x.stride())
                        out.append(((shape, cl, K, str(dtype), groups, training),
                                    [r.y, r.dx, r.dw, r.db, r.running_mean, r.running_var,
                                     r.running_prior]))
    torch.save(out, {path!r})
    print("ok", len(out))
""")


def _run(env_value, expect, path, threads=0, isa=None):
    env = dict(os.environ, CBN_EXT_STREAM_MIN_BYTES=env_value)
    env.pop("CBN_EXT_CPU_ISA", None)
    if isa is not None:
        env["CBN_EXT_CPU_ISA"] = isa
    code = SCRIPT.format(here=HERE, expect=expect, path=path, threads=threads, isa=isa)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return torch.load(path)


def _same(runs_a, runs_b):
    assert len(runs_a) == len(runs_b) == 7 * 3 * 4 * 2 * 2
    for (key, a), (key2, b) in zip(runs_a, runs_b):
        assert key == key2
        for i, (ta, tb) in enumerate(zip(a, b)):
            if ta is None or tb is None:
                assert ta is None and tb is None, (key, i)
                continue
            assert ta.stride() == tb.stride(), (key, i)
            assert torch.equal(ta, tb), (key, i, (ta.double() - tb.double()).abs().max())


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_streamed_outputs_same_bits_as_ordinary_stores(isa):
    if isa not in cpu_isas_run():
        pytest.skip(f"no {isa} kernels on this processor (non-temporal stores are in the "
                    "AVX2 and AVX-512 kernels only)")
    with tempfile.TemporaryDirectory() as d:
        streamed = _run("0", 0, os.path.join(d, "streamed.pt"), isa=isa)
        one_thread = _run("0", 0, os.path.join(d, "one_thread.pt"), threads=1, isa=isa)
        ordinary = _run("-1", None, os.path.join(d, "ordinary.pt"), isa=isa)
    _same(streamed, ordinary)
    _same(one_thread, ordinary)


def test_stream_threshold_is_reported():
    v = cbn_ext.build_info()["cpu_stream_min_bytes"]
    assert v is None or (isinstance(v, int) and v >= 0), v
    if cbn_ext.build_info()["cpu_isa"] == "baseline":
        assert v is None
    elif "CBN_EXT_STREAM_MIN_BYTES" not in os.environ and sys.platform.startswith("linux"):
        # the default: half the last-level cache (sysfs), when the machine says
        sizes = []
        base = "/sys/devices/system/cpu/cpu0/cache"
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            try:
                with open(os.path.join(base, name, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:].upper(), 1)
            sizes.append(int(s.rstrip("KkMm")) * mult)
        if sizes:
            assert v == max(sizes) // 2, (v, sizes)


@pytest.mark.skipif(cbn_ext.build_info()["cpu_isa"] == "baseline",
                    reason="the baseline build streams nothing and reads no threshold")
@pytest.mark.parametrize("value", ["abc", "12MB", "1e9", "99999999999999999999"])
def test_bad_stream_threshold_is_a_clear_error(value):
    code = textwrap.dedent("""
        import torch, cbn_ext
        assert cbn_ext.build_info()["cpu_stream_min_bytes"] is None  # and no error here
        try:
            cbn_ext.CompoundBatchNorm2d(8, 2)(torch.randn(2, 8, 4, 4))
        except RuntimeError as e:
            print("error:", str(e).splitlines()[0])
        else:
            print("no error")
    """)
    env = dict(os.environ, CBN_EXT_STREAM_MIN_BYTES=value)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"CBN_EXT_STREAM_MIN_BYTES must be an integer number of bytes" in p.stdout, p.stdout
    assert repr(value) in p.stdout, p.stdout
