"""`sparse-t5 tune` (sparse_t5/tune.py) and how the auto policy picks its table
(sparse_t5/kernel_policy.py select_table): a table tuned on this machine first, the committed one
as the fallback, and a corrupt or foreign table refused with a message naming the file."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import T5Config

from sparse_t5.kernel_policy import (TABLE_DIR, KernelTableError, choose_method, get_csr_few_tokens_kernel, machine_key,
                                     read_table, select_table, table_info, tuned_table_path)
from sparse_t5.ops import cpu_isa
from sparse_t5.tune import measure, model_shapes, tune

COMMITTED = os.path.join(TABLE_DIR, "cpu.json")
TINY = dict(shapes=[(64, 32)], tokens=(1, 16), densities=(0.25,), rounds=1)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache; afterwards the process goes back to the table its real cache selects."""
    monkeypatch.setenv("SPARSE_T5_CACHE", str(tmp_path))
    select_table("cpu")  # as a process on a machine without a tuned table starts (whatever this one's cache holds)
    yield tmp_path
    monkeypatch.undo()
    select_table("cpu")


def _row(**kw):
    return {"op": "csr_linear", "dtype": "float32", "tokens": 16, "out": 64, "in": 32, "density": 0.25,
            "method": "sparse", **kw}


def test_tune_writes_a_table_that_the_auto_policy_then_uses(user_cache):
    assert table_info()["source"] == "committed"
    info = tune(**TINY)
    path = tuned_table_path()
    assert info["source"] == "tuned" and info["path"] == path and path.startswith(str(user_cache))
    table = json.load(open(path))
    assert table["key"] == machine_key()
    # 3 CSR ops and 3 2:4 ops at 2 token counts, each with its methods' medians and the fastest chosen
    assert len(table["rows"]) == 12 and info["rows"] == 12 and info["completed_from_committed"] == []
    for row in table["rows"]:
        methods = ("sparse", "dense", "mkl") if row["op"] == "csr_linear" else ("sparse", "dense")
        if row["op"] == "csr_linear" and row["tokens"] > 3:  # the tiled kernel: its narrow tile where it differs
            a = (row["tokens"], torch.float32, round(row["density"] * row["out"] * row["in"]), row["out"], row["in"])
            if torch.ops.sparse_t5.csr_forward_tiling(*a, "sparse_narrow") != torch.ops.sparse_t5.csr_forward_tiling(*a):
                methods += ("sparse_narrow",)
        assert set(row["ms"]) == set(methods), row
        assert row["method"] == min(methods, key=lambda m: row["ms"][m]), row
        got = choose_method("cpu", row["op"], torch.float32, row["tokens"], row["out"], row["in"], row["density"])
        assert got == row["method"], row
    # the few-token kernel this machine measured faster, installed with the table
    few = table["csr_few_tokens_kernel"]
    if cpu_isa() == "avx512":
        assert set(table["csr_few_tokens_kernel_ms"]) == {"scalar", "gather"}
        assert few == min(table["csr_few_tokens_kernel_ms"], key=table["csr_few_tokens_kernel_ms"].get)
    else:
        assert few == "scalar"
    assert info["csr_few_tokens_kernel"] == get_csr_few_tokens_kernel() == few
    # a new process on this machine picks it up, and says so in its log
    code = ("import logging; logging.basicConfig(level=logging.INFO); import sparse_t5; "
            "from sparse_t5.kernel_policy import table_info; print(table_info()['source'])")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "tuned", out.stderr[-2000:]
    assert f"tuned on this machine ({path}" in out.stderr


def test_tune_times_the_narrow_tile_where_it_differs_from_the_rule():
    """The CSR forward's "sparse_narrow" method is timed, and can be chosen, only at calls where its
    tile differs from the rule's (dense rows past 1024 inputs at 64 tokens; not at 16 tokens, where
    the rule already gives 2 vectors, nor at 3, the few-token path)."""
    rows = measure("cpu", (torch.float32,), [(40, 1100)], [3, 16, 64], [0.6], rounds=1)
    forward = {r["tokens"]: r for r in rows if r["op"] == "csr_linear"}
    assert set(forward[64]["ms"]) == {"sparse", "dense", "mkl", "sparse_narrow"}
    assert forward[64]["method"] == min(forward[64]["ms"], key=forward[64]["ms"].get)
    assert "sparse_narrow" not in forward[16]["ms"] and "sparse_narrow" not in forward[3]["ms"]
    assert all("sparse_narrow" not in r["ms"] for r in rows if r["op"] != "csr_linear")


def test_without_a_tuned_table_the_committed_one_is_used(user_cache):
    info = select_table("cpu")
    assert info["source"] == "committed" and info["path"] == COMMITTED
    assert info["rows"] == len(json.load(open(COMMITTED))["rows"]) and info["key"] == machine_key()
    # the table is per thread count: a table tuned at another count is not this machine's
    tune(**TINY)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert tuned_table_path() != tuned_table_path({**machine_key(), "torch_threads": threads})
        assert select_table("cpu")["source"] == "committed"
    finally:
        torch.set_num_threads(threads)
    assert select_table("cpu")["source"] == "tuned"


