#!/usr/bin/env python
"""Train an embedded model: DigitsUNet on scikit-learn digits (8x8).

``--objective eps`` (default): DDPM eps-MSE under the discrete linear VP schedule (the ``digits`` model).
``--objective flow``: rectified flow, x_t = (1 - t) x0 + t eps with t ~ U[0, 1], velocity-MSE on
v = eps - x0, network time 1000 t (the ``flow`` model).

Seeded and deterministic (single CPU thread, fixed data order, fixed noise stream):

    python scripts/train_digits.py                                # eps model: 7000 steps, seed 0
    python scripts/train_digits.py --objective flow               # flow model: 2500 steps, seed 0
    python scripts/train_digits.py --steps 200 --out /tmp/d.safetensors   # smoke test

Writes the EMA weights as safetensors (weights + architecture metadata strings only), a smoothed
loss curve and a JSON log next to this script (``digits_loss.png`` / ``digits_train_log.json`` for
eps, ``digits_flow_loss.png`` / ``digits_flow_train_log.json`` for flow).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from deis_fast.zoo.digits import (  # noqa: E402
    DEFAULT_CONFIG,
    DIGITS_BETA_END,
    DIGITS_BETA_START,
    DIGITS_NUM_TRAIN_TIMESTEPS,
    DIGITS_SCHEDULE,
    FLOW_TIME_SCALE,
    DigitsUNet,
    digits_kind,
    load_digits_data,
    training_example,
)

# per objective: time of the held-out MSE check, output-file suffix, default number of steps
MID_TIME = {"eps": 500, "flow": 0.5}
SUFFIX = {"eps": "", "flow": "_flow"}
DEFAULT_STEPS = {"eps": 7000, "flow": 2500}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=tuple(MID_TIME), default="eps",
                   help="eps: DDPM eps-prediction (the 'digits' model); flow: rectified-flow velocity ('flow')")
    p.add_argument("--steps", type=int, default=None, help="default: 7000 (eps) or 2500 (flow), as shipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None, help="output .safetensors path (default: the shipped asset)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", type=str, default=None, help="loss curve PNG (default: next to this script)")
    p.add_argument("--log", type=str, default=None, help="JSON log (default: next to this script)")
    p.add_argument("--print-every", type=int, default=250)
    args = p.parse_args(argv)
    sfx = SUFFIX[args.objective]
    args.steps = args.steps or DEFAULT_STEPS[args.objective]
    args.out = args.out or digits_kind(args.objective).weights
    args.plot = os.path.join(HERE, f"digits{sfx}_loss.png") if args.plot is None else args.plot
    args.log = os.path.join(HERE, f"digits{sfx}_train_log.json") if args.log is None else args.log
    return args


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))  # cosine to 10 %


def schedule_info(objective: str) -> dict:
    """The training process, as stored in the weights' metadata and the log."""
    if objective == "eps":
        return {"schedule": DIGITS_SCHEDULE, "beta_start": DIGITS_BETA_START, "beta_end": DIGITS_BETA_END,
                "num_train_timesteps": DIGITS_NUM_TRAIN_TIMESTEPS}
    return {"schedule": "flow", "shift": 1.0, "time_scale": FLOW_TIME_SCALE}


