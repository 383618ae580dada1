"""Build of cbn_ext: the C++ extension cbn_ext._C.

The CPU kernels are always compiled. The CUDA kernels (csrc/cuda/*.cu) are compiled too
when torch has CUDA and a CUDA toolkit is found, or when FORCE_CUDA=1 (an error if that is
impossible); FORCE_CPU=1 skips them. Build without build isolation, against the torch that
will run the extension:

    pip install --no-build-isolation -e .

Environment:
    FORCE_CUDA=1 / FORCE_CPU=1   see above
    CBN_CUDA_EMULATION=1         also build cbn_ext._emu: the CUDA kernels compiled as host
                                 C++ and run on the CPU by an emulation of the parts of CUDA
                                 they use (csrc/emu/), as torch.ops.cbn_ext_emu.*; for the
                                 tests (CI), needs no CUDA at all
    TORCH_CUDA_ARCH_LIST         CUDA targets, e.g. "8.0;9.0"; default: the visible GPU,
                                 else 8.0 and 9.0
    CUDA_HOME                    the CUDA toolkit; default: found behind `nvcc`
    MAX_JOBS                     parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_from_nvcc(nvcc):
    """The toolkit root behind an `nvcc`, which may be a wrapper script: nvcc's dry run
    prints the folder of the real compiler."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"#\$ _HERE_=(.+)$", line.strip())
        if m:
            return os.path.dirname(os.path.normpath(m.group(1)))
    return None


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the toolkit behind `nvcc` on the PATH, else
    /usr/local/cuda. None when no toolkit with nvcc and headers is found."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(_toolkit_from_nvcc(nvcc))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.realpath(home)
    return None


def nvidia_wheel_includes(cuda_home):
    """Include folders of torch's nvidia-* wheels holding the cuBLAS / cuSPARSE headers
    that ATen/cuda/CUDAContext.h includes, when the toolkit lacks them."""
    needed = ("cublas_v2.h", "cusparse.h")
    if all(os.path.isfile(os.path.join(cuda_home, "include", h)) for h in needed):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.isfile(os.path.join(inc, h)) for h in needed):
                dirs.append(inc)
    return dirs


def default_arch_list(torch):
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}"
    return "8.0;9.0"


def get_extensions():
    force_cuda, force_cpu = _flag("FORCE_CUDA"), _flag("FORCE_CPU")
    if force_cuda and force_cpu:
        sys.exit("error: FORCE_CUDA=1 and FORCE_CPU=1 contradict each other")
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if cuda_sources:  # with the host-compiled parts of the CUDA backend
        cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))

    # CUDA_HOME must be set before torch.utils.cpp_extension is imported: it guesses the
    # toolkit from nvcc's folder, which is wrong behind a wrapper script.
    cuda_home = None if force_cpu else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = False
    if force_cuda and not cuda_sources:
        print("cbn_ext: FORCE_CUDA=1, but there are no CUDA sources in csrc/cuda")
    if not force_cpu and cuda_sources:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} has no CUDA")
        if cuda_home is None:
            reasons.append("no CUDA toolkit found (set CUDA_HOME)")
        if force_cuda and reasons:
            sys.exit("error: FORCE_CUDA=1 but " + "; ".join(reasons))
        with_cuda = not reasons

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wall", "-Wno-psabi",
           "-Wno-unknown-pragmas"]
    define_macros = []
    extra_link_args = ["-fopenmp"]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define_macros += [("CBN_WITH_CUDA", None),
                          ("CBN_CUDA_ARCHS", archs.replace(" ", "").replace(";", "_"))]
        # ptxas warns of register spills and of any local memory (a stack frame: a spill, a
        # dynamically indexed local array, a call's saved registers): CI
        # (CBN_STRICT_WARNINGS=1, scripts/setup.sh) fails on them, for every architecture
        # it builds. A policy: each is a slow path in these kernels; a new toolkit may
        # allocate registers differently and trip it.
        nvcc = ["-O3", "-lineinfo", "-Xptxas=-warn-spills,-warn-lmem-usage"]
        for inc in nvidia_wheel_includes(cuda_home):
            # -isystem: searched after the -I folders (the toolkit's own headers), so only
            # what the toolkit lacks comes from here
            cxx += ["-isystem", inc]
            nvcc += ["-isystem", inc]
        print(f"cbn_ext: building CPU and CUDA kernels (toolkit {cuda_home}, archs {archs})")
        ext = CUDAExtension("cbn_ext._C", sources + cuda_sources, define_macros=define_macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=extra_link_args)
    else:
        why = "FORCE_CPU=1" if force_cpu else (
            "no CUDA sources" if not cuda_sources else "CUDA unavailable")
        print(f"cbn_ext: building CPU kernels only ({why})")
        ext = CppExtension("cbn_ext._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=extra_link_args)
    exts = [ext]
    if _flag("CBN_CUDA_EMULATION"):
        print("cbn_ext: building the emulated CUDA backend (cbn_ext._emu)")
        # hidden symbols: cbn_ext._emu has its own copies of what cbn_ext._C also defines
        emu_cxx = ["-O2", "-Wall", "-Wno-psabi", "-Wno-unknown-pragmas", "-fvisibility=hidden"]
        exts.append(CppExtension(
            "cbn_ext._emu", sorted(glob.glob(os.path.join("csrc", "emu", "*.cpp"))),
            define_macros=[("CBN_CUDA_EMULATION", "1")], extra_compile_args={"cxx": emu_cxx}))
    else:
        # an in-place build without emulation must not leave an older one importable
        for stale in glob.glob(os.path.join(ROOT, "cbn_ext", "_emu*.so")):
            print(f"cbn_ext: removing {os.path.relpath(stale, ROOT)} (no CBN_CUDA_EMULATION=1)")
            os.remove(stale)
    return exts, BuildExtension


def main():
    ext_modules, build_ext = get_extensions()
    setup(
        name="cbn_ext",
        version="0.1.0",
        description="Compound Batch Normalization: fused CPU and CUDA kernels for PyTorch",
        long_description=open(os.path.join(ROOT, "README.md")).read()
        if os.path.exists(os.path.join(ROOT, "README.md")) else "",
        long_description_content_type="text/markdown",
        packages=find_packages(include=["cbn_ext", "cbn_ext.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext.with_options(no_python_abi_suffix=False)},
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
