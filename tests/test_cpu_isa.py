"""The CPU kernels exist in two builds, the compiler's default instruction set and
AVX2+FMA, chosen at run time. Both must be right, and the AVX2 code must stay inside its
own functions (else a machine without AVX2 could run it)."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import cbn_ext

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {here!r})
    import cbn_ext
    from conftest import Fc, R, TOL, compare, make_stable_case, run
    assert cbn_ext.build_info()["cpu_isa"] == "baseline", cbn_ext.build_info()
    for shape, layout in [((64, 13), False), ((4, 10, 5, 7), False), ((4, 10, 5, 7), True),
                          ((3, 64, 9, 9), True)]:
        for K in (1, 2, 3):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for training in (True, False):
                    case = make_stable_case(shape, K, dtype, channels_last=layout, seed=K)
                    ours = run(Fc.compound_batch_norm, case, training)
                    ref = run(R.compound_batch_norm, case, training, dtype=torch.float64)
                    compare(ours, ref, TOL[dtype])
    print("baseline ok")
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


def test_nonfinite_half_values_same_bits_in_both_builds():
    env = dict(os.environ, CBN_EXT_CPU_ISA="baseline")
    base = subprocess.run([sys.executable, "-c", NONFINITE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert base.returncode == 0, base.stdout + base.stderr
    here = subprocess.run([sys.executable, "-c", NONFINITE], capture_output=True, text=True,
                          timeout=300)
    assert here.returncode == 0, here.stdout + here.stderr
    a, b = eval(base.stdout), eval(here.stdout)
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


def test_baseline_kernels_match_reference():
    env = dict(os.environ, CBN_EXT_CPU_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(here=HERE)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "baseline ok" in out.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_avx2_code_stays_in_its_namespace():
    """Every function of the library that uses AVX (ymm registers) or FMA belongs to the
    AVX2 build of the kernels (cbn_ext::cpu::avx2)."""
    if cbn_ext.build_info()["cpu_isa"] != "avx2" and sys.platform != "linux":
        pytest.skip("no AVX2 kernels on this platform")
    so = cbn_ext._C.__file__
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True,
                         text=True, check=True).stdout
    func = None
    offenders, avx2_funcs = set(), 0
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        if func and (re.search(r"%ymm|vfmadd|vfnmadd|vfmsub", line)):
            if "cbn_ext::cpu::avx2::" in func:
                avx2_funcs += 1
            elif not func.startswith("cbn_ext::cpu::avx2"):
                offenders.add(func)
    assert avx2_funcs > 0, "the AVX2 kernels were not found"
    assert not offenders, f"AVX2 instructions outside the AVX2 kernels: {sorted(offenders)[:10]}"
