"""DSI: data, BM25 (real Lucene through Pyserini), docids, constrained decoding, rescoring, metrics,
the trainer (cycle, resume, DDP) and the CLI, on tiny corpora and tiny models (seconds each)."""
import copy
import json
import os

import pytest
import torch

from sparse_t5.dsi import bm25 as bm25_mod
from sparse_t5.dsi.data import (DataError, Document, build_lee_dataset, load, load_corpus, load_or_train_tokenizer,
                                load_qrels, load_queries, split_queries, write_corpus)
from sparse_t5.dsi.decoding import DocidTrie, TrieLogitsProcessor, rescore, retrieve
from sparse_t5.dsi.docids import SCHEMES, build_docids
from sparse_t5.dsi.metrics import evaluate, write_run
from sparse_t5.dsi.pipeline import PruneSetting, RunConfig, new_model
from sparse_t5.dsi.pipeline import run as run_cycle
from sparse_t5.dsi.examples import make_examples
from sparse_t5.dsi.trainer import Trainer, TrainConfig, load_checkpoint


@pytest.fixture(scope="module")
def lee(tmp_path_factory):
    """The embedded dataset, cut to 40 documents and their queries (small and fast)."""
    root = tmp_path_factory.mktemp("lee")
    full = build_lee_dataset(str(root / "full"))
    data = load(full["corpus"], full["queries"], full["qrels"])
    keep = {d.id for d in data.corpus[:40]}
    small = root / "small"
    small.mkdir()
    write_corpus([d for d in data.corpus if d.id in keep], str(small / "corpus.jsonl"))
    qids = [q for q, rels in data.qrels.items() if set(rels) <= keep]
    (small / "queries.tsv").write_text("".join(f"{q}\t{data.queries[q]}\n" for q in qids))
    (small / "qrels.txt").write_text("".join(f"{q} 0 {d} 1\n" for q in qids for d in data.qrels[q]))
    paths = {k: str(small / f) for k, f in (("corpus", "corpus.jsonl"), ("queries", "queries.tsv"),
                                            ("qrels", "qrels.txt"))}
    return paths, load(paths["corpus"], paths["queries"], paths["qrels"]), full


@pytest.fixture(scope="module")
def tokenizer(lee, tmp_path_factory):
    _, data, _ = lee
    return load_or_train_tokenizer(None, [d.contents for d in data.corpus], str(tmp_path_factory.mktemp("tok")),
                                   vocab_size=800)


@pytest.fixture
def tok(tokenizer):
    """A fresh copy of the module's tokenizer: build_docids adds the docid tokens to it."""
    return copy.deepcopy(tokenizer)


# ---- data ------------------------------------------------------------------------------------------
def test_embedded_dataset_is_real_text_with_honest_queries(lee):
    _, _, full = lee
    data = load(full["corpus"], full["queries"], full["qrels"])
    assert len(data.corpus) == 300 and len(data.queries) >= 500
    docs = {d.id: d.contents.lower() for d in data.corpus}
    for qid, text in list(data.queries.items())[:100]:
        (doc_id,) = data.qrels[qid]
        indexed_prefix = " ".join(docs[doc_id].split()[:64])
        assert text not in indexed_prefix and text not in docs[doc_id]  # never copied verbatim
        assert all(w in docs[doc_id] for w in text.split())  # but about that document


def test_splits_are_seeded_and_disjoint():
    qids = [f"q{i}" for i in range(100)]
    a, b = split_queries(qids, seed=3), split_queries(qids, seed=3)
    assert a == b and [len(a[k]) for k in ("train", "validation", "test")] == [70, 10, 20]
    assert not set(a["train"]) & set(a["test"]) and split_queries(qids, seed=4) != a


