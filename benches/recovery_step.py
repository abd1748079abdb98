"""One recovery fine-tuning variant, measured in its own process (run by test_bench_recovery.py).

    python benches/recovery_step.py --shape t5-small --variant csr:0.9 [--steps 5]

Variants: hf_dense (HF T5, dense), hf_mask (HF T5 + torch.nn.utils.prune global L1 at 0.2, the
seed study's approach), csr:<sparsity> and 2:4 (ours, loaded from a pruned checkpoint the way a
recovery run starts, so no dense weight ever exists in this process). Starting from a dense
checkpoint on disk (written once, HF's format): load_then_sparsify:csr:<s> (from_pretrained, then
sparsify: the dense model is the peak) and prune_at_load:csr:<s> (from_pretrained(sparsity=...):
each weight is pruned as it is read).

--whole-process keeps the peak of the whole process (loading included) instead of resetting it after
setup: the figure for "load a checkpoint, prune it, recover". --steps 0 measures the load alone.

Setup: random init, AdamW(betas 0.9, 0.98), batch 8, source 32 tokens, target 8 tokens. After the
model and optimizer exist, the process's peak-RSS mark is reset (/proc/self/clear_refs), so the
reported peak is the training peak with the model resident, not one-off construction costs. On
CUDA, torch.cuda.max_memory_allocated is reported instead. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from sparse_t5.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

SHAPES = {
    # name: d_model, d_ff, heads, d_kv, layers (encoder = decoder), vocab
    "t5-small": dict(d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=6, vocab_size=32128),
    "t5-base": dict(d_model=768, d_ff=3072, num_heads=12, d_kv=64, num_layers=12, vocab_size=32128),
    "t5-large": dict(d_model=1024, d_ff=4096, num_heads=16, d_kv=64, num_layers=24, vocab_size=32128),
    "tiny": dict(d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2, vocab_size=256),
    # Dense training cannot fit these on a 24 GB machine (16 B per parameter for weight, gradient and
    # AdamW's two moments: t5-3b 2.85B parameters, t5-11b 11.3B). Their dense checkpoints are written
    # tensor by tensor (STREAMED), never as a whole model.
    "t5-3b": dict(d_model=1024, d_ff=16384, num_heads=32, d_kv=128, num_layers=24, vocab_size=32128),
    "t5-11b": dict(d_model=1024, d_ff=65536, num_heads=128, d_kv=128, num_layers=24, vocab_size=32128),
    # google/flan-ul2's config (19.5B parameters): gated-gelu, untied lm_head, 32 + 32 layers.
    "ul2": dict(d_model=4096, d_ff=16384, num_heads=16, d_kv=256, num_layers=32, vocab_size=32128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
STREAMED = {"t5-3b", "t5-11b", "ul2"}
BATCH, SRC, TGT = 8, 32, 8
CACHE = os.environ.get("SPARSE_T5_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "sparse_t5_bench_ckpt"))


def config_for(shape):
    from transformers import T5Config

    return T5Config(**SHAPES[shape], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _checkpoint_once(path: str, shape: str, write: str) -> str:
    """Write a random-init checkpoint of `shape` to `path` once, in a child process (so no figure here
    includes building it). `write` is Python that writes `config`'s checkpoint to `path`."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        import subprocess

        code = (
            "import sys, torch; sys.path.insert(0, %r)\n"
            "from recovery_step import config_for\n"
            "from sparse_t5 import SparseT5ForConditionalGeneration\n"
            "from transformers import T5ForConditionalGeneration\n"
            "torch.manual_seed(0)\n"
            "config, path = config_for(%r), %r\n"
            "%s\n" % (os.path.dirname(os.path.abspath(__file__)), shape, path, write)
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def sparse_checkpoint(shape: str, variant: str, scope: str = "global") -> str:
    """Path of a pruned checkpoint of `shape` for `variant` (CSR: pruned at `scope`)."""
    prune = "m.sparsify(format='2:4')" if variant == "2:4" else f"m.sparsify({float(variant.split(':')[1])}, scope={scope!r})"
    name = variant.replace(':', '_') + ("" if variant == "2:4" or scope == "global" else f"_{scope}")
    return _checkpoint_once(os.path.join(CACHE, f"{shape}-{name}"), shape,
                            f"m = SparseT5ForConditionalGeneration(config)\n{prune}\nm.save_pretrained(path)")


def dense_checkpoint(shape: str, dtype: str = "fp32") -> str:
    """Path of a dense HF checkpoint of `shape` (random init, safetensors, as transformers writes it).
    STREAMED shapes: HF's initialisation scale and sharded layout (model.safetensors.index.json, 2 GB
    shards), in `dtype` (fp32 or bf16: the UL2 shape is 39 GB in bf16, 78 in fp32), written one module
    at a time (sparse_t5.modeling_t5.random_init_tensors into sparse_t5.checkpoint.write_sharded), so
    the dense model is never held."""
    path = os.path.join(CACHE, f"{shape}-dense" + ("" if dtype == "fp32" else f"-{dtype}"))
    if shape in STREAMED:
        return _checkpoint_once(path, shape, "from sparse_t5.checkpoint import write_sharded\n"
                                "from sparse_t5.modeling_t5 import random_init_tensors\n"
                                "config.save_pretrained(path)\n"
                                f"write_sharded(path, random_init_tensors(config, {TORCH_DTYPES[dtype]}))")
    if dtype != "fp32":
        raise ValueError(f"--checkpoint-dtype {dtype} is for the streamed shapes ({', '.join(sorted(STREAMED))})")
    return _checkpoint_once(path, shape, "T5ForConditionalGeneration(config).save_pretrained(path)")


TORCH_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}


