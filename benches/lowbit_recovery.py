"""Recovery loss curves by precision and optimizer, side by side on the same data (issue #34's
quality check at t5-small): fp32 + AdamW against bf16 weights with torchao's 8-/4-bit AdamW
(stochastic rounding or an fp32 master copy) and bf16 with torch's AdamW.

    python benches/lowbit_recovery.py [--steps 200] [--shape t5-small] [--sparsity 0.9] [--out FILE]

Setup: one random-init model of `shape`, pruned at layer scope to `sparsity`, copied into every
variant (bf16 variants round it once); batches of 8 x 32 source and 8 target tokens drawn from a
fixed pool of 64 sequences (so the loss can fall far below chance, as a recovery's does), the same
order for every variant; AdamW betas (0.9, 0.98), lr 1e-3 with 10 warm-up steps. Reports each
variant's loss every step, its mean over the last 20 steps, the largest gap to fp32 over a 10-step
moving average, the optimizer's state bytes per kept weight and the median step time. Prints JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from recovery_step import config_for  # noqa: E402

VARIANTS = {  # name: precision, optimizer, make_optimizer options
    "fp32 adamw": ("fp32", "adamw", {}),
    "bf16 adamw": ("bf16", "adamw", {}),
    "bf16 adamw8bit sr": ("bf16", "adamw8bit", {"bf16_stochastic_round": True}),
    "bf16 adamw8bit master": ("bf16", "adamw8bit", {"master_weights": True}),
    "bf16 adamw4bit sr": ("bf16", "adamw4bit", {"bf16_stochastic_round": True}),
    "fp32 adamw8bit": ("fp32", "adamw8bit", {}),
}


def sparse_state_bytes_per_kept(model, optimizer) -> dict:
    from sparse_t5 import SparseLinear
    from sparse_t5.optim import tensor_bytes

    nnz = values = grads = moments = index = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            nnz += m.nnz
            values += tensor_bytes(m.values)
            grads += tensor_bytes(m.values.grad) if m.values.grad is not None else 0
            moments += sum(tensor_bytes(t) for k, t in optimizer.state.get(m.values, {}).items()
                           if k != "step" and torch.is_tensor(t))
            index += sum(tensor_bytes(b) for b in m.buffers(recurse=False))
    parts = {"values": values / nnz, "gradient": grads / nnz, "optimizer": moments / nnz, "index": index / nnz}
    return {**parts, "total": sum(parts.values())}


def optimizer_step_times(n: int = 1 << 22, rounds: int = 7) -> dict:
    """One optimizer step over a single 1-D parameter of n values (a pruned layer's values), per
    variant, the variants interleaved round by round so that a busy machine slows them alike.
    Returns the median ns per value of each."""
    from sparse_t5.optim import make_optimizer

    setups = {}
    for name, (precision, optim, options) in VARIANTS.items():
        p = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16 if precision == "bf16" else torch.float32))
        p.grad = torch.randn(n).to(p.dtype)
        opt = make_optimizer([p], optim, lr=1e-4, **options)
        opt.step()  # state, and the compile
        setups[name] = opt
    times = {name: [] for name in setups}
    for _ in range(rounds):
        for name, opt in setups.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) / n * 1e9 for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="t5-small")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--optimizer-only", action="store_true",
                   help="only time one optimizer step per variant on a 4M-value parameter (ns per value)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimizer_only:
        print(json.dumps({"threads": torch.get_num_threads(), "ns_per_value": optimizer_step_times()}))
        return
    from sparse_t5 import SparseT5ForConditionalGeneration
    from sparse_t5.optim import make_optimizer

    config = config_for(args.shape)
    config.dropout_rate = 0.0  # the curves differ by precision and optimizer only
    torch.manual_seed(0)
    base = SparseT5ForConditionalGeneration(config)
    base.sparsify(args.sparsity, scope="layer")
    g = torch.Generator().manual_seed(1)
    pool_ids = torch.randint(2, config.vocab_size, (64, 32), generator=g)
    pool_labels = torch.randint(2, config.vocab_size, (64, 8), generator=g)
    order = [torch.randint(0, 64, (8,), generator=g) for _ in range(args.steps)]
    out = {"shape": args.shape, "sparsity": args.sparsity, "steps": args.steps, "threads": torch.get_num_threads(),
           "variants": {}}
    for name in args.variants:
        precision, optim, options = VARIANTS[name]
        model = copy.deepcopy(base).train()
        if precision == "bf16":
            model.to(torch.bfloat16)
        optimizer = make_optimizer(model.parameters(), optim, lr=1e-3, betas=(0.9, 0.98), **options)
        lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
        losses, times = [], []
        for batch in order:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=pool_ids[batch], labels=pool_labels[batch], use_cache=False).loss
            loss.backward()
            optimizer.step()
            lr.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        out["variants"][name] = {"losses": losses, "final20_mean": statistics.mean(losses[-20:]),
                                 "step_time_median_s": statistics.median(times[5:]),
                                 "first_step_s": times[0],
                                 "bytes_per_kept": sparse_state_bytes_per_kept(model, optimizer)}
        print(name, round(out["variants"][name]["final20_mean"], 4), file=sys.stderr, flush=True)
    ref = out["variants"].get("fp32 adamw")
    if ref:
        smooth = lambda xs: [statistics.mean(xs[max(0, i - 9):i + 1]) for i in range(len(xs))]  # noqa: E731
        r = smooth(ref["losses"])
        for v in out["variants"].values():
            s = smooth(v["losses"])
            v["max_smoothed_gap_to_fp32"] = max(abs(a - b) for a, b in zip(s, r))
            v["max_relative_smoothed_gap_to_fp32"] = max(abs(a - b) / b for a, b in zip(s, r))
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
