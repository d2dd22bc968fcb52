"""Public yardstick (DESIGN §7): 8-component mixture in 64-d (std 0.3, mixture seed 1234), discrete
linear betas, t 999 -> 0, 400 noises from seed 0; median per-sample relative error to the exact ODE
endpoint. deis_fast methods x grids against diffusers' schedulers (default spacing and Karras sigmas).

    python benchmarks/yardstick.py [--nfe 5 6 8 10 15 20] [--out benchmarks/yardstick.md]
    python benchmarks/yardstick.py --nfe 4 5 6 8 10 --methods ddim tab3 logrho3 --grids time_quadratic logsnr \
        --no-diffusers --extra ddim:time_quadratic:1,1 ddim:time_quadratic:2,1 ...   # PFDiff table
"""
import sys

from deis_fast.cli.bench import yardstick_main

if __name__ == "__main__":
    sys.exit(yardstick_main())
