"""The CPU kernels exist in three builds, the compiler's default instruction set,
AVX2+FMA, and AVX2+FMA with AVX-512 (F, VL, BW, DQ, BF16), the best one the processor has
chosen at run time (CBN_EXT_CPU_ISA caps it). Each must be right, and the AVX2 and AVX-512
code must stay inside its own functions (else a machine without them could run it)."""

import functools
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cbn_ext
from conftest import CPU_ISAS, cpu_isas_run

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {here!r})
    import cbn_ext
    from conftest import Fc, R, TOL, compare, make_stable_case, run
    assert cbn_ext.build_info()["cpu_isa"] == {isa!r}, cbn_ext.build_info()
    for shape, layout in [((64, 13), False), ((4, 10, 5, 7), False), ((4, 10, 5, 7), True),
                          ((3, 64, 9, 9), True)]:
        for K in (1, 2, 3):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for training in (True, False):
                    case = make_stable_case(shape, K, dtype, channels_last=layout, seed=K)
                    ours = run(Fc.compound_batch_norm, case, training)
                    ref = run(R.compound_batch_norm, case, training, dtype=torch.float64)
                    compare(ours, ref, TOL[dtype])
    print({isa!r}, "ok")
""")

# Half-precision conversions of non-finite values: the same bits from both builds (and
# NaN as c10 writes it, sign | 0x7E00, whatever payload the input NaN carried).
NONFINITE = textwrap.dedent("""
    import torch, cbn_ext
    bits = torch.tensor([0x7E01, -0x01CD, 0x7C01, 0x7C00, -0x0400, 0x3C00, 0x7D55, -0x4000],
                        dtype=torch.int16)  # NaNs with payloads (one signaling), +-inf, 1, -2
    torch.manual_seed(0)
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 24, 5, 7).to(dtype)
            flat = x.view(-1)
            idx = torch.arange(0, flat.numel(), 37)[:bits.numel()]
            flat.view(torch.int16)[idx] = bits
            x = x.contiguous(memory_format=layout)
            for K in (1, 2):
                m = cbn_ext.CompoundBatchNorm2d(24, K).to(dtype).eval()
                with torch.no_grad():
                    m.running_mean.copy_(torch.randn(K, 24))
                y = m(x)
                out.append(y.contiguous().view(-1).view(torch.int16).tolist())
    print(repr(out))