@pytest.mark.parametrize("kind,content,message", [
    ("corpus", '{"id": "a", "contents": "x"}\n{"id": "b"\n', r"corpus.jsonl:2: not valid JSON"),
    ("corpus", '{"id": "a", "contents": "x"}\n{"id": "a", "contents": "y"}\n', r"corpus.jsonl:2: duplicate"),
    ("corpus", '{"name": "a"}\n', r"corpus.jsonl:1: expected an object with 'id' and 'contents'"),
    ("queries", "q1\thello\nq2 no tab here\n", r"queries.tsv:2: expected 'qid<TAB>text'"),
    ("qrels", "q1 0 d1 1\nq2 0 d2\n", r"qrels.txt:2: expected TREC qrels"),
    ("qrels", "q1 0 d1 yes\n", r"qrels.txt:1: relevance must be an integer"),
])
def test_malformed_files_name_file_and_line(tmp_path, kind, content, message):
    path = tmp_path / {"corpus": "corpus.jsonl", "queries": "queries.tsv", "qrels": "qrels.txt"}[kind]
    path.write_text(content)
    loader = {"corpus": load_corpus, "queries": load_queries, "qrels": load_qrels}[kind]
    with pytest.raises(DataError, match=message):
        loader(str(path))
    with pytest.raises(DataError, match="not found"):
        loader(str(tmp_path / "missing.txt"))


# ---- BM25 ------------------------------------------------------------------------------------------
def test_bm25_index_search_and_labels(tmp_path):
    docs = [Document("d1", "the cat sat on the warm mat"), Document("d2", "dogs chase cats in the park"),
            Document("d3", "quantum chromodynamics describes quarks and gluons"),
            Document("d4", "the stock market fell sharply on monday")]
    run = bm25_mod.search_corpus(docs, {"q1": "quarks gluons", "q2": "cat mat", "q3": "market"},
                                 str(tmp_path / "index"), k=10)
    assert os.path.isdir(tmp_path / "index")
    assert max(run["q1"], key=run["q1"].get) == "d3"
    assert max(run["q2"], key=run["q2"].get) == "d1"
    assert list(run["q3"]) == ["d4"]
    labels = bm25_mod.labels_from_run(run, k=2)
    assert ("q2", "d1") in labels and ("q2", "d2") in labels and len([p for p in labels if p[0] == "q2"]) == 2


def test_bm25_reports_java_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_T5_JAVA_HOME", "/nonexistent/java")
    with pytest.raises(bm25_mod.JavaError, match="Java could not start from JAVA_HOME=/nonexistent/java"):
        bm25_mod.search_corpus([Document("d1", "text")], {"q": "text"}, str(tmp_path / "index"))


# ---- docids -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_docid_schemes_are_bijections(lee, tok, scheme, tmp_path):
    _, data, _ = lee
    mapping = build_docids(scheme, data.corpus, tok, seed=1, k=3, c=5)
    seqs = [tuple(s) for s in mapping.sequences.values()]
    assert len(set(seqs)) == len(data.corpus) == len(mapping)
    assert all(s[-1] == tok.eos_token_id for s in seqs)
    for doc in data.corpus:
        assert mapping.docid_of(mapping.sequences[doc.id]) == doc.id
    mapping.save(str(tmp_path / "docids.json"))
    from sparse_t5.dsi.docids import DocidMapping

    assert DocidMapping.load(str(tmp_path / "docids.json")).sequences == mapping.sequences


def tiny_model(tok, seed=0):
    cfg = RunConfig(model_size="tiny", seed=seed)
    return new_model(cfg, tok)


def test_constrained_beam_search_returns_valid_distinct_docids(lee, tok):
    _, data, _ = lee
    docs = data.corpus[:6]
    mapping = build_docids("naive", docs, tok)
    model = tiny_model(tok)
    queries = {q: data.queries[q] for q in list(data.queries)[:5]}
    for mode in ("processor", "prefix_fn"):
        run = retrieve(model, tok, mapping, queries, beam=8, mode=mode)
        for qid, ranked in run.items():
            assert set(ranked) <= set(mapping.sequences)
            assert len(ranked) == len(set(ranked)) == len(docs), (mode, qid, ranked)  # all 6 when beam >= 6
        run_small = retrieve(model, tok, mapping, queries, beam=3, mode=mode)
        assert all(len(r) <= 3 for r in run_small.values())


def test_trie_never_returns_an_empty_allowed_set(lee, tok):
    _, data, _ = lee
    mapping = build_docids("naive", data.corpus[:5], tok)
    trie = DocidTrie(mapping, len(tok), tok.pad_token_id)
    assert trie.allowed_tokens([]) and trie.allowed_tokens([99999]) == [tok.pad_token_id]
    full = mapping.sequences[data.corpus[0].id]
    assert trie.allowed_tokens(full) == [tok.pad_token_id]
    ids = torch.tensor([[0] + full[:1], [0, 99 % len(tok)]])
    scores = TrieLogitsProcessor(trie)(ids, torch.zeros(2, len(tok)))
    assert torch.isfinite(scores).any(dim=1).all()