def build(shape: str, variant: str, scope: str = "global", checkpoint_dtype: str = "fp32", dtype=None):
    """The model of `variant`; ours load in `dtype` (None: the checkpoint's float32 default), so a bf16
    run never holds an fp32 copy of a weight."""
    if variant in ("hf_dense", "hf_mask"):
        from transformers import T5ForConditionalGeneration

        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config_for(shape))
        if variant == "hf_mask":
            import torch.nn.utils.prune as prune

            from sparse_t5.pruning import select_targets

            targets = [(m, "weight") for m in select_targets(model).values()]
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.2)
        return model
    from sparse_t5 import SparseT5ForConditionalGeneration

    if variant.startswith(("prune_at_load:", "load_then_sparsify:")):
        how, _, sparsity = variant.split(":")
        path = dense_checkpoint(shape, checkpoint_dtype)
        if how == "prune_at_load":
            return SparseT5ForConditionalGeneration.from_pretrained(path, sparsity=float(sparsity), scope=scope,
                                                                    dtype=dtype)
        model = SparseT5ForConditionalGeneration.from_pretrained(path, dtype=dtype)
        model.sparsify(float(sparsity), scope=scope)
        return model
    return SparseT5ForConditionalGeneration.from_pretrained(sparse_checkpoint(shape, variant, scope), dtype=dtype)