def test_a_tuned_table_missing_ops_takes_them_from_the_committed_one(user_cache):
    path = tuned_table_path()
    os.makedirs(os.path.dirname(path))
    json.dump({"key": machine_key(), "rows": [_row(method="dense")]}, open(path, "w"))
    info = select_table("cpu")
    committed = json.load(open(COMMITTED))["rows"]
    others = [r for r in committed if r["op"] != "csr_linear"]
    assert info["source"] == "tuned" and info["rows"] == 1 + len(others)
    assert "csr_sddmm/float32" in info["completed_from_committed"]
    assert "csr_linear/float32" not in info["completed_from_committed"]
    # the tuned row decides csr_linear everywhere (the committed rows for it are not mixed in) ...
    assert choose_method("cpu", "csr_linear", torch.float32, 1024, 3072, 768, 0.1) == "dense"
    # ... and the committed rows decide the rest
    r = others[0]
    assert choose_method("cpu", r["op"], torch.float32, r["tokens"], r["out"], r["in"], r["density"]) == r["method"]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a table sparse-t5 wrote"),
    (json.dumps({"rows": []}), "no rows"),
    (json.dumps({"rows": [_row(method="fastest")]}), "malformed kernel table row"),
    (json.dumps({"rows": [_row(op="conv2d")]}), "malformed kernel table row"),
    (json.dumps({"rows": [{"op": "csr_linear"}]}), "not a table sparse-t5 wrote"),
    (json.dumps([1, 2]), "no rows"),
    (json.dumps({"rows": [_row()], "csr_few_tokens_kernel": "vector"}), "csr_few_tokens_kernel 'vector' is not one of"),
])
def test_a_corrupt_tuned_table_is_refused_naming_the_file(user_cache, content, message):
    path = tuned_table_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(KernelTableError, match=message) as err:
        read_table(path)
    assert path in str(err.value) and "sparse-t5 tune" in str(err.value)
    with pytest.warns(UserWarning, match="using the committed table"):
        info = select_table("cpu")
    assert info["source"] == "committed" and path in info["refused"]
    # an import beside it still works, warns once, and runs on the committed table
    code = "import sparse_t5; from sparse_t5.kernel_policy import table_info; print(table_info()['source'])"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "committed", out.stderr[-2000:]
    assert out.stderr.count(path) == 1


def test_the_table_sets_the_few_token_kernel_and_the_committed_one_takes_scalar(user_cache):
    path = tuned_table_path()
    os.makedirs(os.path.dirname(path))
    json.dump({"key": machine_key(), "rows": [_row()], "csr_few_tokens_kernel": "gather"}, open(path, "w"))
    assert select_table("cpu")["csr_few_tokens_kernel"] == get_csr_few_tokens_kernel() == "gather"
    os.remove(path)
    info = select_table("cpu")
    assert info["source"] == "committed" and info["csr_few_tokens_kernel"] == get_csr_few_tokens_kernel() == "scalar"


def test_a_table_tuned_on_another_machine_is_refused(user_cache):
    path = tuned_table_path()
    os.makedirs(os.path.dirname(path))
    foreign = {**machine_key(), "cpu": "Some Other CPU"}
    json.dump({"key": foreign, "rows": [_row()]}, open(path, "w"))
    with pytest.raises(KernelTableError, match="tuned on another machine"):
        read_table(path, machine_key())
    read_table(path)  # a well-formed table: usable when asked for by path (kernel_policy.load_table)
    with pytest.warns(UserWarning, match="another machine"):
        assert select_table("cpu")["source"] == "committed"


def test_tune_to_an_explicit_path_installs_it_without_touching_the_cache(user_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tables") / "mine.json")
    info = tune(**TINY, path=out)
    assert info["source"] == "file" and info["path"] == out and os.path.isfile(out)
    assert not os.path.exists(tuned_table_path())


def test_tune_rejects_a_bad_grid(user_cache):
    with pytest.raises(ValueError, match="densities"):
        tune(shapes=[(64, 32)], densities=(1.5,))
    with pytest.raises(ValueError, match="token counts"):
        tune(shapes=[(64, 32)], tokens=(0,))
    assert not os.path.exists(tuned_table_path())


def test_model_shapes_are_the_configs_own_layers():
    config = T5Config(d_model=48, d_ff=96, num_heads=4, d_kv=16)  # inner 64 != d_model
    assert model_shapes(config) == [(96, 48), (48, 96), (64, 48), (48, 64)]
    assert model_shapes(T5Config(d_model=64, d_ff=128, num_heads=4, d_kv=16)) == [(128, 64), (64, 128), (64, 64)]


def test_tune_command(user_cache, tmp_path):
    T5Config(d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=64).save_pretrained(tmp_path / "model")
    run = lambda *args: subprocess.run([sys.executable, "-m", "sparse_t5.cli", "tune", *args],  # noqa: E731
                                       env=dict(os.environ), capture_output=True, text=True, timeout=300)
    out = run("--show")
    assert out.returncode == 0 and "committed" in out.stdout and "sparse-t5 tune" in out.stdout, out.stderr
    out = run("--model", str(tmp_path / "model"), "--tokens", "1", "--densities", "0.5", "--rounds", "1")
    assert out.returncode == 0 and "tuned (" in out.stdout, out.stderr[-2000:]
    rows = json.load(open(tuned_table_path()))["rows"]
    assert {(r["out"], r["in"]) for r in rows} == {(64, 32), (32, 64), (32, 32)}
    out = run("--show")
    assert out.returncode == 0 and "tuned (" in out.stdout
    out = run("--densities", "0")
    assert out.returncode == 2 and "densities must be in (0, 1]" in out.stderr
    out = run("--model", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such directory" in out.stderr, out.stderr