def test_rescoring_ranks_the_preferred_docid_first(lee, tok):
    _, data, _ = lee
    docs = data.corpus[:8]
    mapping = build_docids("atomic", docs, tok)
    model = tiny_model(tok)
    query = "bushfire warning residents evacuated"
    target = docs[5].id
    examples = [type("E", (), {"text": query, "docid": target, "kind": "query"})()]
    trainer = Trainer(model, tok, mapping, examples * 8, TrainConfig(epochs=25, lr=3e-3, batch_size=8, **PLAIN),
                      "/tmp/unused", progress=False, log=lambda *_: None)
    trainer.save = lambda name: None  # no checkpoints needed here
    trainer.train()
    scores = rescore(model, tok, mapping, {"q": query}, {"q": [d.id for d in docs]})["q"]
    assert max(scores, key=scores.get) == target


# ---- metrics ------------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_and_pytrec_eval(tmp_path):
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {"d": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0}, "q2": {"c": 5.0, "z": 4.0, "b": 1.0}}  # q3 retrieved nothing
    m = evaluate(run, qrels)
    # by hand: q1 AP 1/2, q2 AP (1 + 2/3) / 2, q3 0 (trec_eval -c semantics)
    assert m["MAP"] == pytest.approx((0.5 + (1 + 2 / 3) / 2 + 0) / 3)
    assert m["MRR@10"] == pytest.approx((0.5 + 1.0 + 0) / 3)
    assert m["Hits@1"] == pytest.approx(1 / 3) and m["Hits@10"] == pytest.approx(2 / 3)
    assert m["R@1000"] == pytest.approx(2 / 3)
    import pytrec_eval

    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"map", "recip_rank"}).evaluate(run)
    assert sum(v["map"] for v in per_query.values()) / 3 == pytest.approx(m["MAP"])
    write_run(run, str(tmp_path / "run.trec"), "test")
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[0] == "q1 Q0 x 1 3.000000 test" and len(lines) == 5


# ---- trainer: the cycle, resume, DDP, CLI ---------------------------------------------------------------
# What the trainer tests run: constant learning rate, validation every epoch, the examples the test
# builds (no pseudo-queries); TrainConfig's defaults are the demo's recipe.
PLAIN = dict(schedule="constant", warmup_ratio=0.0, eval_every=1, index_ratio=1.0, pseudo_queries=0)

def small_config(lee_paths, out, **train_kw):
    train = TrainConfig(**{**PLAIN, **dict(epochs=1, batch_size=8, lr=1e-3, eval_beam=5, max_eval_queries=5),
                           **train_kw})
    recover = TrainConfig(epochs=1, batch_size=8, lr=1e-3, eval_beam=5, max_eval_queries=5, **PLAIN)
    return RunConfig(out_dir=str(out), corpus=lee_paths["corpus"], queries=lee_paths["queries"],
                     qrels=lee_paths["qrels"], model_size="tiny", train=train, recover=recover,
                     prune=[PruneSetting(0.5), PruneSetting(None, "2:4")], rescore_k=50)


def test_tiny_end_to_end_cycle(lee, tmp_path):
    paths, _, _ = lee
    report = run_cycle(small_config(paths, tmp_path / "run"), progress=False)
    assert set(report["phases"]) == {"baseline", "csr-0.5", "2:4"}
    for name, phase in report["phases"].items():
        for key in ("Hits@1", "Hits@10", "MRR@10", "MAP", "R@1000"):
            assert 0.0 <= phase["test"][key] <= 1.0, (name, key)
        assert phase["peak_rss_bytes"] > 0 and phase["history"]
    for name, fmt in (("csr-0.5", "csr"), ("2:4", "2:4")):
        phase = report["phases"][name]
        assert phase["pruned"]["nnz"] == phase["model"]["nnz"]  # recovery did not densify anything
        assert phase["model"]["nnz"] == pytest.approx(0.5 * phase["model"]["dense_size"], rel=1e-3)
        model, _, _ = load_checkpoint(str(tmp_path / "run" / name / "last"))
        assert model.sparse_layers() and all(m.format == fmt for m in model.sparse_layers().values())
    assert os.path.isfile(tmp_path / "run" / "summary.md") and os.path.isfile(tmp_path / "run" / "curves.png")
    assert os.path.isfile(tmp_path / "run" / "runs" / "bm25.trec")
    json.load(open(tmp_path / "run" / "report.json"))