def state_bytes(model, optimizer) -> dict:
    """Bytes of parameters, grads, optimizer state and buffers, split into sparse layers and the rest."""
    from sparse_t5 import SparseLinear

    sparse_ids, nnz, dense_size = set(), 0, 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            sparse_ids |= {id(t) for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
            nnz += m.nnz
            dense_size += m.in_features * m.out_features
    from sparse_t5.optim import tensor_bytes

    out = {k: 0 for k in ("sparse_params", "sparse_grads", "sparse_optimizer", "sparse_index",
                          "other_params", "other_grads", "other_optimizer", "other_buffers")}
    out["other_numel"] = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        side = "sparse" if id(p) in sparse_ids else "other"
        out[f"{side}_params"] += p.numel() * p.element_size()
        if side == "other":
            out["other_numel"] += p.numel()
        if p.grad is not None:
            out[f"{side}_grads"] += p.grad.numel() * p.grad.element_size()
        for key, t in optimizer.state.get(p, {}).items():
            if torch.is_tensor(t) and key != "step":  # quantized moments: their codes and scales
                out[f"{side}_optimizer"] += tensor_bytes(t)
    for b in model.buffers():
        if id(b) in seen:
            continue
        seen.add(id(b))
        key = "sparse_index" if id(b) in sparse_ids else "other_buffers"
        out[key] += b.numel() * b.element_size()
    sparse_total = sum(v for k, v in out.items() if k.startswith("sparse"))
    other_total = sum(v for k, v in out.items() if k.startswith("other") and k != "other_numel")
    out.update(sparse_total=sparse_total, other_total=other_total,
               sparse_bytes_per_nnz_parts={k[len("sparse_"):]: out[k] / nnz for k in
                                           ("sparse_params", "sparse_grads", "sparse_optimizer", "sparse_index")}
               if nnz else None,
               sparse_nnz=nnz, sparse_dense_size=dense_size,
               sparse_bytes_per_nnz=(sparse_total / nnz) if nnz else None)
    return out


def density_by_kind(model) -> dict:
    """Kept fraction of each kind of sparse layer (encoder and decoder together): self-attention q, k,
    v, o; cross-attention q, k, v, o; feed-forward wi (wi_0, wi_1 when gated) and wo. Global scope
    prunes them unevenly (their init scales differ); layer scope keeps each at 1 - sparsity."""
    from sparse_t5 import SparseLinear

    kept, total = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            parts = name.split(".")
            where = {"SelfAttention": "self", "EncDecAttention": "cross", "DenseReluDense": "ff"}
            kind = next((where[p] for p in parts if p in where), "other") + "." + parts[-1]
            kept[kind] = kept.get(kind, 0) + m.nnz
            total[kind] = total.get(kind, 0) + m.in_features * m.out_features
    return {kind: kept[kind] / total[kind] for kind in sorted(kept)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--variant", required=True, help="hf_dense | hf_mask | csr:<sparsity> | 2:4 | "
                        "prune_at_load:csr:<sparsity> | load_then_sparsify:csr:<sparsity>")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up step); "
                        "0: load only")
    parser.add_argument("--whole-process", action="store_true", help="peak RSS of the whole process, load included")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--policy", default=None, choices=["auto", "sparse", "dense"],
                        help="sparse_t5.kernel_policy for the ops (default: the process's, auto)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (GPU: peak = torch.cuda.max_memory_allocated)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--source", type=int, default=SRC)
    parser.add_argument("--target", type=int, default=TGT)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-mixed"],
                        help="bf16: the model loads in bf16 (weights and gradients; loss and softmax fp32); "
                        "bf16-mixed: fp32 weights under bf16 autocast")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bf16-mixed",
                        help="the same as --precision bf16-mixed")
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit", "adamw4bit"],
                        help="sparse_t5.optim: torch's AdamW, or torchao's 8-/4-bit AdamW (with --precision bf16, "
                        "stochastic rounding unless --master-weights)")
    parser.add_argument("--step-in-backward", action="store_true",
                        help="sparse_t5.optim.step_in_backward: update each parameter as its gradient completes "
                        "and free it, so no step holds all the gradients (the optimizer's time is then inside "
                        "backward: optimizer_step_median_s is not reported)")
    parser.add_argument("--master-weights", action="store_true", help="low-bit optimizer on bf16: an fp32 master copy")
    parser.add_argument("--checkpoint-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="dtype of the dense checkpoint written for the streamed shapes (prune_at_load variants)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="model.gradient_checkpointing_enable(): recompute each block's activations in backward")
    parser.add_argument("--adamw", default="default", choices=["default", "for-loop", "foreach", "fused"],
                        help="AdamW implementation (default: torch's choice for the device; on CPU that is the "
                        "for-loop; foreach keeps whole-list temporaries)")
    parser.add_argument("--scope", default="global", choices=["global", "layer"],
                        help="pruning scope of csr:<s> and prune_at_load/load_then_sparsify variants")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more step (torch.profiler) and report where its time goes: the "
                        "sparse ops, the dense ones, AdamW, by operator")
    parser.add_argument("--round-trip", metavar="DIR", default=None,
                        help="after the steps (ours only): save_pretrained to DIR (compressed), reload, and compare "
                        "greedy ids and eval logits before and after; reports the checkpoint's size on disk")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.policy:
        from sparse_t5 import set_kernel_policy

        set_kernel_policy(args.policy)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.variant.startswith(("prune_at_load:", "load_then_sparsify:")):
        dense_checkpoint(args.shape, args.checkpoint_dtype)  # written by a child before anything is measured
    baseline_rss = current_rss_bytes()
    reset_peak_rss()
    t_load = time.perf_counter()
    model = build(args.shape, args.variant, args.scope, args.checkpoint_dtype,
                  torch.bfloat16 if args.precision == "bf16" else None)
    if args.precision == "bf16":
        model.to(torch.bfloat16)  # the HF baselines, built in fp32 (ours loaded in bf16 already)
    load_s = time.perf_counter() - t_load
    load_peak = peak_rss_bytes()
    largest_tensor = max(t.numel() * t.element_size() for t in model.state_dict().values())
    if args.variant.startswith(("prune_at_load:", "load_then_sparsify:")):
        from sparse_t5.checkpoint import CheckpointReader

        with CheckpointReader(dense_checkpoint(args.shape, args.checkpoint_dtype)) as reader:  # the header only
            itemsize = 2 if args.checkpoint_dtype == "bf16" else 4
            largest_tensor = max(largest_tensor, max(torch.Size(s).numel() * itemsize for s in reader.shapes.values()))
    model.to(device).train()
    if args.gradient_checkpointing:  # transformers 5.x renamed it (the old name warns)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    from sparse_t5.optim import make_optimizer

    impl = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    low_bit_bf16 = args.optim != "adamw" and args.precision == "bf16"
    optimizer = make_optimizer(model.parameters(), args.optim, lr=1e-4, betas=(0.9, 0.98),
                               bf16_stochastic_round=low_bit_bf16 and not args.master_weights,
                               master_weights=args.master_weights, **(impl[args.adamw] if args.optim == "adamw" else {}))
    in_backward = None
    if args.step_in_backward:
        from sparse_t5.optim import step_in_backward

        in_backward = step_in_backward(optimizer)
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(2, vocab, (args.batch, args.source), generator=g).to(device)
    labels = torch.randint(2, vocab, (args.batch, args.target), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    loaded_rss = current_rss_bytes()
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                               list(model.parameters()) + list(model.buffers())}.values())
    load_info = {"load_peak_rss_bytes": load_peak, "load_seconds": load_s, "model_bytes": model_bytes,
                 "largest_tensor_bytes": largest_tensor, "whole_process": args.whole_process}
    if args.steps == 0:
        json.dump({"shape": args.shape, "variant": args.variant, "rss_after_import_bytes": baseline_rss,
                   **load_info}, sys.stdout)
        return
    peak_reset = False if args.whole_process else reset_peak_rss()

    optimizer_s = []

    def step():
        # The same dropout masks every step: on the same batch the loss is then a function of the
        # weights alone, so "the loss falls" checks the update, not dropout's draw (which moved it by
        # about 0.1 at t5-11b, as much as one step does).
        torch.manual_seed(2)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        t0 = time.perf_counter()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        optimizer_s.append(time.perf_counter() - t0)
        return loss.item()  # synchronises a GPU: the step's work is inside the timing

    losses = [step()]  # warm-up: allocates grads and optimizer state
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    result = {
        "shape": args.shape, "variant": args.variant, "threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_reset_after_setup": peak_reset,
        "rss_after_import_bytes": baseline_rss, "rss_after_setup_bytes": loaded_rss,
        "step_time_median_s": statistics.median(times), "step_times_s": times, **load_info,
        "policy": args.policy or "auto", "device": str(device), "batch": args.batch, "source": args.source,
        "target": args.target, "precision": args.precision, "bf16": args.precision == "bf16-mixed",
        "optim": args.optim, "master_weights": args.master_weights, "checkpoint_dtype": args.checkpoint_dtype,
        "gradient_checkpointing": args.gradient_checkpointing, "adamw": args.adamw, "scope": args.scope,
        "losses": losses,
        "optimizer_step_median_s": None if in_backward else statistics.median(optimizer_s[1:]),
        "step_in_backward": bool(in_backward),
        "largest_grad_bytes": in_backward.largest_grad_bytes if in_backward else None,
    }
    if cuda:
        result.update(gpu=torch.cuda.get_device_name(device),
                      cuda_max_memory_allocated_bytes=torch.cuda.max_memory_allocated(device))
    if args.profile:
        result["profile"] = profile_step(step)
    result.update(state_bytes(model, optimizer))
    result["density_by_kind"] = density_by_kind(model)
    if args.round_trip:
        # Training is over: free its state first, or the reloaded copy comes on top of the gradients
        # and moments (at the UL2 shape, 8 GB more than the machine has).
        optimizer.state.clear()
        model.zero_grad(set_to_none=True)
        result.update(round_trip(model, ids[:2], args.round_trip))
    json.dump(result, sys.stdout)


