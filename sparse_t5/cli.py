"""sparse-t5 command line: `sparse-t5 dsi {run,train,prune,recover,evaluate,bm25} --help`."""
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
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, init and data order (default 0)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when available; under torchrun, the LOCAL_RANK GPU), cpu, cuda or cuda:N "
                        "(default auto): the model, every batch and decoding run there")
    g.add_argument("--rescore-k", type=int, default=1000, help="BM25 candidates rescored for MAP / R@1000")


def add_train_args(p, prefix="", recipe=None):
    """Optimisation options; defaults from `recipe` (pipeline.TRAIN_RECIPE or RECOVER_RECIPE)."""
    from .dsi.pipeline import TRAIN_RECIPE

    r = recipe or TRAIN_RECIPE
    g = p.add_argument_group(f"{prefix or 'training'} optimisation")
    g.add_argument(f"--{prefix}epochs", type=int, default=r["epochs"], help=f"epochs (default {r['epochs']})")
    g.add_argument(f"--{prefix}lr", type=float, default=r["lr"], help=f"AdamW peak learning rate (default {r['lr']:g})")
    g.add_argument(f"--{prefix}batch-size", type=int, default=r["batch_size"],
                   help=f"batch size per step (default {r['batch_size']})")
    g.add_argument(f"--{prefix}grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument(f"--{prefix}schedule", choices=["constant", "linear"], default=r["schedule"],
                   help=f"LR schedule: constant, or linear decay to 0 after the warm-up (default {r['schedule']})")
    g.add_argument(f"--{prefix}warmup-steps", type=int, default=0, help="LR warm-up steps")
    g.add_argument(f"--{prefix}warmup-ratio", type=float, default=r.get("warmup_ratio", 0.0),
                   help="LR warm-up as a fraction of all steps; the longer of this and --warmup-steps applies "
                        f"(default {r.get('warmup_ratio', 0.0):g})")
    g.add_argument(f"--{prefix}precision", choices=["fp32", "bf16"], default="fp32", help="bf16 uses autocast")
    g.add_argument(f"--{prefix}save-every", type=int, default=0, help="checkpoint every N steps (and each epoch)")
    g.add_argument(f"--{prefix}patience", type=int, default=0,
                   help="early stopping patience in validated epochs; 0 = off")
    g.add_argument(f"--{prefix}eval-every", type=int, default=r.get("eval_every", 1),
                   help=f"validate every N epochs and after the last (default {r.get('eval_every', 1)})")


def add_parallel_args(p):
    g = p.add_argument_group("several processes (under torchrun)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 across the ranks (each holds 1/world of the sparse values, "
                        "their gradients and AdamW's moments; checkpoints are gathered and written whole) "
                        "instead of replicating it with DDP; with one-shot pruning only (not --gradual)")


def train_config(args, prefix=""):
    """The TrainConfig of the parsed options; a command without some options (evaluate, bm25) gets
    TrainConfig's defaults for them."""
    from dataclasses import fields

    from .dsi.trainer import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    a = lambda name, field: getattr(args, (prefix + name).replace("-", "_"), defaults[field])  # noqa: E731
    return TrainConfig(epochs=a("epochs", "epochs"), lr=a("lr", "lr"), batch_size=a("batch-size", "batch_size"),
                       grad_accum=a("grad-accum", "grad_accum"), schedule=a("schedule", "schedule"),
                       warmup_steps=a("warmup-steps", "warmup_steps"),
                       warmup_ratio=a("warmup-ratio", "warmup_ratio"), precision=a("precision", "precision"),
                       save_every=a("save-every", "save_every"),
                       early_stopping_patience=a("patience", "early_stopping_patience"), seed=args.seed,
                       eval_every=a("eval-every", "eval_every"),
                       eval_beam=getattr(args, "beam", defaults["eval_beam"]),
                       index_ratio=getattr(args, "index_ratio", defaults["index_ratio"]),
                       index_tokens=getattr(args, "index_tokens", defaults["index_tokens"]),
                       index_stride=getattr(args, "index_stride", defaults["index_stride"]),
                       pseudo_queries=getattr(args, "pseudo_queries", defaults["pseudo_queries"]),
                       resample_pseudo_queries=not getattr(args, "fixed_pseudo_queries", False), device=args.device,
                       parallel="fsdp" if getattr(args, "fsdp", False) else "ddp")