def test_two_runs_with_the_same_seed_give_identical_numbers(lee, tmp_path):
    """The whole cycle twice, each training its own tokenizer (deterministic: sentencepiece with one
    thread), its docids (MiniLM when installed, k-means seeded), and its models: identical reports and
    bit-identical weights."""
    paths, _, _ = lee
    reports = []
    for name in ("a", "b"):
        cfg = small_config(paths, tmp_path / name)
        cfg.prune = [PruneSetting(0.5)]
        cfg.train.pseudo_queries = cfg.recover.pseudo_queries = 3
        reports.append(run_cycle(cfg, progress=False))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "step_time_s", "peak_rss_bytes")}  # noqa
    for phase in ("baseline", "csr-0.5"):
        a, b = (r["phases"][phase] for r in reports)
        assert a["test"] == b["test"] and [strip(h) for h in a["history"]] == [strip(h) for h in b["history"]]
        ma, _, _ = load_checkpoint(str(tmp_path / "a" / phase / "last"))
        mb, _, _ = load_checkpoint(str(tmp_path / "b" / phase / "last"))
        for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
            assert torch.equal(x, y), (phase, n)
    assert reports[0]["bm25"] == {**reports[1]["bm25"], "seconds": reports[0]["bm25"]["seconds"]}
    assert reports[0]["examples"] == reports[1]["examples"] and reports[0]["examples"]["pseudo"] > 0


def _trainer(lee, tokenizer, out, seed=0, **kw):
    _, data, _ = lee
    tok = copy.deepcopy(tokenizer)
    mapping = build_docids("atomic", data.corpus, tok)
    model = tiny_model(tok, seed)
    labels = [(q, d) for q, rels in data.qrels.items() for d in rels]
    examples = make_examples(data.corpus, data.queries, labels, tok, 32, 1.0, seed)
    cfg = TrainConfig(**{**PLAIN, **dict(epochs=2, batch_size=8, lr=1e-3, seed=seed), **kw})
    return Trainer(model, tok, mapping, examples, cfg, str(out), progress=False, log=lambda *_: None)


@pytest.mark.parametrize("precision,optim", [("fp32", "adamw"), ("bf16", "adamw8bit")])
def test_resume_after_a_kill_gives_the_same_parameters(lee, tokenizer, tmp_path, precision, optim):
    """Also in bf16 with 8-bit moments: the quantized state and the stochastic rounding's draws (the
    restored RNG) resume exactly."""
    if optim != "adamw":
        pytest.importorskip("torchao.optim", reason="make test installs torchao (the lowbit extra)")
    kw = dict(save_every=3, precision=precision, optim=optim)
    full = _trainer(lee, tokenizer, tmp_path / "full", **kw)
    full.train()
    if precision == "bf16":
        assert {p.dtype for p in full.model.parameters()} == {torch.bfloat16}
        assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in full.optimizer.state.values())
    killed = _trainer(lee, tokenizer, tmp_path / "killed", **kw)
    assert killed.train(stop_after_steps=7) == {"stopped": True}  # mid-epoch; the last save was at step 6
    model, tok, mapping = load_checkpoint(str(tmp_path / "killed" / "last"))
    resumed = _trainer(lee, tokenizer, tmp_path / "killed", **kw)
    resumed.model.load_state_dict(model.state_dict())
    resumed.resume(str(tmp_path / "killed" / "last"))
    assert resumed.state["global_step"] == 6 and resumed.state["step_in_epoch"] == 6
    resumed.train()
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_validation_runs_every_eval_every_epochs_and_after_the_last(lee, tokenizer, tmp_path):
    """eval_every=3 over 4 epochs validates after epochs 3 and 4 only; "best" and the patience count
    look at validated epochs only (an unvalidated epoch neither improves nor stalls)."""
    trainer = _trainer(lee, tokenizer, tmp_path / "run", epochs=4, eval_every=3, early_stopping_patience=1)
    calls = []
    scores = iter([0.5, 0.25])  # epoch 3, epoch 4: the second is worse

    def validate(model):
        calls.append(trainer.state["epoch"] + 1)
        return {"Hits@10": next(scores)}

    trainer.evaluate_fn = validate
    trainer.train()
    assert calls == [3, 4]
    assert ["Hits@10" in h for h in trainer.state["history"]] == [False, False, True, True]
    assert trainer.state["best"] == 0.5 and trainer.state["epochs_without_improvement"] == 1
    best = torch.load(str(tmp_path / "run" / "best" / "trainer_state.pt"), weights_only=True)
    assert best["state"]["epoch"] == 3  # saved at the validated epoch that scored best
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        TrainConfig(eval_every=0)