def profile_step(step, top: int = 12) -> dict:
    """One step under torch.profiler: total self CPU time, the share of the sparse_t5 ops (forward and
    backward), and the top operators by self time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ours = sum(e.self_cpu_time_total for e in events if "sparse_t5" in e.key)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return {"self_cpu_ms": total / 1e3, "sparse_t5_ops_share": ours / total if total else 0.0,
            "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 for e in events[:top]}}


def round_trip(model, ids, directory) -> dict:
    """Save the recovered model compressed, reload it, and check that it is the same model: identical
    eval logits and greedy ids."""
    from sparse_t5 import SparseT5ForConditionalGeneration

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        before = model.generate(input_ids=ids, max_new_tokens=4, suppress_tokens=[0, 1])  # not just pad/eos
    t0 = time.perf_counter()
    model.save_pretrained(directory)
    save_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    t0 = time.perf_counter()
    dtype = next(model.parameters()).dtype  # a bf16 model reloads in bf16 (the default would be fp32)
    reloaded = SparseT5ForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(ids.device)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        same_logits = torch.equal(reloaded(input_ids=ids, decoder_input_ids=ids[:, :4]).logits, logits)
        same_ids = torch.equal(reloaded.generate(input_ids=ids, max_new_tokens=4, suppress_tokens=[0, 1]), before)
    return {"round_trip_checkpoint_bytes": size, "round_trip_save_s": save_s, "round_trip_load_s": load_s,
            "round_trip_same_logits": same_logits, "round_trip_same_ids": same_ids,
            "round_trip_ids": before.tolist(), "peak_rss_after_round_trip_bytes": peak_rss_bytes()}


if __name__ == "__main__":
    main()
