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

import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

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
from .trainer import RecoverConfig, Trainer, TrainConfig, check_gradual_parallel, load_checkpoint, write_json

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
    # The demo's defaults (`make demo`): a tiny T5 from random init, one token per document.
    model_size: str = "tiny"
    dropout: float = 0.1  # T5's dropout_rate for a randomly initialised model
    docid_scheme: str = "atomic"
    encoder: str | None = "auto"  # semantic docids and the dense row: auto (MiniLM if installed) | lsa | PATH
    qg_model: str | None = None  # a local doc2query-style seq2seq checkpoint for pseudo-queries
    labels: str = "qrels"  # qrels | bm25 (the study's BM25 top-K)
    label_k: int = 5
    split: tuple = (0.7, 0.1, 0.2)
    train: TrainConfig = field(default_factory=TrainConfig)
    recover: TrainConfig = field(default_factory=RecoverConfig)
    prune: list = field(default_factory=lambda: [PruneSetting(0.2)])
    rescore_k: int = 1000
    seed: int = 0

    def __post_init__(self):
        # Checked here, before the baseline trains, not when its recovery phase starts.
        check_gradual_parallel(any(p.mode == "gradual" for p in self.prune), self.recover.parallel)


@dataclass
class Prepared:
    """What every phase of a run shares: the data, its splits, BM25's run (labels, baseline, the
    candidates that rescoring ranks) and the retrieval training labels."""
    data: DSIData
    splits: dict
    bm25_run: dict
    labels: list
    bm25_seconds: float


# ---- preparation -----------------------------------------------------------------------------------
def prepare(cfg: RunConfig) -> Prepared:
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
    return Prepared(data, splits, bm25_run, labels, bm25_seconds)


def training_examples(cfg: RunConfig, prep: Prepared, tokenizer, train_cfg: TrainConfig | None = None):
    """The training examples of a run: windows and pseudo-queries of every document, and the labelled
    training queries (examples.py). Pseudo-queries come from the document text only."""
    tc = train_cfg or cfg.train
    data, splits = prep.data, prep.splits
    generator = Seq2SeqQueryGenerator(cfg.qg_model, seed=cfg.seed) if cfg.qg_model else KeywordSpanGenerator(cfg.seed)
    queries = {q: data.queries[q] for q in splits["train"]}
    windows = {d.id: document_windows(d.contents, tokenizer, tc.index_tokens, tc.index_stride or None)
               for d in data.corpus}  # the same every epoch: cut once

    def make(draw: int):
        return make_examples(data.corpus, queries, prep.labels, tokenizer, tc.index_tokens, tc.index_ratio,
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


def validation_fn(tokenizer, mapping, prep: Prepared, cfg: RunConfig, train_cfg: TrainConfig):
    """A phase's validation: constrained beam search over the validation queries (train_cfg's beam and
    max_eval_queries)."""
    qids = prep.splits["validation"]
    if train_cfg.max_eval_queries:
        qids = qids[: train_cfg.max_eval_queries]

    def fn(model):
        r = evaluate_model(model, tokenizer, mapping, prep.data, qids, prep.bm25_run, train_cfg.eval_beam,
                           cfg.rescore_k, rescore_too=False)
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
    data, splits = prep.data, prep.splits
    tokenizer = load_or_train_tokenizer(cfg.tokenizer, [d.contents for d in data.corpus] +
                                        [data.queries[q] for q in splits["train"]],
                                        os.path.join(cfg.out_dir, "tokenizer"))
    report = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "phases": {}}
    encoder = resolve_encoder(cfg.encoder)
    doc_vectors = _reference_rows(cfg, prep, encoder, report)

    # dense baseline
    base_dir = os.path.join(cfg.out_dir, "baseline")
    if resume and os.path.isdir(os.path.join(base_dir, "last")):
        model, tokenizer, mapping = load_checkpoint(os.path.join(base_dir, "last"))
    else:
        mapping = build_docids(cfg.docid_scheme, data.corpus, tokenizer, seed=cfg.seed, vectors=doc_vectors)
        model = new_model(cfg, tokenizer)
    phases = Phases(cfg, prep, tokenizer, mapping, training_examples(cfg, prep, tokenizer), resume, progress)
    report["docids"] = {"scheme": mapping.scheme, "vectors": (_encoder_name(encoder) if encoder else "lsa")
                        if mapping.scheme == "semantic" else None}
    report["examples"] = {kind: sum(e.kind == kind for e in phases.examples) for kind in ("index", "pseudo", "query")}
    report["phases"]["baseline"], baseline_path = phases.train_and_evaluate("baseline", model, cfg.train, base_dir)
    # Free the dense model and its optimizer state before the recovery phases, so each phase's peak
    # memory is its own (recoveries reload the baseline from its checkpoint).
    del model
    gc.collect()

    for setting in cfg.prune:
        report["phases"][setting.name] = phases.prune_and_recover(setting, baseline_path)
    write_json(report, os.path.join(cfg.out_dir, "report.json"))
    with open(os.path.join(cfg.out_dir, "summary.md"), "w") as f:
        f.write(summary_table(report))
    plot_history(report, os.path.join(cfg.out_dir, "curves.png"))
    return report