def draw_times(objective: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Training times: integer timesteps 0..999 (eps) or t ~ U[0, 1) (flow)."""
    if objective == "eps":
        return torch.randint(0, DIGITS_NUM_TRAIN_TIMESTEPS, (n,), generator=gen)
    return torch.rand((n,), generator=gen)


@torch.no_grad()
def eval_mse_ratio(model, data, objective, n=512, seed=1234):
    """MSE(pred, target) / MSE(0, target) on noised real digits at the mid time (lower is better)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.shape[0], generator=g)[:n]
    x0 = data[idx]
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((n,), MID_TIME[objective], dtype=torch.long if objective == "eps" else torch.float32)
    xt, model_t, target = training_example(objective, x0, eps, t)
    pred = model(xt, model_t)
    return float(((pred - target) ** 2).mean() / (target**2).mean())


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    data = load_digits_data()  # [1797, 1, 8, 8] in [-1, 1]
    N = data.shape[0]
    obj = args.objective

    config = dict(DEFAULT_CONFIG)
    model = DigitsUNet(**config)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DigitsUNet {config}: {n_params} parameters ({n_params * 4 / 1e6:.2f} MB fp32)", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)  # data order, t and noise all come from here

    perm = torch.randperm(N, generator=gen)
    pos = 0
    losses = []
    t0 = time.time()
    B = args.batch_size
    for step in range(args.steps):
        if pos + B > N:  # new epoch, deterministic reshuffle
            perm = torch.randperm(N, generator=gen)
            pos = 0
        x0 = data[perm[pos : pos + B]]
        pos += B
        t = draw_times(obj, B, gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt, model_t, target = training_example(obj, x0, eps, t)

        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = torch.nn.functional.mse_loss(model(xt, model_t), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - decay)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)

        losses.append(loss.item())
        if (step + 1) % args.print_every == 0 or step == 0 or step + 1 == args.steps:
            recent = float(np.mean(losses[-args.print_every :]))
            el = time.time() - t0
            eta = el / (step + 1) * (args.steps - step - 1)
            print(
                f"step {step + 1:6d}/{args.steps}  loss {recent:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"elapsed {el:6.1f}s  eta {eta:6.1f}s",
                flush=True,
            )

    wall = time.time() - t0
    final_loss = float(np.mean(losses[-500:]))
    ratio_ema = eval_mse_ratio(ema, data, obj)
    ratio_raw = eval_mse_ratio(model.eval(), data, obj)
    what = {"eps": "eps", "flow": "v"}[obj]
    ratio_key = f"{what}_mse_ratio_t{MID_TIME[obj]}"
    print(f"done in {wall:.1f}s; final loss (mean of last 500) {final_loss:.4f}; "
          f"{what}-MSE ratio at t={MID_TIME[obj]}: ema {ratio_ema:.3f}, raw {ratio_raw:.3f}", flush=True)

    # ---- weights (EMA) as safetensors, architecture config as metadata strings
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in ema.state_dict().items()}
    meta = {k: str(v) for k, v in config.items()}
    schedule = schedule_info(obj)
    meta.update({"model": "DigitsUNet", "prediction": {"eps": "epsilon", "flow": "flow"}[obj]})
    meta.update({k: str(v) for k, v in schedule.items()})
    meta.update({"data_scaling": "x/8-1", "seed": str(args.seed), "steps": str(args.steps)})
    save_file(state, args.out, metadata=meta)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1e6:.3f} MB)", flush=True)

    # ---- log
    log = {
        "config": config,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": B,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "ema": args.ema,
        "threads": args.threads,
        **({"objective": obj} if obj != "eps" else {}),
        "schedule": {("name" if k == "schedule" else k): v for k, v in schedule.items()},
        "n_params": n_params,
        "file_bytes": size,
        "final_loss": final_loss,
        f"{ratio_key}_ema": ratio_ema,
        f"{ratio_key}_raw": ratio_raw,
        "wall_time_s": wall,
        "torch": torch.__version__,
    }
    if args.log:
        with open(args.log, "w") as f:
            json.dump(log, f, indent=2)
        print(f"wrote {args.log}", flush=True)

    # ---- loss curve
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        arr = np.asarray(losses)
        k = max(1, min(200, len(arr) // 20))
        smooth = np.convolve(arr, np.ones(k) / k, mode="valid")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(np.arange(len(arr)), arr, alpha=0.2, lw=0.5, label="per step")
        ax.plot(np.arange(k - 1, len(arr)), smooth, lw=1.5, label=f"moving avg ({k})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} MSE")
        ax.set_yscale("log")
        ax.set_title(f"DigitsUNet {obj} training (seed {args.seed}, final {final_loss:.4f})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"wrote {args.plot}", flush=True)


if __name__ == "__main__":
    main()