def test_warmup_ratio_ramps_to_the_peak_then_decays_linearly(lee, tokenizer, tmp_path):
    """warmup_ratio is a fraction of all steps (HF's name): the LR climbs linearly to its peak over
    that many steps, then the linear schedule decays it to 0 at the last step. The longer of
    warmup_ratio and warmup_steps applies; a constant schedule holds the peak after the warm-up."""
    trainer = _trainer(lee, tokenizer, tmp_path / "run", epochs=4, lr=2e-3, schedule="linear", warmup_ratio=0.25)
    total = trainer.steps_per_epoch * 4
    warm = -(-total // 4)  # ceil
    assert trainer.warmup_steps == warm
    lrs = [2e-3 * trainer._lr_lambda(s) for s in range(total)]
    assert lrs[0] == pytest.approx(2e-3 / warm) and lrs[warm - 1] == pytest.approx(2e-3)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))  # rising to the peak
    assert all(a > b for a, b in zip(lrs[warm:-1], lrs[warm + 1:]))  # then falling
    assert lrs[-1] == pytest.approx(2e-3 / (total - warm))  # one step short of 0
    longer = _trainer(lee, tokenizer, tmp_path / "s", epochs=4, warmup_steps=warm + 5, warmup_ratio=0.25)
    assert longer.warmup_steps == warm + 5
    constant = _trainer(lee, tokenizer, tmp_path / "c", epochs=4, schedule="constant", warmup_ratio=0.5)
    assert constant._lr_lambda(0) < 1.0 and constant._lr_lambda(constant.warmup_steps) == 1.0
    assert constant._lr_lambda(total - 1) == 1.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="warmup_ratio must be in"):
            TrainConfig(warmup_ratio=bad)


def test_corrupt_trainer_checkpoint_is_reported(lee, tokenizer, tmp_path):
    trainer = _trainer(lee, tokenizer, tmp_path / "c")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="refusing to load trainer checkpoint .* corrupt"):
        trainer.resume(str(bad))
    with pytest.raises(ValueError, match="no trainer_state.pt"):
        trainer.resume(str(tmp_path))


class PicklePayload:
    """Unpickling this runs code: it creates the file named by `marker` (a stand-in for an attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_pickle_payload_without_running_it(lee, tokenizer, tmp_path):
    trainer = _trainer(lee, tokenizer, tmp_path / "run")
    trainer.train(stop_after_steps=1)
    path = trainer.save("last")
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    marker = tmp_path / "payload-ran"
    state["state"]["history"] = [PicklePayload(marker)]
    torch.save(state, os.path.join(path, "trainer_state.pt"))
    with pytest.raises(ValueError, match="refusing to load trainer checkpoint .* never unpickled") as err:
        _trainer(lee, tokenizer, tmp_path / "run").resume(path)
    assert not marker.exists()
    # One line that names the file and what to do, not torch's many-line unpickling message.
    assert "\n" not in str(err.value) and "trainer_state.pt" in str(err.value)
    assert "not a file sparse-t5 wrote" in str(err.value)


def test_from_pretrained_refuses_a_pickle_payload_without_running_it(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from sparse_t5 import SparseT5ForConditionalGeneration

    hf = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1))
    hf.save_pretrained(tmp_path / "ckpt")
    state = hf.state_dict()
    marker = tmp_path / "payload-ran"
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    torch.save({**state, "extra": PicklePayload(marker)}, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load .*pytorch_model.bin.* never unpickled") as err:
        SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists()
    assert "\n" not in str(err.value)


DDP_WORKER = r"""
import os, sys, json, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
from sparse_t5.distributed import init_distributed
assert init_distributed("cpu").type == "cpu"  # what the CLI calls: gloo on CPU under torchrun's variables
assert dist.is_initialized() == (world > 1) and (world == 1 or dist.get_backend() == "gloo")
torch.set_num_threads(1)
from sparse_t5 import SparseT5ForConditionalGeneration
from transformers import T5Config
from sparse_t5.dsi.trainer import Trainer, TrainConfig, Example
from sparse_t5.dsi.docids import DocidMapping
torch.manual_seed(0)
config = T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1, dropout_rate=0.0,
                  decoder_start_token_id=0)