""")


def _need(isa):
    if isa not in cpu_isas_run():
        pytest.skip(f"this processor does not run the {isa} kernels")


# The builds compiled into the library (their kernels' namespaces, by nm), and the ones
# whose instructions /proc/cpuinfo lists.
@functools.lru_cache(maxsize=None)
def _built():
    syms = subprocess.run(["nm", "-C", "--defined-only", cbn_ext._C.__file__],
                          capture_output=True, text=True, check=True).stdout
    return tuple(v for v in CPU_ISAS if f"cbn_ext::cpu::{v}::" in syms)


def _cpu_has():
    with open("/proc/cpuinfo") as f:
        flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")),
                         []))
    has = ["baseline"]
    if {"avx2", "fma", "f16c"} <= flags:
        has.append("avx2")
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_bf16"} <= flags:
            has.append("avx512")
    return has


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("nm")
                         and os.path.exists("/proc/cpuinfo")),
                    reason="needs Linux, nm and /proc/cpuinfo")
def test_best_build_the_processor_has_is_chosen():
    """So that the skips of the tests above (builds this processor does not run) cannot
    hide a build that was compiled in and should run but is not chosen."""
    built = _built()
    assert "baseline" in built, built
    if platform.machine() in ("x86_64", "AMD64"):
        assert "avx2" in built, built  # GCC on x86-64 (the avx512 build needs GCC 11)
    expected = [v for v in _cpu_has() if v in built][-1]
    assert cpu_isas_run()[-1] == expected, (cpu_isas_run(), built, _cpu_has())


def _run_script(code, isa):
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CBN_EXT_CPU_ISA=isa),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_nonfinite_half_values_same_bits_in_every_build(isa):
    _need(isa)
    a, b = eval(_run_script(NONFINITE, "baseline")), eval(_run_script(NONFINITE, isa))
    # the finite values may differ in their last bits (FMA in one build only); the
    # non-finite ones, where they are and their bits, may not
    for i, (ra, rb) in enumerate(zip(a, b)):
        exp_mask = 0x7C00 if i < 4 else 0x7F80  # float16 rows, then bfloat16
        nf_a = {j: v for j, v in enumerate(ra) if (v & exp_mask) == exp_mask}
        nf_b = {j: v for j, v in enumerate(rb) if (v & exp_mask) == exp_mask}
        assert nf_a == nf_b, (i, nf_a, nf_b)
    f16_nans = [v for row in a[:4] for v in row if (v & 0x7C00) == 0x7C00 and (v & 0x03FF)]
    assert f16_nans, "no NaN reached the float16 output"
    assert all((v & 0x7FFF) == 0x7E00 for v in f16_nans), sorted(set(f16_nans))


@pytest.mark.parametrize("isa", list(CPU_ISAS))
def test_kernels_of_each_build_match_reference(isa):
    _need(isa)
    assert f"{isa} ok" in _run_script(SCRIPT.format(here=HERE, isa=isa), isa)


# The AVX-512 build is the AVX2 code with EVEX encodings and vcvtneps2bf16, which flushes
# denormals and keeps NaN payloads (kernels_impl.h takes bf16_bits for such vectors): its
# results must be the AVX2 build's, bit for bit (but for the payload of a float32 NaN):
# on ordinary data (bfloat16 y and dx through vstore and vstore2's vcvtneps2bf16 path: a
# build with its operands swapped fails here), with given groups (one component a
# position), in float64, and on outputs that are denormal, infinite or NaN (NaNs in x at
# evaluation only: in training one NaN makes the whole batch NaN).
SAME_BITS = textwrap.dedent("""
    import dataclasses, sys, torch
    sys.path.insert(0, {here!r})
    import cbn_ext
    from conftest import Fc, make_stable_case, run
    assert cbn_ext.build_info()["cpu_isa"] == {isa!r}, cbn_ext.build_info()
    out = []
    for shape, cl in [((5, 24, 9, 7), False), ((5, 24, 9, 7), True), ((70, 40), False),
                      ((2, 64, 8, 8), False), ((2, 64, 8, 8), True)]:
        for K in (1, 2, 3):
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                for training in (True, False):
                    for kind in ("plain", "groups", "nan", "tiny", "huge"):
                        if kind == "nan" and (training or dtype.itemsize > 2):
                            continue
                        if kind in ("groups", "tiny", "huge") and dtype == torch.float64:
                            continue
                        case = make_stable_case(shape, K, dtype, channels_last=cl, seed=K,
                                                groups=kind == "groups")
                        # tiny gamma and beta: denormal outputs; huge: overflow to infinity
                        scale = {{"tiny": 1e-39, "huge": 3e38}}.get(kind, 1.0)
                        case.weight = case.weight * scale
                        case.bias = case.bias * scale
                        if kind == "nan":
                            x = case.x.detach()
                            flat = x.as_strided((x.numel(),), (1,))  # dense: all of x
                            flat[::101] = float("nan")  # NaN with c10's bits
                            flat.view(torch.int16)[7::151] = 0x7FA1  # NaNs with a payload
                        res = run(Fc.compound_batch_norm, case, training)
                        for f in dataclasses.fields(res):
                            t = getattr(res, f.name)
                            if t is not None and t.dim() > 0:
                                out.append((kind, f.name, t.detach().contiguous()))
    torch.save(out, {path!r})
    print("saved", len(out))
