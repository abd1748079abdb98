"""sparse-t5 command line: `sparse-t5 dsi {run,train,prune,recover,evaluate,bm25} --help` and `sparse-t5 tune --help`."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_OUT = "runs/dsi"


def _sparsity(text: str) -> float:
    from .pruning import check_sparsity

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    try:
        return check_sparsity(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _prune_setting(text: str):
    from .dsi.pipeline import PruneSetting

    try:
        return PruneSetting.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"directory not found: {text}")
    return text


def add_data_args(p):
    g = p.add_argument_group("data (default: the embedded offline Lee dataset)")
    g.add_argument("--corpus", type=_existing_file, help="JSONL corpus, one {\"id\", \"contents\"} per line")
    g.add_argument("--queries", type=_existing_file, help="queries as TSV (qid<TAB>text) or JSONL")
    g.add_argument("--qrels", type=_existing_file, help="TREC qrels (qid 0 docid relevance)")
    g.add_argument("--out", dest="out_dir", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, init and data order (default 0)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when available; under torchrun, the LOCAL_RANK GPU), cpu, cuda or cuda:N "
                        "(default auto): the model, every batch and decoding run there")
    g.add_argument("--rescore-k", type=int, default=1000, help="BM25 candidates rescored for MAP / R@1000")


# Options are stored under the names of the config fields they set (RunConfig, TrainConfig), and take
# their defaults from those dataclasses, so the configs are the one source of every default. A phase's
# optimisation options carry a prefix ("recover-" for `run`'s recovery phases); the rest are shared.
def add_train_args(p, prefix="", config=None):
    """Optimisation options of one phase; defaults from `config` (TrainConfig() or RecoverConfig())."""
    from .dsi.trainer import PRECISIONS, TrainConfig
    from .optim import OPTIMIZERS

    c = config or TrainConfig()
    d = prefix.replace("-", "_")
    g = p.add_argument_group(f"{prefix or 'training'} optimisation")
    g.add_argument(f"--{prefix}epochs", dest=d + "epochs", type=int, default=c.epochs,
                   help=f"epochs (default {c.epochs})")
    g.add_argument(f"--{prefix}lr", dest=d + "lr", type=float, default=c.lr,
                   help=f"AdamW peak learning rate (default {c.lr:g})")
    g.add_argument(f"--{prefix}batch-size", dest=d + "batch_size", type=int, default=c.batch_size,
                   help=f"batch size per step (default {c.batch_size})")
    g.add_argument(f"--{prefix}grad-accum", dest=d + "grad_accum", type=int, default=c.grad_accum,
                   help=f"gradient accumulation steps (default {c.grad_accum})")
    g.add_argument(f"--{prefix}schedule", dest=d + "schedule", choices=["constant", "linear"], default=c.schedule,
                   help=f"LR schedule: constant, or linear decay to 0 after the warm-up (default {c.schedule})")
    g.add_argument(f"--{prefix}warmup-steps", dest=d + "warmup_steps", type=int, default=c.warmup_steps,
                   help="LR warm-up steps")
    g.add_argument(f"--{prefix}warmup-ratio", dest=d + "warmup_ratio", type=float, default=c.warmup_ratio,
                   help="LR warm-up as a fraction of all steps; the longer of this and --warmup-steps applies "
                        f"(default {c.warmup_ratio:g})")
    g.add_argument(f"--{prefix}precision", dest=d + "precision", choices=list(PRECISIONS), default=c.precision,
                   help="bf16: weights and gradients in bf16 (half the bytes; loss and softmax in fp32); "
                        f"bf16-mixed: autocast over fp32 weights (default {c.precision})")
    g.add_argument(f"--{prefix}optim", dest=d + "optim", choices=list(OPTIMIZERS), default=c.optim,
                   help="adamw: torch's (8 B of moments per weight); adamw8bit / adamw4bit: torchao's, about "
                        "2 / 1 B (pip install 'sparse-t5[lowbit]'); with --precision bf16 their updates are "
                        f"rounded stochastically (default {c.optim})")
    g.add_argument(f"--{prefix}master-weights", dest=d + "master_weights", action="store_true",
                   help="with --precision bf16 and a low-bit optimizer: an fp32 master copy (4 B per weight) "
                        "instead of stochastic rounding")
    g.add_argument(f"--{prefix}save-every", dest=d + "save_every", type=int, default=c.save_every,
                   help="checkpoint every N steps (and each epoch)")
    g.add_argument(f"--{prefix}patience", dest=d + "early_stopping_patience", type=int,
                   default=c.early_stopping_patience, help="early stopping patience in validated epochs; 0 = off")
    g.add_argument(f"--{prefix}eval-every", dest=d + "eval_every", type=int, default=c.eval_every,
                   help=f"validate every N epochs and after the last (default {c.eval_every})")


def add_parallel_args(p):
    g = p.add_argument_group("several processes (under torchrun)")
    g.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp", default="ddp",
                   help="shard the model with FSDP2 across the ranks (each holds 1/world of the sparse values, "
                        "their gradients and AdamW's moments; checkpoints are gathered and written whole) "
                        "instead of replicating it with DDP; with one-shot pruning only (not --gradual)")


def add_beam_arg(p, help="beam size for constrained decoding"):
    from .dsi.trainer import TrainConfig

    default = TrainConfig.eval_beam
    p.add_argument("--beam", dest="eval_beam", type=int, default=default, help=f"{help} (default {default})")


def add_labels_args(p):
    from .dsi.pipeline import RunConfig

    p.add_argument("--labels", default=RunConfig.labels, choices=["qrels", "bm25"],
                   help="retrieval training labels: qrels, or BM25 top-K as in the pruning study")
    p.add_argument("--label-k", type=int, default=RunConfig.label_k,
                   help=f"K for BM25 labels (default {RunConfig.label_k}, the study's)")


def add_indexing_args(g):
    from .dsi.trainer import TrainConfig as c

    g.add_argument("--index-ratio", type=float, default=c.index_ratio,
                   help="indexing examples (windows, pseudo-queries) per retrieval example "
                        f"(default {c.index_ratio:g})")
    g.add_argument("--index-tokens", type=int, default=c.index_tokens,
                   help=f"tokens per document window (default {c.index_tokens})")
    g.add_argument("--index-stride", type=int, default=c.index_stride,
                   help="tokens between window starts (default 0: --index-tokens, no overlap)")
    g.add_argument("--pseudo-queries", type=int, default=c.pseudo_queries,
                   help=f"pseudo-queries per document, generated from its text (default {c.pseudo_queries}), "
                        "a fresh draw each epoch")
    g.add_argument("--fixed-pseudo-queries", dest="resample_pseudo_queries", action="store_false",
                   help="draw the pseudo-queries once and reuse them every epoch (the --qg-model default)")
    g.add_argument("--qg-model", type=_existing_dir,
                   help="local doc2query-style HF seq2seq checkpoint that samples the pseudo-queries "
                        "(default: offline keyword and span sampling)")


def add_model_args(p):
    from .dsi.pipeline import MODEL_SIZES, RunConfig as c

    g = p.add_argument_group("model")
    g.add_argument("--model", type=_existing_dir, help="local HF T5 checkpoint to start from (default: random init)")
    g.add_argument("--model-size", default=c.model_size, choices=sorted(MODEL_SIZES),
                   help=f"shape for random init (default {c.model_size}: {MODEL_SIZES[c.model_size]})")
    g.add_argument("--dropout", type=float, default=c.dropout,
                   help=f"dropout rate of a randomly initialised model (default {c.dropout:g})")
    g.add_argument("--tokenizer", type=_existing_dir, help="local HF tokenizer (default: train one on the corpus)")
    g.add_argument("--docids", dest="docid_scheme", default=c.docid_scheme,
                   choices=["atomic", "naive", "random", "semantic"],
                   help=f"docid scheme (default {c.docid_scheme}; semantic: hierarchical k-means over the "
                        "encoder's document embeddings)")
    add_labels_args(g)
    add_beam_arg(g)
    g.add_argument("--encoder", default=c.encoder,
                   help="sentence encoder for semantic docids and the dense-retrieval row: auto "
                        "(all-MiniLM-L6-v2 when installed), lsa (no encoder), or a local HF encoder directory")
    add_indexing_args(g)


def _add_run_and_train(cmds):
    from .dsi.trainer import RecoverConfig

    run = cmds.add_parser("run", help="the whole cycle: BM25, dense training, prune + recover per setting, "
                                      "evaluate, report (JSON, Markdown, plots)")
    add_data_args(run)
    add_model_args(run)
    add_train_args(run, "")
    add_train_args(run, "recover-", RecoverConfig())
    run.add_argument("--prune", type=_prune_setting, nargs="+", default=None,
                     help="pruning settings: a sparsity (CSR, e.g. 0.2), csr:<sparsity>, or 2:4 (default 0.2)")
    run.add_argument("--scope", choices=["global", "layer"], default="global", help="magnitude threshold scope")
    run.add_argument("--gradual", action="store_true", help="prune gradually (cubic) during recovery")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoints")
    add_parallel_args(run)

    train = cmds.add_parser("train", help="dense training only (the baseline)")
    add_data_args(train)
    add_model_args(train)
    add_train_args(train, "")
    train.add_argument("--resume", action="store_true", help="continue from out/baseline/last")
    add_parallel_args(train)


def _add_prune(cmds):
    prune = cmds.add_parser("prune", help="prune a checkpoint while loading it, and save it compressed")
    source = prune.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=_existing_dir, help="trainer checkpoint directory")
    source.add_argument("--model", type=_existing_dir,
                        help="any local HF T5 checkpoint (dense): pruned tensor by tensor as it is read, so the "
                             "dense model is never held in memory")
    prune.add_argument("--sparsity", type=_sparsity, help="fraction of weights removed, in [0, 1) (CSR)")
    prune.add_argument("--format", choices=["csr", "2:4"], default="csr", help="sparse format (default csr)")
    prune.add_argument("--scope", choices=["global", "layer"], default="global", help="magnitude threshold scope")
    prune.add_argument("--output", required=True, help="where to write the pruned checkpoint")


def _add_recover_evaluate_bm25(cmds):
    from .dsi.trainer import RecoverConfig

    recover = cmds.add_parser("recover", help="fine-tune a pruned checkpoint (sparse values only), then evaluate it")
    add_data_args(recover)
    recover.add_argument("--checkpoint", type=_existing_dir, required=True, help="pruned checkpoint directory")
    add_beam_arg(recover, "beam size for validation and the test evaluation")
    add_indexing_args(recover)
    add_labels_args(recover)
    add_train_args(recover, "", RecoverConfig())
    add_parallel_args(recover)

    ev = cmds.add_parser("evaluate", help="evaluate a checkpoint on the test split")
    add_data_args(ev)
    ev.add_argument("--checkpoint", type=_existing_dir, required=True, help="checkpoint directory")
    add_beam_arg(ev, "beam size")

    bm = cmds.add_parser("bm25", help="index the corpus with Pyserini and evaluate BM25 on the test split")
    add_data_args(bm)
    add_beam_arg(bm, "also report Recall@beam")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-t5", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)
    dsi = sub.add_parser("dsi", help="Differentiable Search Index: train, prune, recover, evaluate")
    cmds = dsi.add_subparsers(dest="command", required=True)
    _add_run_and_train(cmds)
    _add_prune(cmds)
    _add_recover_evaluate_bm25(cmds)
    _add_tune(sub)
    return parser


def _add_tune(sub):
    from .tune import CSR_DENSITIES, SHAPES, TUNE_TOKENS

    tune = sub.add_parser("tune", help="measure the sparse ops' methods on this machine for the auto kernel policy",
                          description="Measure the sparse ops' methods (our kernels, transient dense, MKL, the "
                                      "narrow token tile) for a model's layer shapes on this CPU, and write the table "
                                      "the auto kernel policy uses here (the user cache, keyed by CPU, ISA, threads "
                                      "and torch).")
    what = tune.add_mutually_exclusive_group()
    what.add_argument("--model", help="a T5 checkpoint directory or hub name: its config's layer shapes")
    what.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="named T5 shapes (default: t5-base)")
    tune.add_argument("--tokens", nargs="+", type=int, default=list(TUNE_TOKENS), help="token counts per call")
    tune.add_argument("--densities", nargs="+", type=float, default=list(CSR_DENSITIES),
                      help="CSR densities (2:4 is measured beside them)")
    tune.add_argument("--rounds", type=int, default=5, help="timed rounds per method")
    tune.add_argument("--out", help="write the table here instead of the user cache (not used automatically)")
    tune.add_argument("--show", action="store_true", help="only say which table the auto policy uses now")


# The fields add_train_args sets per phase; every other option is shared by the phases.
PHASE_OPTIONS = ("epochs", "lr", "batch_size", "grad_accum", "schedule", "warmup_steps", "warmup_ratio", "precision",
                 "optim", "master_weights", "save_every", "early_stopping_patience", "eval_every")


def _config(cls, args, prefix="", phase_options=True, **fixed):
    """`cls` (a config dataclass) from the parsed options named after its fields: the prefixed name
    first (a phase's own option), then the shared one; a field without an option keeps its default.
    phase_options=False takes the shared options only (the training phase of `recover`)."""
    from dataclasses import MISSING, fields

    values = {}
    for f in fields(cls):
        if not phase_options and f.name in PHASE_OPTIONS:
            continue
        for name in (prefix.replace("-", "_") + f.name, f.name):
            value = getattr(args, name, MISSING)
            if value is not MISSING:
                values[f.name] = value
                break
    return cls(**{**values, **fixed})


def _run_config(args):
    from .dsi.pipeline import PruneSetting, RunConfig
    from .dsi.trainer import RecoverConfig, TrainConfig

    prune = args.prune if getattr(args, "prune", None) else ([] if args.command == "train" else [PruneSetting(0.2)])
    for p in prune:
        p.scope = getattr(args, "scope", "global")
        if getattr(args, "gradual", False) and p.format == "csr":
            p.mode = "gradual"
    # `recover` configures the recovery phase with unprefixed options; `run` with --recover-*.
    recover = _config(RecoverConfig, args, "recover-" if args.command == "run" else "",
                      phase_options=args.command in ("run", "recover"))
    train = _config(TrainConfig, args, phase_options=args.command != "recover")
    return _config(RunConfig, args, train=train, recover=recover, prune=prune)


def _tune(args) -> int:
    from . import tune
    from .kernel_policy import table_info

    if args.show:
        print(tune.summary(table_info("cpu")))
        return 0
    try:
        if args.model:
            from transformers import T5Config

            path = os.path.expanduser(args.model)
            if path.startswith((os.sep, ".", "~")) and not os.path.isdir(path):  # a path, not a hub name
                raise ValueError(f"--model {args.model}: no such directory")
            shapes = tune.model_shapes(T5Config.from_pretrained(path))
        else:
            shapes = [s for name in (args.shapes or ["t5-base"]) for s in tune.SHAPES[name]]
        print(f"measuring {len(shapes)} shapes x {len(args.densities) + 1} formats x {len(args.tokens)} token counts "
              "x 3 ops", file=sys.stderr)
        info = tune.tune(shapes, args.tokens, args.densities, rounds=args.rounds, path=args.out)
    except (ValueError, OSError) as err:
        print(f"sparse-t5: error: {err}", file=sys.stderr)
        return 2
    print(tune.summary(info))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.group == "tune":
        return _tune(args)
    from .dsi import pipeline

    try:
        from .distributed import init_distributed

        device = init_distributed(args.device if args.command != "prune" else "auto")  # validates --device
        if args.command == "prune":
            result = _prune(args)
        else:
            cfg = _run_config(args)
            if args.command in ("run", "train"):
                print(pipeline.summary_table(pipeline.run(cfg, resume=args.resume)))
                return 0
            if args.command == "recover":
                phase = pipeline.recover(cfg, args.checkpoint)
                result = {k: v for k, v in phase.items() if k != "history"}
            elif args.command == "evaluate":
                result = pipeline.evaluate_checkpoint(cfg, args.checkpoint, device)
            else:  # bm25
                prep = pipeline.prepare(cfg)
                result = pipeline.evaluate_bm25(prep.data, prep.splits["test"], prep.bm25_run, cfg.train.eval_beam,
                                                os.path.join(cfg.out_dir, "runs", "bm25.trec"))
        print(json.dumps(result, indent=1, default=str))
    except (ValueError, FileNotFoundError) as err:
        print(f"sparse-t5: error: {err}", file=sys.stderr)
        return 2
    return 0


def _prune(args) -> dict:
    from . import SparseT5ForConditionalGeneration
    from .dsi.trainer import load_checkpoint

    if args.format == "csr" and args.sparsity is None:
        raise ValueError("--sparsity is required for --format csr")
    prune_at_load = dict(sparsity=args.sparsity, format=args.format, scope=args.scope)
    if args.model:
        model = SparseT5ForConditionalGeneration.from_pretrained(args.model, **prune_at_load)
        model.save_pretrained(args.output)
    else:
        model, tokenizer, mapping = load_checkpoint(args.checkpoint, **prune_at_load)
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        mapping.save(os.path.join(args.output, "docids.json"))
    return {"layers": len(model.sparse_layers()), "sparsity": model.sparsity_report()}


if __name__ == "__main__":
    sys.exit(main())