model = SparseT5ForConditionalGeneration(config)
model.sparsify(0.5)
class Tok:
    pad_token_id, eos_token_id = 0, 1
    def save_pretrained(self, path):  # nothing to save: the test's tokenizer is this code
        pass
    def __call__(self, texts, **kw):
        ids = [[2 + (ord(c) % 60) for c in t][:12] for t in texts]
        width = max(len(i) for i in ids)
        pad = lambda i: i + [0] * (width - len(i))
        import types
        return types.SimpleNamespace(input_ids=torch.tensor([pad(i) for i in ids]),
                                     attention_mask=torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]))
mapping = DocidMapping("atomic", {{str(d): [10 + d, 1] for d in range(8)}})
examples = [Example(f"text number {{i}} about {{i % 8}}", str(i % 8), "query") for i in range(32)]
def evaluate(m):  # validation decodes: under FSDP a collective on every rank
    ids = m.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
    return {{"generated": ids[0].tolist()}}
trainer = Trainer(model, Tok(), mapping, examples,
                  TrainConfig(epochs=2, batch_size=4, lr=1e-2, device="cpu", parallel={parallel!r}, **{PLAIN!r}),
                  os.path.join({out!r}, f"run{{world}}"), evaluate_fn=evaluate, progress=False, log=lambda *_: None)
if {parallel!r} == "ddp":
    trainer.save = lambda name: None
result = trainer.train()
from sparse_t5.distributed import full_state_dict, is_sharded, local_state_bytes
state = full_state_dict(model) if is_sharded(model) else dict(model.named_parameters())
flat = torch.cat([state[n].detach().flatten() for n, p in model.named_parameters() if p.requires_grad])
json.dump({{"loss": result["history"][-1]["train_loss"], "params": flat.tolist(),
           "generated": result["history"][-1]["generated"], "sharded": is_sharded(model),
           "state_bytes": local_state_bytes(model, trainer.optimizer)}},
          open(os.path.join({out!r}, f"rank{{rank}}.json"), "w"))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _two_ranks_then_one(tmp_path, parallel, then_one=True, **train_kw):
    """Run the worker as two ranks (batch 4 each), then as one process (batch 8: the same global batch);
    returns (rank 0's, rank 1's, the single process's) results. `train_kw`: more TrainConfig fields;
    then_one=False: the two ranks only (returns theirs)."""
    import socket
    import subprocess
    import sys

    tests = os.path.dirname(__file__)
    script = tmp_path / "worker.py"
    worker = DDP_WORKER.format(tests=tests, out=str(tmp_path), parallel=parallel, PLAIN={**PLAIN, **train_kw})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def launch(world):
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port + (0 if world == 2 else 1)))
            procs.append(subprocess.Popen([sys.executable, str(script)], env=env))
        assert all(p.wait(timeout=300) == 0 for p in procs)
        return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]

    script.write_text(worker)
    r0, r1 = launch(2)
    if not then_one:
        return r0, r1
    script.write_text(worker.replace("batch_size=4", "batch_size=8"))
    one, = launch(1)
    assert r0["params"] == r1["params"]  # every rank ends with identical parameters
    assert abs(one["loss"] - r0["loss"]) <= 1e-4 * abs(one["loss"])
    # Parameters: the all-reduce sums in another order than one process does, and AdamW's
    # m / sqrt(v) amplifies that where gradients are ~0, so after 16 steps at lr 1e-2 they agree to a
    # fraction of one step (measured 3e-4), not bit for bit.
    diff = max(abs(a - b) for a, b in zip(one["params"], r0["params"]))
    assert diff < 0.1 * 1e-2, diff
    return r0, r1, one


def test_two_process_ddp_matches_single_process(tmp_path):
    r0, r1, one = _two_ranks_then_one(tmp_path, "ddp")
    assert not r0["sharded"] and r0["state_bytes"] == r1["state_bytes"] == one["state_bytes"]  # replicas


