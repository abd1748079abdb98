"""The DSI trainer: train (dense) -> prune -> recover (sparse values only) -> evaluate.

Multi-task training as in DSI: indexing examples (every window of a document and its
pseudo-queries -> its docid) and retrieval examples (a training query -> a docid: its qrels, or,
with labels="bm25", its BM25 top-K as in the pruning study), mixed `index_ratio` indexing examples
per retrieval example (examples.py).

Determinism: the data order of epoch e is a permutation drawn from seed + e, so a run and a
resumed run see the same batches. Checkpoints (every `save_every` steps and at each epoch end)
hold the model, the optimizer, the scheduler, the RNG states and the position in the epoch; each
is written to a temporary directory and renamed, so a crash never leaves a partial checkpoint.
Devices: `device` ("auto": CUDA when available) holds the model, every batch and decoding;
precision "bf16" casts the model to bf16 there (weights and gradients; "bf16-mixed" is autocast over
fp32 weights); `optim` picks AdamW or torchao's 8-/4-bit AdamW (sparse_t5.optim); on CUDA the phase report adds peak GPU memory
(torch.cuda.max_memory_allocated) beside peak RSS. Checkpoints are device-free (tensors saved from
the CPU), so a run saved on a GPU resumes on a CPU and the reverse.
Distributed: under torchrun (`sparse_t5.distributed.init_distributed`) the model is wrapped in DistributedDataParallel
(nccl on GPUs, one per LOCAL_RANK; gloo on CPU); each rank takes every world_size-th example of the
same global order, and the sparse `values` are ordinary parameters, so gradients are all-reduced
like any other. With parallel="fsdp" the model is sharded with FSDP2 instead
(sparse_t5.distributed.shard_model): each rank holds half (1/world) of the values, their gradients
and AdamW's moments, for a model that does not fit one device even sparse. Checkpoints are gathered
and written whole by rank 0, in the same layout as an unsharded run's, so a run saved sharded resumes
in one process and the reverse. Validation runs on every rank (the blocks gather their shards in
their forward), and rank 0's metrics decide best checkpoint and early stopping on every rank.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..checkpoint import atomic_dir, atomic_write, load_weights_only
from ..devices import resolve_device
from ..memory import peak_rss_bytes, reset_peak_rss
from ..modeling_t5 import SparseT5ForConditionalGeneration
from ..optim import OPTIMIZERS, make_optimizer
from .docids import DocidMapping
from .examples import Example


def check_gradual_parallel(gradual: bool, parallel: str) -> None:
    """The one check that gradual pruning and FSDP2 are not combined (TrainConfig and RunConfig call it)."""
    if gradual and parallel == "fsdp":
        raise ValueError("gradual pruning cannot run with FSDP2 (--fsdp, parallel='fsdp'): it rebuilds the sparse "
                         "layers during recovery, which the sharded parameters cannot follow; prune one-shot "
                         "(prune-at-load) and recover")


PRECISIONS = ("fp32", "bf16", "bf16-mixed")


@dataclass
class TrainConfig:
    """One training phase's settings. The defaults are the demo's recipe for the dense baseline
    (`make demo`), chosen by measurement on the embedded dataset with benches/dsi_recipe.py so that the
    demo fits about 15 minutes on 2 CPU cores (README "DSI"); RecoverConfig holds the recovery's. The
    CLI takes its defaults from here."""

    # The learning rate warms up linearly over the first quarter of the steps to 2e-3, then decays
    # linearly to 0. From random init the model first sits at uniform docids (train loss ~2.85); a low
    # rate leaves that plateau sooner and a high one learns faster after it, which the long warm-up
    # gives both. Measured with benches/dsi_recipe.py (test Hits@1 / Hits@10 after 100 epochs): decay
    # from 1e-3 without warm-up 0.593 / 0.856; warm-up over 25 epochs to 2e-3 0.805 / 0.966. Constant
    # 5e-4 left the plateau by epoch 15 where 1e-3 needed 20, 2e-3 after a 5-epoch warm-up 30, and 3e-3
    # without warm-up never did.
    epochs: int = 100
    batch_size: int = 32
    lr: float = 2e-3
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "linear"  # constant | linear (warm-up then linear decay)
    warmup_steps: int = 0
    # Warm-up as a fraction of all steps (HF's warmup_ratio); the longer of the two applies.
    warmup_ratio: float = 0.25
    grad_accum: int = 1
    # fp32; bf16: the weights (sparse values and dense parts) and their gradients in bf16, the index
    # unchanged, the loss and softmax in fp32; bf16-mixed: fp32 weights under bf16 autocast.
    precision: str = "fp32"
    # adamw (torch) | adamw8bit | adamw4bit (torchao's, block-aligned for our values: sparse_t5.optim).
    optim: str = "adamw"
    # With bf16 weights and a low-bit optimizer, how an update smaller than half a bf16 ulp survives:
    # stochastic rounding (False) or an fp32 master copy (True, 4 B per weight more). README, "Bigger models".
    master_weights: bool = False
    index_ratio: float = 4.0  # indexing examples (windows, pseudo-queries) per retrieval example
    index_tokens: int = 64  # tokens per document window
    index_stride: int = 0  # tokens between window starts; 0: index_tokens (no overlap)
    pseudo_queries: int = 20  # per document, generated from its text (examples.py)
    resample_pseudo_queries: bool = True  # a fresh draw each epoch where the generator is cheap (examples.py)
    group_by_length: bool = True  # steps of similar-length inputs (_epoch_order)
    max_query_len: int = 64
    seed: int = 0
    save_every: int = 0  # steps; 0: only at epoch ends
    early_stopping_patience: int = 0  # validated epochs without improvement; 0: off (the study's: infinity)
    # Validate after every eval_every-th epoch and after the last. Constrained beam search over the
    # validation queries (about 7 s) is a quarter of a tiny model's epoch, so the demo validates every
    # 10th epoch. It only reports progress and keeps "best": the test figures are the last epoch's.
    eval_every: int = 10
    eval_beam: int = 10
    max_eval_queries: int = 0  # 0: all
    # gradual pruning during this phase (recovery): target sparsity reached at the end
    gradual_final_sparsity: float = 0.0
    gradual_format: str = "csr"
    gradual_scope: str = "global"
    gradual_frequency: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"  # ddp | fsdp: how several processes (torchrun) share the model

    def __post_init__(self):
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.master_weights and (self.optim == "adamw" or self.precision != "bf16"):
            raise ValueError("master_weights keeps an fp32 copy of bf16 weights for a low-bit optimizer: it needs "
                             f"precision='bf16' and optim adamw8bit or adamw4bit, got {self.precision!r} and {self.optim!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 0:
            raise ValueError("batch_size and grad_accum must be >= 1 and epochs >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1) (a fraction of all steps), got {self.warmup_ratio}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        check_gradual_parallel(self.gradual_final_sparsity > 0, self.parallel)
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 (epochs between validations), got {self.eval_every}")


@dataclass
class RecoverConfig(TrainConfig):
    """A recovery phase: the baseline's schedule over 20 epochs, peaking at 3e-3. Measured from an
    earlier, weaker baseline (test Hits@1 / Hits@10 at 0.9, one-shot pruning, no warm-up): 10 epochs
    at 1e-3 gave 0.153 / 0.492, gradual pruning over 20 epochs at 1e-3 0.398 / 0.771, and 20 epochs at
    3e-3 0.559 / 0.831."""

    epochs: int = 20
    lr: float = 3e-3


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """One training phase (train or recover) of `model` on `examples`, with checkpoints in `out_dir`."""

    def __init__(self, model: SparseT5ForConditionalGeneration, tokenizer, mapping: DocidMapping,
                 examples: list[Example], config: TrainConfig, out_dir: str, evaluate_fn=None,
                 log=print, progress: bool = True):
        self.model, self.tokenizer, self.mapping = model, tokenizer, mapping
        # A list, or a ResampledExamples whose pseudo-queries are drawn afresh each epoch (examples.py).
        self.example_source, self.config, self.out_dir = examples, config, out_dir
        self.examples = examples.for_epoch(0) if hasattr(examples, "for_epoch") else examples
        self.evaluate_fn = evaluate_fn  # model -> {"loss": ..., metrics...} on the validation split
        self.log, self.progress = log, progress
        self.rank, self.world = _rank_world()
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        if config.precision == "bf16":
            self.model.to(torch.bfloat16)
        torch.manual_seed(config.seed)
        self.ddp = None
        self.fsdp = self.world > 1 and config.parallel == "fsdp"
        if self.fsdp:
            from ..distributed import shard_model

            shard_model(self.model)  # in place: the optimizer below is built over the shards
        elif self.world > 1:
            self.ddp = self._wrap_ddp()
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = math.ceil(len(self.examples) / (config.batch_size * self.world * config.grad_accum))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.pruner = None
        if config.gradual_final_sparsity > 0:
            from ..pruning import GradualPruner

            total = self.steps_per_epoch * config.epochs
            self.pruner = GradualPruner(model, config.gradual_final_sparsity, start_step=0,
                                        end_step=max(1, int(total * 0.75)), frequency=config.gradual_frequency,
                                        scope=config.gradual_scope, format=config.gradual_format)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None,
                      "epochs_without_improvement": 0}

    # ---- setup -------------------------------------------------------------------------------------
    def _wrap_ddp(self):
        # No buffer broadcast: the only buffers are the sparse structure (row_ptr, col_idx, meta), equal
        # on every rank by construction and fixed during training; gloo cannot broadcast int16 anyway.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

    def _make_optimizer(self):
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        low_bit_bf16 = c.optim != "adamw" and c.precision == "bf16"
        return make_optimizer(params, c.optim, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
                              bf16_stochastic_round=low_bit_bf16 and not c.master_weights,
                              master_weights=c.master_weights)

    @property
    def warmup_steps(self) -> int:
        c = self.config
        return max(c.warmup_steps, math.ceil(c.warmup_ratio * self.steps_per_epoch * c.epochs))

    def _lr_lambda(self, step):
        c, warmup = self.config, self.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        if c.schedule == "constant":
            return 1.0
        total = max(1, self.steps_per_epoch * c.epochs)
        return max(0.0, (total - step) / max(1, total - warmup))

    def _epoch_order(self, epoch: int) -> list[int]:
        """A seeded shuffle of the examples. With group_by_length (HF Trainer's name for it), each
        run of 50 steps' examples is sorted by length and cut into steps, and the steps are shuffled
        again: a step's inputs then have similar lengths, so a 64-token window no longer pads 31 short
        queries to 64 tokens. On the embedded dataset this cut the padded tokens per epoch about 3x."""
        rng = random.Random(self.config.seed * 1000003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        if not self.config.group_by_length:
            return order
        per_step = self.config.batch_size * self.world * self.config.grad_accum
        lengths = self._lengths()
        steps = []
        for start in range(0, len(order), 50 * per_step):
            group = sorted(order[start:start + 50 * per_step], key=lambda i: lengths[i])
            steps += [group[i:i + per_step] for i in range(0, len(group), per_step)]
        last = steps.pop() if len(steps[-1]) < per_step else []  # a partial step stays last: the
        rng.shuffle(steps)                                         # loop slices the order per_step at a time
        return [i for step in steps for i in step] + last

    def _use_epoch_examples(self, epoch: int) -> None:
        if hasattr(self.example_source, "for_epoch"):
            examples = self.example_source.for_epoch(epoch)
            if examples is not self.examples:
                if len(examples) != len(self.examples):  # make_examples guarantees it; the schedule needs it
                    raise ValueError(f"epoch {epoch} has {len(examples)} examples, epoch 0 had {len(self.examples)}")
                self.examples, self._example_lengths = examples, None

    def _lengths(self) -> list[int]:
        if getattr(self, "_example_lengths", None) is None:
            self._example_lengths = [len(ids) for ids in self.tokenizer([e.text for e in self.examples],
                                                                        add_special_tokens=False).input_ids]
        return self._example_lengths

    def _batch(self, items: list[Example]):
        enc = self.tokenizer([e.text for e in items], return_tensors="pt", padding=True, truncation=True,
                             max_length=max(self.config.max_query_len, self.config.index_tokens))
        seqs = [self.mapping.sequences[e.docid] for e in items]
        width = max(len(s) for s in seqs)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            labels[i, : len(s)] = torch.tensor(s)
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return move(enc.input_ids), move(enc.attention_mask), move(labels)

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self, name: str) -> str:
        """Write the model, tokenizer, docids and training state to out_dir/name (rank 0; under FSDP every
        rank must call it, since the shards are gathered first)."""
        from ..distributed import full_optimizer_state, full_state_dict

        path = os.path.join(self.out_dir, name)
        weights = full_state_dict(self.model) if self.fsdp else None
        optimizer_state = full_optimizer_state(self.model, self.optimizer) if self.fsdp or self.rank == 0 else None
        if self.rank != 0:
            return path

        def write(tmp):
            self.model.save_pretrained(tmp, state_dict=weights)
            self.tokenizer.save_pretrained(tmp)
            self.mapping.save(os.path.join(tmp, "docids.json"))
            torch.save({"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                        "state": self.state, "config": asdict(self.config),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                        "pruner_history": self.pruner.history if self.pruner else None},
                       os.path.join(tmp, "trainer_state.pt"))

        atomic_dir(path, write)
        return path

    def resume(self, path: str) -> None:
        """Continue from a checkpoint written by `save` (the model must already hold its weights)."""
        state_file = os.path.join(path, "trainer_state.pt")
        if not os.path.isfile(state_file):
            raise ValueError(f"not a trainer checkpoint (no trainer_state.pt): {path}")
        # Tensors and plain containers only, never an unpickled object (a crafted checkpoint could
        # otherwise run code on resume; CVE-2026-1839 was this flaw in transformers' Trainer).
        blob = load_weights_only(state_file, "trainer checkpoint")
        # The optimizer must track the checkpoint's parameters (sparse layers may have been rebuilt).
        from ..distributed import load_full_optimizer_state

        self.optimizer = self._make_optimizer()
        load_full_optimizer_state(self.model, self.optimizer, blob["optimizer"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scheduler.load_state_dict(blob["scheduler"])
        self.state = blob["state"]
        torch.set_rng_state(blob["torch_rng"])
        cuda_rng = blob.get("cuda_rng") or []
        if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)  # a CPU checkpoint resumed on a GPU starts its CUDA RNG fresh
        random.setstate(blob["python_rng"])
        if self.pruner is not None and blob.get("pruner_history"):
            self.pruner.history = blob["pruner_history"]

    def model_state_bytes(self) -> dict:
        """Bytes of what training keeps per model: weights (parameters and the sparse structure
        buffers), gradients (one per trainable parameter) and optimizer state (AdamW's moments). With a
        small model, process RSS is mostly interpreter and libraries; this is the part sparsity changes."""
        from ..distributed import local_bytes as size  # this rank's shard of a sharded (FSDP2) tensor

        weights = sum(size(p) for p in self.model.parameters()) + sum(size(b) for b in self.model.buffers())
        grads = sum(size(p) for p in self.model.parameters() if p.requires_grad)
        optim = sum(size(v) for st in self.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.dim() > 0)
        return {"weights": weights, "gradients": grads, "optimizer": optim, "total": weights + grads + optim}

    def _validate(self) -> dict:
        """evaluate_fn's metrics, equal on every rank (so that best checkpoint and early stopping agree)."""
        from ..distributed import gathered

        metrics = None
        if self.fsdp:  # a collective: every rank runs the same decoding
            with gathered(self.model):
                metrics = self.evaluate_fn(self.model)
        elif self.rank == 0:
            metrics = self.evaluate_fn(self.model)
        if self.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self, stop_after_steps: int | None = None) -> dict:
        """Run the remaining epochs. `stop_after_steps` ends early (used to simulate a kill in tests)."""
        from tqdm.auto import tqdm

        c = self.config
        steps_done_now = 0
        step_times = []
        reset_peak_rss()
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.state["epoch"] < c.epochs:
            epoch = self.state["epoch"]
            self._use_epoch_examples(epoch)
            order = self._epoch_order(epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.state["step_in_epoch"], desc=f"epoch {epoch + 1}",
                       disable=(None if self.progress else True) if self.rank == 0 else True, leave=False)
            losses, epoch_times = [], []
            self.model.train()
            for step in range(self.state["step_in_epoch"], self.steps_per_epoch):
                t0 = time.perf_counter()
                step_loss = self._step(order, step)
                if on_gpu:  # step time is the GPU's work, not the launch queue's
                    torch.cuda.synchronize(self.device)
                losses.append(step_loss)
                epoch_times.append(time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
                steps_done_now += 1
                if c.save_every and self.state["global_step"] % c.save_every == 0:
                    self.save("last")
                if stop_after_steps is not None and steps_done_now >= stop_after_steps:
                    bar.close()
                    return {"stopped": True}
            bar.close()
            step_times += epoch_times
            if self._end_epoch(epoch, losses, epoch_times):
                break
        result = {"history": self.state["history"], "peak_rss_bytes": peak_rss_bytes(),
                  "step_time_s": _median(step_times), "device": str(self.device),
                  "model_state_bytes": self.model_state_bytes()}
        if on_gpu:
            result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
            result["gpu_name"] = torch.cuda.get_device_name(self.device)
        return result

    def _step(self, order: list[int], step: int) -> float:
        """One optimizer step over order's step-th slice (grad_accum micro-batches, this rank's share of
        each); returns the step's mean loss over all ranks."""
        c = self.config
        module = self.ddp or self.model
        per_step = c.batch_size * self.world * c.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        chunk = order[step * per_step:(step + 1) * per_step]
        step_loss = 0.0
        for micro in range(c.grad_accum):
            part = chunk[micro * c.batch_size * self.world:(micro + 1) * c.batch_size * self.world]
            mine = part[self.rank::self.world]
            if not mine:
                continue
            ids, mask, labels = self._batch([self.examples[i] for i in mine])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.precision == "bf16-mixed"):
                loss = module(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            (loss * len(mine) / max(1, len(chunk))).backward()
            step_loss += loss.item() * len(mine)
        if self.world > 1:
            total = torch.tensor([step_loss, float(len(chunk[self.rank::self.world]))], device=self.device)
            dist.all_reduce(total)
            step_loss = (total[0] / total[1]).item()
        else:
            step_loss /= max(1, len(chunk))
        self.optimizer.step()
        self.scheduler.step()
        self.state["global_step"] += 1
        self.state["step_in_epoch"] = step + 1
        if self.pruner is not None and self.pruner.step(self.state["global_step"], self.optimizer) is not None:
            if self.ddp is not None:  # parameters changed: DDP must see the new ones
                self.ddp = self._wrap_ddp()
        return step_loss

    def _end_epoch(self, epoch: int, losses: list[float], step_times: list[float]) -> bool:
        """Validate (every eval_every-th epoch), record, checkpoint; True when early stopping ends training."""
        c = self.config
        record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(1, len(losses)),
                  "step_time_s": _median(step_times)}
        # Without a validation function, every epoch is judged by its training loss.
        validated = self.evaluate_fn is None or (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs
        if self.evaluate_fn is not None and validated:
            record.update(self._validate())
        self.state["history"].append(record)
        self.state["epoch"] = epoch + 1
        self.state["step_in_epoch"] = 0
        self.log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if validated:  # best and patience count validated epochs only
            key = record.get("Hits@10", -record["train_loss"])
            if self.state["best"] is None or key > self.state["best"]:
                self.state["best"] = key
                self.state["epochs_without_improvement"] = 0
                self.save("best")
            else:
                self.state["epochs_without_improvement"] += 1
        self.save("last")
        if c.early_stopping_patience and self.state["epochs_without_improvement"] >= c.early_stopping_patience:
            self.log(f"early stopping after epoch {epoch + 1}")
            return True
        return False


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def load_checkpoint(path: str, **prune_at_load):
    """(model, tokenizer, mapping) from a checkpoint directory written by the trainer. `prune_at_load`
    (sparsity=, format=, scope=, ...) prunes the weights as they are read (from_pretrained)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory not found: {path}")
    model = SparseT5ForConditionalGeneration.from_pretrained(path, **prune_at_load)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    mapping = DocidMapping.load(os.path.join(path, "docids.json"))
    return model, tokenizer, mapping


def write_json(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)

    atomic_write(path, write)
