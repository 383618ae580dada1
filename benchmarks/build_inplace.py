"""`python setup.py build_ext --inplace`, with every translation unit compiled in parallel
even without ninja, and the time each one took.

torch's BuildExtension compiles with ninja when it finds it, else through setuptools,
one source after another -- 10 translation units in series are minutes that a GPU lease
does not have (benchmarks/gpu_check.sh). Here setuptools' CCompiler.compile hands the
sources to MAX_JOBS threads instead (each runs its own compiler process), as
numpy.distutils used to. With ninja the patch is idle and ninja's own log gives the times.

    MAX_JOBS=16 python benchmarks/build_inplace.py      # from the repository root
    CBN_NO_NINJA=1 ...                                  # as if ninja were missing
"""

import concurrent.futures
import os
import runpy
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def patch_parallel_compile(jobs):
    import setuptools  # noqa: F401  (makes `distutils` setuptools' own)
    from distutils import ccompiler

    def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                extra_preargs=None, extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            src, ext = build[obj]
            t0 = time.perf_counter()
            self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
            print(f"build_inplace: {os.path.relpath(src, ROOT)} compiled in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)

        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            for f in [pool.submit(one, obj) for obj in objects if obj in build]:
                f.result()  # re-raises a compile error
        return objects

    ccompiler.CCompiler.compile = compile


def ninja_times(build_dir):
    """(seconds, target) of each step in ninja's log under build_dir, longest first."""
    out = []
    for dirpath, _, files in os.walk(build_dir):
        if ".ninja_log" in files:
            with open(os.path.join(dirpath, ".ninja_log")) as f:
                for line in f:
                    parts = line.split("\t")
                    if len(parts) >= 4 and parts[0].isdigit():
                        out.append(((int(parts[1]) - int(parts[0])) / 1e3,
                                    os.path.relpath(parts[3], ROOT)))
    return sorted(out, reverse=True)


def main():
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    patch_parallel_compile(jobs)
    if os.environ.get("CBN_NO_NINJA") == "1":
        # a `ninja` that fails first on the PATH (importing torch.utils.cpp_extension here,
        # before setup.py sets CUDA_HOME, would make it guess the toolkit)
        fake = tempfile.mkdtemp(prefix="no-ninja-")
        with open(os.path.join(fake, "ninja"), "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        os.chmod(os.path.join(fake, "ninja"), 0o755)
        os.environ["PATH"] = fake + os.pathsep + os.environ.get("PATH", "")
    os.chdir(ROOT)
    sys.argv = ["setup.py", "build_ext", "--inplace"]
    t0 = time.perf_counter()
    try:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    finally:
        for secs, target in ninja_times(os.path.join(ROOT, "build"))[:12]:
            print(f"build_inplace: ninja {target} {secs:.1f} s")
        print(f"build_inplace: {time.perf_counter() - t0:.1f} s in all, MAX_JOBS={jobs}",
              flush=True)


if __name__ == "__main__":
    main()