def test_two_process_fsdp_matches_single_process_and_its_checkpoint_resumes_anywhere(tmp_path):
    """--fsdp: the sharded run trains as one process does, each rank holds about half of the state,
    validation decodes on both ranks alike, and its checkpoint (gathered by rank 0) is an ordinary one:
    the model loads whole and a single-process trainer resumes its optimizer state."""
    from sparse_t5 import SparseT5ForConditionalGeneration
    from sparse_t5.dsi.docids import DocidMapping
    from sparse_t5.dsi.examples import Example

    r0, r1, one = _two_ranks_then_one(tmp_path, "fsdp")
    assert r0["sharded"] and not one["sharded"]
    assert r0["generated"] == r1["generated"]  # the collective validation saw the same model on both ranks
    for r in (r0, r1):  # half of values, gradients and moments (to a row), the index buffers whole
        assert r["state_bytes"] <= 0.6 * one["state_bytes"], (r["state_bytes"], one["state_bytes"])
    path = str(tmp_path / "run2" / "last")  # written by rank 0 from the gathered shards
    model = SparseT5ForConditionalGeneration.from_pretrained(path)
    mapping = DocidMapping.load(os.path.join(path, "docids.json"))
    assert torch.cat([p.detach().flatten() for p in model.parameters()]).tolist() == r0["params"]
    blob = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    saved = blob["optimizer"]
    params = list(model.parameters())
    assert sorted(saved["state"]) == list(range(len(params)))  # torch's layout, every parameter
    for i, p in enumerate(params):  # whole moments, not one rank's shard
        assert saved["state"][i]["exp_avg"].shape == p.shape
    trainer = Trainer(model, None, mapping, [Example("text", "0", "query")], TrainConfig(device="cpu"),
                      str(tmp_path / "resumed"), progress=False, log=lambda *_: None)
    trainer.resume(path)  # one process resumes what two sharded ranks saved
    for i, p in enumerate(params):
        torch.testing.assert_close(trainer.optimizer.state[p]["exp_avg_sq"], saved["state"][i]["exp_avg_sq"])
    assert trainer.state["global_step"] == blob["state"]["global_step"] == 8  # 2 epochs x 32 / 8


def test_two_process_fsdp_with_8bit_moments_checkpoints_for_one_process(tmp_path):
    """--fsdp --optim adamw8bit: each rank quantizes its shards' moments; the checkpoint holds them
    gathered and quantized again in one process's layout (sparse_t5/optim.py, full_state_dict), so a
    single-process trainer resumes it with quantized moments. (The moments' own round trip through
    shards is bounded in tests/test_distributed.py.)"""
    pytest.importorskip("torchao.optim", reason="make test installs torchao (the lowbit extra)")
    from sparse_t5 import SparseT5ForConditionalGeneration
    from sparse_t5.dsi.docids import DocidMapping
    from sparse_t5.dsi.examples import Example
    from sparse_t5.optim import _whole_moments

    r0, r1 = _two_ranks_then_one(tmp_path, "fsdp", then_one=False, optim="adamw8bit")
    assert r0["sharded"] and r0["params"] == r1["params"] and r0["generated"] == r1["generated"]
    assert r0["loss"] == r0["loss"]  # not NaN
    path = str(tmp_path / "run2" / "last")
    model = SparseT5ForConditionalGeneration.from_pretrained(path)
    assert torch.cat([p.detach().flatten() for p in model.parameters()]).tolist() == r0["params"]
    saved = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["optimizer"]
    params = list(model.parameters())
    assert sorted(saved["state"]) == list(range(len(params)))
    trainer = Trainer(model, None, DocidMapping.load(os.path.join(path, "docids.json")), [Example("text", "0", "query")],
                      TrainConfig(device="cpu", optim="adamw8bit"), str(tmp_path / "resumed"), progress=False,
                      log=lambda *_: None)
    trainer.resume(path)
    quantized = [p for p in params if type(trainer.optimizer.state[p]["exp_avg"]).__name__ == "OptimState8bit"]
    assert quantized and sum(p.numel() for p in quantized) >= 0.5 * sum(p.numel() for p in params)
    for i, p in enumerate(params):  # the whole moments, in this process's layout
        torch.testing.assert_close(_whole_moments(trainer.optimizer.state[p]), _whole_moments(saved["state"][i]))