def _reference_rows(cfg: RunConfig, prep: Prepared, encoder, report: dict):
    """BM25, zero-shot dense retrieval (with an encoder) and chance on the test queries, into `report`.
    Returns the encoder's document vectors (for semantic docids), or None."""
    data, test, beam = prep.data, prep.splits["test"], cfg.train.eval_beam
    report["bm25"] = evaluate_bm25(data, test, prep.bm25_run, beam, os.path.join(cfg.out_dir, "runs", "bm25.trec"))
    report["bm25"]["seconds"] = prep.bm25_seconds
    log.info("BM25 on %d test queries: %s", len(test), {k: round(v, 4) for k, v in report["bm25"].items()
                                                        if isinstance(v, float)})
    doc_vectors = None
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
    report["chance"] = evaluate_chance(data, test, beam, cfg.seed)
    return doc_vectors


@dataclass
class Phases:
    """The training phases of one run (the baseline, each recovery) and what they share."""
    cfg: RunConfig
    prep: Prepared
    tokenizer: object
    mapping: object
    examples: object  # a ResampledExamples (training_examples)
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        # The study's protocol beside the qrels: BM25's top label_k as the relevant set (rescoring).
        self.label_qrels = qrels_from_labels(labels_from_run(self.prep.bm25_run, self.cfg.label_k))

    def prune_and_recover(self, setting: PruneSetting, baseline_path: str) -> dict:
        out = os.path.join(self.cfg.out_dir, setting.name)
        recover_cfg = self.cfg.recover
        if setting.mode == "gradual":  # a resumed gradual phase keeps pruning where it stopped
            recover_cfg = replace(recover_cfg, gradual_final_sparsity=setting.sparsity, gradual_scope=setting.scope)
        if self.resume and os.path.isdir(os.path.join(out, "last")):
            model, _, _ = load_checkpoint(os.path.join(out, "last"))
        elif setting.mode == "gradual":
            model, _, _ = load_checkpoint(baseline_path)
        else:  # prune-at-load: the dense baseline is never held in this phase
            model, _, _ = load_checkpoint(baseline_path, sparsity=setting.sparsity, format=setting.format,
                                          scope=setting.scope)
        pruned = model_report(model)
        phase, _ = self.train_and_evaluate(setting.name, model, recover_cfg, out)
        phase["pruned"] = pruned
        phase["setting"] = asdict(setting)
        del model
        gc.collect()
        return phase

    def train_and_evaluate(self, name: str, model, train_cfg: TrainConfig, out_dir: str) -> tuple[dict, str]:
        """One phase: train (resuming from out_dir/last if asked), save, and evaluate on the test split.
        Returns the phase's report and the path of its last checkpoint."""
        cfg, prep, beam = self.cfg, self.prep, train_cfg.eval_beam
        trainer = Trainer(model, self.tokenizer, self.mapping, self.examples, train_cfg, out_dir,
                          validation_fn(self.tokenizer, self.mapping, prep, cfg, train_cfg), log=log.info,
                          progress=self.progress)
        if self.resume and os.path.isdir(os.path.join(out_dir, "last")):
            trainer.resume(os.path.join(out_dir, "last"))
        t0 = time.perf_counter()
        phase = trainer.train()
        phase["seconds"] = time.perf_counter() - t0
        path = trainer.save("last")
        phase["model"] = model_report(model, path)
        with gathered(model):  # a sharded (FSDP2) model: every rank decodes, its blocks gathering their shards
            phase["test"] = evaluate_model(model, self.tokenizer, self.mapping, prep.data, prep.splits["test"],
                                           prep.bm25_run, beam, cfg.rescore_k, self.label_qrels,
                                           os.path.join(cfg.out_dir, "runs", f"{name}.trec"))
        log.info("%s test: %s", name, {k: round(v, 4) for k, v in phase["test"].items() if isinstance(v, float)})
        return phase, path


def recover(cfg: RunConfig, checkpoint: str) -> dict:
    """`sparse-t5 dsi recover`: fine-tune a pruned checkpoint with cfg.recover (validating as a run's
    recovery does), save it to out_dir/recover/last, and evaluate it on the test split."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prep = prepare(cfg)
    model, tokenizer, mapping = load_checkpoint(checkpoint)
    phases = Phases(cfg, prep, tokenizer, mapping, training_examples(cfg, prep, tokenizer, cfg.recover))
    phase, _ = phases.train_and_evaluate("recover", model, cfg.recover, os.path.join(cfg.out_dir, "recover"))
    return phase


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str, device) -> dict:
    """`sparse-t5 dsi evaluate`: a checkpoint's metrics on the test split (beam and rescoring)."""
    prep = prepare(cfg)
    model, tokenizer, mapping = load_checkpoint(checkpoint)
    model.to(device)
    return evaluate_model(model, tokenizer, mapping, prep.data, prep.splits["test"], prep.bm25_run,
                          cfg.train.eval_beam, cfg.rescore_k,
                          run_path=os.path.join(cfg.out_dir, "runs", "evaluate.trec"))


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
