"""Quick start: prune a T5-base feed-forward layer to 90% and train it with values-only parameters.

Compares, on the same inputs, a dense nn.Linear and our SparseLinear: forward+backward time and
the bytes of weights + AdamW state (no dense copy of the sparse weight exists anywhere).
"""
import time

import torch
import torch.nn.functional as F

from sparse_t5 import SparseLinear, cpu_isa


def median_ms(fn, n=10):
    for _ in range(2):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main():
    torch.manual_seed(0)
    dense = torch.nn.Linear(768, 3072)  # t5-base FFN wi shape
    x = torch.randn(8, 64, 768)
    target = torch.randn(8, 64, 3072)
    mask = dense.weight.abs() >= dense.weight.abs().flatten().kthvalue(int(0.9 * dense.weight.numel())).values
    sparse = SparseLinear.from_dense(dense, mask)
    print(f"CPU kernels: {cpu_isa()} | {sparse}")

    for name, layer in (("dense", dense), ("sparse", sparse)):
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, betas=(0.9, 0.98))

        def step():
            opt.zero_grad()
            F.mse_loss(layer(x), target).backward()
            opt.step()

        ms = median_ms(step)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
        params = sum(p.numel() * p.element_size() for p in layer.parameters())
        buffers = sum(b.numel() * b.element_size() for b in layer.buffers())
        grads = sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters())
        print(f"{name:>6}: train step {ms:6.2f} ms | weights+index {(params + buffers) / 2**20:6.2f} MiB | "
              f"grads {grads / 2**20:6.2f} MiB | AdamW state {state / 2**20:6.2f} MiB")
    dense_weight = sparse.to_dense()
    assert torch.all(dense_weight[~mask] == 0), "pruned weights must stay zero"
    print("pruned positions are still exactly zero after training")


if __name__ == "__main__":
    main()
