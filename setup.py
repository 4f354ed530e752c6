"""Build of the lmdecode._core extension.

Environment switches (all read at build time):
  LMDECODE_NO_OPENMP=1   build without OpenMP even when the compiler supports it
  LMDECODE_PORTABLE=1    do not pass -march=native (a binary that runs on any x86-64 / arm64)
  LMDECODE_DEBUG=1       -O0 -g, keep asserts
  LMDECODE_SANITIZE=1    instrument the extension with AddressSanitizer and UBSan, at -O1 -g
                         (run Python with the sanitizer runtimes preloaded: see .ci/run)

The sources compile in parallel, one compiler process per CPU (the two largest, model.c and
ops.c, take most of the time: at -O3 about 15 and 9 s, instrumented at -O3 260 and 90 s).
"""
import glob
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def _compiles(compiler, code, extra_compile, extra_link):
    """True if `code` compiles and links with the given flags (a probe, never fatal)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=extra_compile)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=extra_link)
        except Exception:
            return False
    return True


FMA_CHAINS_FLAG = "--param=avoid-fma-max-bits=0"  # GCC; other compilers do not split chains
OPENMP_PROBE = """
#include <omp.h>
int main(void) { int n = 0;
#pragma omp parallel reduction(+:n)
  n += 1;
  return n > 0 ? 0 : 1; }
"""


def _compile_in_parallel(compiler):
    """Makes compiler.compile run one compiler process per source at once, up to the CPU count,
    the largest sources first; the objects come back in the sources' order."""
    compile_one = compiler.compile
    jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def compile_all(sources, *args, **kwargs):
        if jobs < 2 or len(sources) < 2:
            return compile_one(sources, *args, **kwargs)
        largest_first = sorted(sources, key=lambda src: -os.path.getsize(src) if os.path.exists(src) else 0)
        with ThreadPoolExecutor(jobs) as pool:
            objects = dict(zip(largest_first, pool.map(lambda src: compile_one([src], *args, **kwargs),
                                                       largest_first)))
        return [obj for src in sources for obj in objects[src]]

    compiler.compile = compile_all


class BuildExt(build_ext):
    def build_extensions(self):
        compiler = self.compiler
        # -ffp-contract=fast lets a*b+c become one FMA instruction (ISO C mode turns it
        # off). Results stay identical run to run and for any thread count on one
        # machine; they may differ in the last bit between machines with and without FMA.
        # -fno-wrapv undoes the -fwrapv in Python's own CFLAGS: with wrapping signed
        # arithmetic the compiler cannot strength-reduce the kernels' index expressions, and
        # the matmul tiles ran 1.6 x slower. The core never relies on signed overflow
        # (tests/c runs it under UndefinedBehaviorSanitizer).
        compile_args = ["-std=c11", "-Wall", "-Wextra", "-fno-strict-aliasing", "-fno-wrapv", "-ffp-contract=fast"]
        link_args = []
        if _flag("LMDECODE_DEBUG"):
            compile_args += ["-O0", "-g"]
        elif _flag("LMDECODE_SANITIZE"):
            # -O1, as for tests/c's sanitizer build: model.c and ops.c instrumented at -O3 took
            # 6 minutes to compile, at -O1 about one, and the suite ran no slower (108 s).
            compile_args += ["-O1", "-g"]
        else:
            compile_args += ["-O3", "-DNDEBUG"]
        # Vector units: -march=native unless a portable binary is asked for.
        if not _flag("LMDECODE_PORTABLE") and _compiles(compiler, "int main(void){return 0;}", ["-march=native"], []):
            compile_args.append("-march=native")
        # The same sums whichever code path computes them (a prefill, token-by-token decoding,
        # any cache block size) need every a*b+c contracted alike. GCC's tuning for AMD Zen
        # leaves a multiply-add chain in a loop as a multiply and an add when it judges the
        # chain latency-bound, so that a prefill and decoding differed in the last bit on a
        # Zen 3 with -march=native; the parameter turns that heuristic off.
        if _compiles(compiler, "int main(void){return 0;}", ["-Werror", FMA_CHAINS_FLAG], []):
            compile_args.append(FMA_CHAINS_FLAG)
        openmp = False
        if not _flag("LMDECODE_NO_OPENMP") and _compiles(compiler, OPENMP_PROBE, ["-fopenmp"], ["-fopenmp"]):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
            openmp = True
        if _flag("LMDECODE_SANITIZE"):  # after the probes, which link plain executables
            compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                             "-fno-sanitize-recover=undefined"]
            link_args += ["-fsanitize=address,undefined"]
        print(f"lmdecode build: openmp={openmp} flags={' '.join(compile_args)}", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
        _compile_in_parallel(compiler)  # after the probes, which compile one file each
        super().build_extensions()


core_sources = sorted(glob.glob(os.path.join("csrc", "*.c")))

setup(
    ext_modules=[
        Extension(
            "lmdecode._core",
            sources=[os.path.join("python", "lmdecode", "_core.c")] + core_sources,
            include_dirs=["csrc", numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
            libraries=["m"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
