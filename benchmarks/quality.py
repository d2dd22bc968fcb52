"""Quality per NFE (issue 7): deis_fast (fixed and optimized grids) vs diffusers' schedulers on the
analytic mixture (exact reference) and the embedded digits model (float64 rho_rk4 @ 800 NFE reference),
mean ± std over 4 held-out noise seeds; writes a markdown table and a PNG plot.

    python benchmarks/quality.py --out-md benchmarks/quality.md --out-png benchmarks/quality.png
    (also: deis-fast bench quality ...)
"""
import sys

from deis_fast.cli.bench import quality_main

if __name__ == "__main__":
    sys.exit(quality_main())