@pytest.mark.parametrize("argv,message", [
    (["dsi", "run", "--prune", "bsr:0.5"], "unknown sparse format"),
    (["dsi", "run", "--prune", "1.2"], r"sparsity must be in \[0, 1\)"),
    (["dsi", "run", "--fsdp", "--gradual"], r"gradual pruning cannot run with FSDP2 \(--fsdp"),
    (["dsi", "prune", "--checkpoint", ".", "--sparsity", "-0.1", "--output", "x"], r"sparsity must be in \[0, 1\)"),
    (["dsi", "run", "--corpus", "/nonexistent/corpus.jsonl"], "file not found"),
    (["dsi", "evaluate", "--checkpoint", "/nonexistent/ckpt"], "directory not found"),
    (["dsi", "run", "--optim", "adam9bit"], "invalid choice: 'adam9bit'"),
    (["dsi", "run", "--recover-master-weights"], r"master_weights .* needs precision='bf16'"),
])
def test_bad_cli_input_gets_a_clear_error(capsys, argv, message):
    from sparse_t5.cli import main

    try:  # argparse exits on what it checks; main returns 2 on what the configs check
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_cli_help_explains_every_option(capsys):
    from sparse_t5.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "group").choices["dsi"]
    for name, cmd in next(a for a in sub._actions if a.dest == "command").choices.items():
        for action in cmd._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"dsi {name} {action.option_strings} has no help"


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "cuda:x"])
def test_a_device_this_machine_lacks_is_a_clear_error(capsys, tmp_path, device):
    from sparse_t5.cli import main

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert main(["dsi", "train", "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-t5: error:") and f"{device!r}" in err, err


@pytest.mark.parametrize("argv", [["dsi", "evaluate", "--checkpoint", "."], ["dsi", "bm25"],
                                  ["dsi", "recover", "--checkpoint", "."], ["dsi", "run"], ["dsi", "train"]])
def test_every_command_builds_its_run_config_with_the_dataclass_defaults(argv):
    """The configs are the one source of defaults: each command without options builds exactly the
    RunConfig, TrainConfig and RecoverConfig defaults (evaluate and bm25 have no training options;
    building their config once raised AttributeError)."""
    from sparse_t5.cli import _run_config, build_parser
    from sparse_t5.dsi.pipeline import RunConfig
    from sparse_t5.dsi.trainer import RecoverConfig, TrainConfig

    cfg = _run_config(build_parser().parse_args(argv))
    expected = RunConfig(prune=[] if argv[1] == "train" else RunConfig().prune)
    assert cfg == expected, (cfg, expected)
    assert type(cfg.recover) is RecoverConfig and cfg.recover.epochs < TrainConfig().epochs
    # whole-document indexing and pseudo-queries by default, for any corpus
    assert cfg.train.pseudo_queries > 0 and cfg.train.index_stride == 0


def test_cli_options_reach_the_phase_they_name():
    from sparse_t5.cli import _run_config, build_parser

    cfg = _run_config(build_parser().parse_args(
        ["dsi", "run", "--epochs", "3", "--recover-epochs", "2", "--recover-lr", "0.5", "--beam", "4",
         "--patience", "5", "--fixed-pseudo-queries", "--docids", "naive", "--out", "x", "--seed", "7"]))
    assert (cfg.train.epochs, cfg.recover.epochs, cfg.recover.lr, cfg.train.lr) == (3, 2, 0.5, 2e-3)
    assert cfg.train.eval_beam == cfg.recover.eval_beam == 4 and cfg.train.early_stopping_patience == 5
    assert cfg.recover.early_stopping_patience == 0 and not cfg.train.resample_pseudo_queries
    assert (cfg.docid_scheme, cfg.out_dir, cfg.seed, cfg.train.seed, cfg.recover.seed) == ("naive", "x", 7, 7, 7)
    recover = _run_config(build_parser().parse_args(["dsi", "recover", "--checkpoint", ".", "--epochs", "4"]))
    assert recover.recover.epochs == 4
    cfg = _run_config(build_parser().parse_args(
        ["dsi", "run", "--recover-precision", "bf16", "--recover-optim", "adamw8bit", "--recover-master-weights"]))
    assert (cfg.recover.precision, cfg.recover.optim, cfg.recover.master_weights) == ("bf16", "adamw8bit", True)
    assert (cfg.train.precision, cfg.train.optim, cfg.train.master_weights) == ("fp32", "adamw", False)