def build_parser() -> argparse.ArgumentParser:
    from .dsi.pipeline import MODEL_SIZES, RECIPE, RECOVER_RECIPE, TRAIN_RECIPE

    parser = argparse.ArgumentParser(prog="sparse-t5", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)
    dsi = sub.add_parser("dsi", help="Differentiable Search Index: train, prune, recover, evaluate")
    cmds = dsi.add_subparsers(dest="command", required=True)

    def model_args(p):
        g = p.add_argument_group("model")
        g.add_argument("--model", type=_existing_dir, help="local HF T5 checkpoint to start from (default: random init)")
        g.add_argument("--model-size", default=RECIPE["model_size"], choices=sorted(MODEL_SIZES),
                       help=f"shape for random init (default {RECIPE['model_size']}: "
                            f"{MODEL_SIZES[RECIPE['model_size']]})")
        g.add_argument("--dropout", type=float, default=RECIPE["dropout"],
                       help=f"dropout rate of a randomly initialised model (default {RECIPE['dropout']:g})")
        g.add_argument("--tokenizer", type=_existing_dir, help="local HF tokenizer (default: train one on the corpus)")
        g.add_argument("--docids", default=RECIPE["docid_scheme"], choices=["atomic", "naive", "random", "semantic"],
                       help=f"docid scheme (default {RECIPE['docid_scheme']}; semantic: hierarchical k-means over the "
                            "encoder's document embeddings)")
        g.add_argument("--labels", default="qrels", choices=["qrels", "bm25"],
                       help="retrieval training labels: qrels, or BM25 top-K as in the pruning study")
        g.add_argument("--label-k", type=int, default=5, help="K for BM25 labels (default 5, the study's)")
        g.add_argument("--beam", type=int, default=10, help="beam size for constrained decoding (default 10)")
        g.add_argument("--encoder", default="auto",
                       help="sentence encoder for semantic docids and the dense-retrieval row: auto "
                            "(all-MiniLM-L6-v2 when installed), lsa (no encoder), or a local HF encoder directory")
        indexing_args(g)

    def indexing_args(g):
        g.add_argument("--index-ratio", type=float, default=TRAIN_RECIPE["index_ratio"],
                       help="indexing examples (windows, pseudo-queries) per retrieval example "
                            f"(default {TRAIN_RECIPE['index_ratio']:g})")
        g.add_argument("--index-tokens", type=int, default=64, help="tokens per document window (default 64)")
        g.add_argument("--index-stride", type=int, default=0,
                       help="tokens between window starts (default 0: --index-tokens, no overlap)")
        g.add_argument("--pseudo-queries", type=int, default=TRAIN_RECIPE["pseudo_queries"],
                       help=f"pseudo-queries per document, generated from its text "
                            f"(default {TRAIN_RECIPE['pseudo_queries']}), a fresh draw each epoch")
        g.add_argument("--fixed-pseudo-queries", action="store_true",
                       help="draw the pseudo-queries once and reuse them every epoch (the --qg-model default)")
        g.add_argument("--qg-model", type=_existing_dir,
                       help="local doc2query-style HF seq2seq checkpoint that samples the pseudo-queries "
                            "(default: offline keyword and span sampling)")

    run = cmds.add_parser("run", help="the whole cycle: BM25, dense training, prune + recover per setting, "
                                      "evaluate, report (JSON, Markdown, plots)")
    add_data_args(run)
    model_args(run)
    add_train_args(run, "")
    add_train_args(run, "recover-", RECOVER_RECIPE)
    run.add_argument("--prune", type=_prune_setting, nargs="+", default=None,
                     help="pruning settings: a sparsity (CSR, e.g. 0.2), csr:<sparsity>, or 2:4 (default 0.2)")
    run.add_argument("--scope", choices=["global", "layer"], default="global", help="magnitude threshold scope")
    run.add_argument("--gradual", action="store_true", help="prune gradually (cubic) during recovery")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoints")
    add_parallel_args(run)

    train = cmds.add_parser("train", help="dense training only (the baseline)")
    add_data_args(train)
    model_args(train)
    add_train_args(train, "")
    train.add_argument("--resume", action="store_true", help="continue from out/baseline/last")
    add_parallel_args(train)

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

    recover = cmds.add_parser("recover", help="fine-tune a pruned checkpoint (sparse values only)")
    add_data_args(recover)
    recover.add_argument("--checkpoint", type=_existing_dir, required=True, help="pruned checkpoint directory")
    recover.add_argument("--beam", type=int, default=10, help="beam size for validation")
    indexing_args(recover)
    recover.add_argument("--labels", default="qrels", choices=["qrels", "bm25"], help="retrieval labels")
    recover.add_argument("--label-k", type=int, default=5, help="K for BM25 labels")
    add_train_args(recover, "", RECOVER_RECIPE)
    add_parallel_args(recover)

    ev = cmds.add_parser("evaluate", help="evaluate a checkpoint on the test split")
    add_data_args(ev)
    ev.add_argument("--checkpoint", type=_existing_dir, required=True, help="checkpoint directory")
    ev.add_argument("--beam", type=int, default=10, help="beam size (default 10)")

    bm = cmds.add_parser("bm25", help="index the corpus with Pyserini and evaluate BM25 on the test split")
    add_data_args(bm)
    bm.add_argument("--beam", type=int, default=10, help="also report Recall@beam")
    return parser


