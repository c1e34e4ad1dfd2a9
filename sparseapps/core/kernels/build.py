"""Compiles the CPU kernels ahead of time: ``python -m sparseapps.core.kernels.build``.

The install script runs this once; importing sparseapps later only loads the result. The library goes to
``sparseapps/core/kernels/_build/sparseapps_kernels.so`` beside ``build_info.json`` (torch version + source
digest; a mismatch makes the loader fall back to the reference path and say so). Before the library is
installed it is checked against the reference twins on random inputs. Exit status 0 on success, 1 with a
message on stderr otherwise (the reference path stays in use).

The kernels are compiled once for every instruction set (baseline, AVX2, AVX-512) with per-file target
pragmas and chosen at run time from the CPU's flags, so the library also runs on other x86-64 CPUs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels import formats, library, reference

CFLAGS = [
    "-O3",
    "-DNDEBUG",
    "-fopenmp",
    "-fno-math-errno",
    "-Wall",
    "-Wno-unused-function",
    "-Wno-maybe-uninitialized",
]
LDFLAGS = ["-fopenmp"]


def _self_check() -> None:
    """Compares the freshly loaded operators with the reference twins; raises RuntimeError on a mismatch."""
    generator = torch.Generator().manual_seed(0)
    ops = torch.ops.sparseapps
    info = str(ops.kernel_info())
    isas = ["generic"] + [name for name in ("avx2", "avx512") if f"{name}=1" in info]
    weight = torch.randn(15, 50, generator=generator)
    mask = torch.rand(15, 50, generator=generator) < 0.2
    mask[3] = False
    mask[9] = False
    rows = formats.active_rows(mask)
    try:
        for isa in isas:
            ops._configure(isa, -1, -1)
            for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                w = (weight * mask).to(dtype)
                bias = torch.randn(15, generator=generator).to(dtype)
                blocked = formats.blocked_arrays(w, mask, rows)
                for index_dtype in (torch.int16, torch.int32):
                    values, indices = formats.condensed_arrays(w, mask, rows, index_dtype, pad=True)
                    row_ptr, csr_values, csr_indices = formats.csr_arrays(w, mask, rows, index_dtype)
                    # Every row, the empty ones included: the structure of a compact training layer.
                    full_ptr, _, full_indices = formats.csr_arrays(w, mask, torch.arange(15), index_dtype)
                    for batch in (1, 3, 37):
                        x = torch.randn(batch, 50, generator=generator).to(dtype)
                        want = reference.csr_linear_reference(
                            x, row_ptr, csr_values, csr_indices, bias, rows, 15
                        )
                        outputs = {
                            "condensed_linear": ops.condensed_linear(x, values, indices, bias, rows, 15),
                            "csr_linear": ops.csr_linear(x, row_ptr, csr_values, csr_indices, bias, rows, 15),
                            "blocked_linear": ops.blocked_linear(
                                x,
                                blocked.values,
                                blocked.lanes,
                                blocked.chunks,
                                blocked.group_ptr,
                                blocked.lane_rows,
                                bias,
                                15,
                            ),
                        }
                        expected = dict.fromkeys(outputs, want)
                        if dtype == torch.float32:
                            dy = torch.randn(batch, 15, generator=generator)
                            outputs["csr_sddmm"] = ops.csr_sddmm(x, dy, full_ptr, full_indices)
                            expected["csr_sddmm"] = reference.csr_sddmm_reference(
                                x, dy, full_ptr, full_indices
                            )
                        for name, out in outputs.items():
                            scale = expected[name].float().abs().max().item() + 1e-12
                            error = (out.float() - expected[name].float()).abs().max().item()
                            if not error <= tolerance * scale:
                                raise RuntimeError(
                                    f"self-check failed: {name} isa={isa} dtype={dtype} index={index_dtype} "
                                    f"batch={batch}: max error {error:.3g} vs scale {scale:.3g}"
                                )
        _self_check_kwta(generator)
    finally:
        ops._configure("", -1, -1)


def _self_check_kwta(generator: torch.Generator) -> None:
    """``kwta_csc_linear`` (k-WTA + a column-major sparse layer) against its twin; raises RuntimeError."""
    weight = torch.randn(15, 50, generator=generator)
    mask = torch.rand(15, 50, generator=generator) < 0.2
    col_ptr, rows = formats.csr_structure(mask.t(), torch.int32)
    values = weight.t()[mask.t()].contiguous()
    boost = torch.rand(50, generator=generator) + 0.5
    bias = torch.randn(15, generator=generator)
    for batch, k, with_boost in ((1, 7, True), (3, 50, False), (37, 1, True)):
        x = torch.randn(batch, 50, generator=generator)
        args = (boost if with_boost else None, k, col_ptr, rows, values, bias, 15)
        want = reference.kwta_csc_linear_reference(x, *args)
        error = (torch.ops.sparseapps.kwta_csc_linear(x, *args) - want).abs().max().item()
        if not error <= 1e-5 * (want.abs().max().item() + 1e-12):
            raise RuntimeError(
                f"self-check failed: kwta_csc_linear batch={batch} k={k}: max error {error:.3g}"
            )


def build(*, verbose: bool = False) -> Path:
    """Compiles, checks and installs the library; returns its path.

    Raises:
        RuntimeError: no ninja, a compiler error, or a failed self-check.
    """
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja); torch's extension builder needs it")
    library.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    work = library.BUILD_DIR / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    sources = [str(p) for p in library.source_files() if p.suffix == ".cpp"]
    built = cpp_extension.load(
        name=library.LIBRARY_NAME,
        sources=sources,
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        build_directory=str(work),
        verbose=verbose,
        with_cuda=False,
        is_python_module=False,
    )
    _self_check()
    write_atomic(library.LIBRARY_FILE, Path(str(built)).read_bytes(), mode=0o755)
    info = {
        **library.fingerprint(),
        "cflags": " ".join(CFLAGS),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(library.INFO_FILE, info)
    shutil.rmtree(work, ignore_errors=True)
    return library.LIBRARY_FILE


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"[kernels] compiling {len(library.source_files())} files into {library.BUILD_DIR} ...", flush=True)
    try:
        path = build(verbose=args.verbose)
    except Exception as error:  # any failure leaves the reference path in use; say why and exit non-zero
        print(
            f"[kernels] build failed: {type(error).__name__}: {error}\n"
            f"[kernels] the pure-torch reference path will be used; rerun with --verbose for the compiler output",
            file=sys.stderr,
        )
        return 1
    print(f"[kernels] built and checked {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
