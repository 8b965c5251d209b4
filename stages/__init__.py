"""Thin entry modules, one per Makefile target: parse args, load config, call pipeline, log."""

from pipeline.runtime import pin_cpu_isa

# CPU_ISA=avx2|avx512 (docs/REPRODUCIBILITY.md) must reach numpy's OpenBLAS before numpy loads, that
# is before any stage module's imports; configure_runtime() pins again, checks and reports
pin_cpu_isa(strict=False)