def _run_config(args):
    from .dsi.pipeline import RECIPE, PruneSetting, RunConfig

    prune = args.prune if getattr(args, "prune", None) else ([] if args.command == "train" else [PruneSetting(0.2)])
    for p in prune:
        p.scope = getattr(args, "scope", "global")
        if getattr(args, "gradual", False) and p.format == "csr":
            p.mode = "gradual"
    return RunConfig(out_dir=args.out, corpus=args.corpus, queries=args.queries, qrels=args.qrels,
                     tokenizer=getattr(args, "tokenizer", None), model=getattr(args, "model", None),
                     model_size=getattr(args, "model_size", RECIPE["model_size"]),
                     dropout=getattr(args, "dropout", RECIPE["dropout"]),
                     docid_scheme=getattr(args, "docids", RECIPE["docid_scheme"]),
                     labels=getattr(args, "labels", "qrels"), label_k=getattr(args, "label_k", 5),
                     encoder=getattr(args, "encoder", "auto"), qg_model=getattr(args, "qg_model", None),
                     train=train_config(args), recover=train_config(args, "recover-") if args.command == "run"
                     else train_config(args), prune=prune, rescore_k=args.rescore_k, seed=args.seed)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "gradual", False) and getattr(args, "fsdp", False):
        parser.error("--gradual cannot run with --fsdp: gradual pruning rebuilds the sparse layers during "
                     "recovery, which FSDP2's sharded parameters cannot follow; prune one-shot with --fsdp")
    from .dsi import pipeline

    try:
        from .distributed import init_distributed

        device = init_distributed(getattr(args, "device", "auto"))  # validates --device; joins torchrun's group
        if args.command in ("run", "train"):
            report = pipeline.run(_run_config(args), resume=args.resume)
            print(pipeline.summary_table(report))
        elif args.command == "prune":
            from .dsi.trainer import load_checkpoint

            from . import SparseT5ForConditionalGeneration

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
            print(json.dumps({"layers": len(model.sparse_layers()), "sparsity": model.sparsity_report()}, indent=1))
        elif args.command == "recover":
            from .dsi.trainer import Trainer, load_checkpoint

            cfg = _run_config(args)
            prep = pipeline.prepare(cfg)
            model, tokenizer, mapping = load_checkpoint(args.checkpoint)
            examples = pipeline.training_examples(cfg, prep, tokenizer)
            result = Trainer(model, tokenizer, mapping, examples, cfg.train, os.path.join(args.out, "recover")).train()
            print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
        elif args.command == "evaluate":
            from .dsi.trainer import load_checkpoint

            cfg = _run_config(args)
            prep = pipeline.prepare(cfg)
            model, tokenizer, mapping = load_checkpoint(args.checkpoint)
            model.to(device)
            result = pipeline.evaluate_model(model, tokenizer, mapping, prep["data"], prep["splits"]["test"],
                                             prep["bm25_run"], args.beam, args.rescore_k,
                                             run_path=os.path.join(args.out, "runs", "evaluate.trec"))
            print(json.dumps(result, indent=1))
        elif args.command == "bm25":
            cfg = _run_config(args)
            prep = pipeline.prepare(cfg)
            result = pipeline.evaluate_bm25(prep["data"], prep["splits"]["test"], prep["bm25_run"], args.beam,
                                            os.path.join(args.out, "runs", "bm25.trec"))
            print(json.dumps(result, indent=1))
    except (ValueError, FileNotFoundError) as err:
        print(f"sparse-t5: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