""")


def test_avx512_build_same_bits_as_avx2_build(tmp_path):
    _need("avx512")
    runs = {}
    for isa in ("avx2", "avx512"):
        path = str(tmp_path / f"{isa}.pt")
        assert "saved" in _run_script(SAME_BITS.format(here=HERE, path=path, isa=isa), isa)
        runs[isa] = torch.load(path)
    a, b = runs["avx2"], runs["avx512"]
    assert len(a) == len(b) > 0
    seen = {"finite": 0, "denormal": 0, "inf": 0, "nan": 0}
    for i, ((ka, na, ta), (kb, nb, tb)) in enumerate(zip(a, b)):
        assert (ka, na, ta.dtype, ta.shape) == (kb, nb, tb.dtype, tb.shape), i
        if ta.element_size() == 2:
            # half precision: the bits, NaNs included (c10 writes one NaN)
            same = ta.view(torch.int16) == tb.view(torch.int16)
        else:
            # a float NaN's payload is whichever operand's NaN the hardware propagated
            # (the order of an FMA's operands, say): NaN in both counts as the same
            same = (ta == tb) | (ta.isnan() & tb.isnan())
            same &= (torch.signbit(ta) == torch.signbit(tb)) | ta.isnan()  # -0.0, +0.0
        assert bool(same.all()), (ka, na, ta.dtype, i, int((~same).sum()))
        if ta.dtype == torch.bfloat16 and na in ("y", "dx"):
            v = ta.view(torch.int16).int()
            e, m = v & 0x7F80, v & 0x7F
            seen["finite"] += int(((e != 0x7F80) & (e != 0)).sum())
            seen["denormal"] += int(((e == 0) & (m != 0)).sum())
            seen["inf"] += int(((e == 0x7F80) & (m == 0)).sum())
            seen["nan"] += int(((e == 0x7F80) & (m != 0)).sum())
    assert all(seen.values()), seen


def test_unknown_cpu_isa_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, cbn_ext
        print(cbn_ext.build_info()["cpu_isa"])  # no error here
        try:
            cbn_ext.CompoundBatchNorm2d(4, 2)(torch.randn(2, 4, 3, 3))
        except RuntimeError as e:
            print("error:", e)
    """)
    out = _run_script(code, "avx3")
    assert "error: cbn_ext: CBN_EXT_CPU_ISA must be 'baseline', 'avx2' or 'avx512'" in out, out
    assert "got 'avx3'" in out, out


# The first byte of an instruction after an address-size or segment prefix, if any: in
# 64-bit mode c4 or c5 starts a VEX-encoded (AVX) instruction, 62 an EVEX-encoded
# (AVX-512) one.
def _opcode_start(raw):
    b = raw.split()
    while b and b[0] in ("67", "26", "2e", "36", "3e", "64", "65"):
        b = b[1:]
    return b[0] if b else ""


AVX = re.compile(r"%ymm|%zmm|vfmadd|vfnmadd|vfmsub")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_avx_code_stays_in_its_namespaces():
    """Every function of the library with a VEX- or EVEX-encoded instruction (AVX, FMA,
    AVX-512) belongs to the AVX2 or AVX-512 build of the kernels (cbn_ext::cpu::avx2,
    cbn_ext::cpu::avx512), and every one with an EVEX-encoded instruction to the AVX-512
    build, which stores bfloat16 by vcvtneps2bf16 and computes nothing in 64-byte
    registers (its vectors are 32 bytes)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no AVX2 kernels on this platform")
    so = cbn_ext._C.__file__
    dis = subprocess.run(["objdump", "-d", "-C", "-w", so], capture_output=True, text=True,
                         check=True).stdout
    func = None
    avx_offenders, evex_offenders, zmm = set(), set(), set()
    found = {"avx2": 0, "avx512": 0, "avx512 evex": 0, "avx512 vcvtne": 0}
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if not func or len(parts) < 3:
            continue
        raw, insn = parts[1], parts[2]
        ns = ("avx512" if "cbn_ext::cpu::avx512::" in func
              else "avx2" if "cbn_ext::cpu::avx2::" in func else None)
        start = _opcode_start(raw)
        if start == "62":
            if ns == "avx512":
                found["avx512 evex"] += 1
                found["avx512 vcvtne"] += bool(re.match(r"\s*vcvtne2?ps2bf16\b", insn))
            else:
                evex_offenders.add(func)
        if "%zmm" in insn and not re.match(r"\s*vmovdq[au](8|16|32|64)\b", insn):
            zmm.add(func)  # a 64-byte move (GCC's copies of small arrays) is no vector code
        if start in ("c4", "c5", "62") or AVX.search(insn):
            if ns is None:
                avx_offenders.add(func)
            else:
                found[ns] += 1
    assert found["avx2"] > 0, "the AVX2 kernels were not found"
    if "avx512" in _built():
        assert found["avx512"] > 0 and found["avx512 evex"] > 0, found
        assert found["avx512 vcvtne"] > 0, found
    assert not avx_offenders, (
        f"AVX instructions outside the AVX kernels: {sorted(avx_offenders)[:10]}")
    assert not evex_offenders, (
        f"AVX-512 instructions outside the AVX-512 kernels: {sorted(evex_offenders)[:10]}")
    assert not zmm, f"64-byte vector code in: {sorted(zmm)[:10]}"
