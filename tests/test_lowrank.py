"""lowrank: Twin-Merging's rank-r SVD of each matrix's delta, by an out-of-core randomized SVD."""

import functools
import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.errors import CheckpointError, ParameterError
from deltastream.jobs.edit import edit as _edit_job
from deltastream.methods import get_method, method_from_config
from deltastream.methods.lowrank import LowRank, _pieces

from common import make_pair, read_raw, run_cli, write_checkpoint

edit_job = functools.partial(_edit_job, keep_state=True)  # white-box tests read the factors

# --- fixtures: checkpoints whose delta is low rank + a little noise ----------------------------

def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (an independent reference)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def bf16_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def lowrank_delta(rng, d, k, rank=24, decay=0.8, noise=2e-6):
    """A delta with singular values 1e-2 * decay^i (i < rank) plus small dense noise."""
    s = 1e-2 * decay ** np.arange(rank)
    left = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((k, rank)))[0]
    return ((left * s) @ right.T + rng.standard_normal((d, k)) * noise).astype(np.float32)


def write_pair(tmp, tensors: dict, seed=0):
    """tensors: {name: (dtype, shape)}; 2-D float tensors get a low-rank delta, others a random one."""
    rng = np.random.default_rng(seed)
    base, ft, floats = {}, {}, {}
    for name, (dtype, shape) in tensors.items():
        w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if len(shape) == 2 and min(shape) > 0:
            delta = lowrank_delta(rng, *shape, rank=min(24, min(shape)))
        else:
            delta = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        if dtype == "BF16":
            b, f = bf16_bits(w), bf16_bits(w + delta)
            floats[name] = (bf16_float(b), bf16_float(f))
        else:
            b, f = w, (w + delta).astype(np.float32)
            floats[name] = (b, f)
        base[name] = (dtype, shape, b.view(np.uint8).ravel())
        ft[name] = (dtype, shape, f.view(np.uint8).ravel())
    return (write_checkpoint(os.path.join(tmp, "base"), base),
            write_checkpoint(os.path.join(tmp, "ft"), ft), floats)


def as_float(raw_entry) -> np.ndarray:
    dtype, shape, data = raw_entry
    if dtype == "BF16":
        return bf16_float(np.frombuffer(data, "<u2")).reshape(shape)
    return np.frombuffer(data, "<f4").reshape(shape)


def optimal_error(delta: np.ndarray, r: int) -> float:
    u, s, vt = np.linalg.svd(delta.astype(np.float32))
    approx = (u[:, :r] * s[:r]) @ vt[:r]
    return float(np.linalg.norm(delta - approx) / np.linalg.norm(delta))


# --- parameters ----------------------------------------------------------------------------------

def test_registered_with_defaults_and_config_round_trip():
    m = get_method("lowrank")
    assert isinstance(m, LowRank)
    assert (m.params.rank_fraction, m.params.oversample, m.params.power_iters) == (0.1, 8, 2)
    m2 = get_method("lowrank", rank_fraction="0.25", oversample="4", power_iters="0")  # CLI strings
    assert method_from_config(m2.get_config()) == m2
    assert m.accepts((4, 5)) and not m.accepts((20,)) and not m.accepts((2, 3, 4))
    assert m.pre_passes((100, 50)) == 6 and m2.pre_passes((100, 50)) == 2


@pytest.mark.parametrize("params, key", [
    ({"rank_fraction": 0}, "rank_fraction"), ({"rank_fraction": 1.5}, "rank_fraction"),
    ({"rank_fraction": float("nan")}, "rank_fraction"), ({"power_iters": -1}, "power_iters"),
    ({"power_iters": 1.5}, "power_iters"), ({"oversample": -1}, "oversample"), ({"rank": 4}, "rank"),
])
def test_bad_params_name_the_key(params, key):
    with pytest.raises(ParameterError, match=key):
        get_method("lowrank", **params)
    with pytest.raises(ParameterError, match=key):  # before any I/O: the paths need not exist
        ds.edit("/nonexistent/base", "/nonexistent/ft", "/nonexistent/out", "lowrank", **params)


@pytest.mark.parametrize("start, stop, k", [(0, 12, 4), (3, 5, 4), (2, 17, 4), (5, 13, 4), (0, 3, 7),
                                            (7, 21, 7), (6, 8, 7)])
def test_chunk_pieces_cover_the_chunk_in_order(start, stop, k):
    covered = []
    for p in _pieces(start, stop, k):
        if hasattr(p, "n"):
            covered += list(range(p.row0 * k, (p.row0 + p.n) * k))
        else:
            covered += list(range(p.row * k + p.c0, p.row * k + p.c1))
    assert covered == list(range(start, stop))


# --- accuracy ------------------------------------------------------------------------------------

def test_close_to_the_exact_truncated_svd_and_power_iterations_help(tmp_path):
    base, ft, floats = write_pair(str(tmp_path), {"layers.0.mlp.w": ("F32", (256, 192))})
    b, f = floats["layers.0.mlp.w"]
    delta = f - b
    r = int(0.1 * 192)
    opt = optimal_error(delta, r)
    errors = {}
    for q in (0, 2):
        out, jobs = edit_job(base, ft, str(tmp_path / f"q{q}"), LowRank(power_iters=q))
        got = as_float(read_raw(out)["layers.0.mlp.w"]) - b
        errors[q] = float(np.linalg.norm(got - delta) / np.linalg.norm(delta))
        state = jobs[0].state
        assert state["rank"] == r and state["sketch"] == r + 8
        assert state["_us"].shape == (256, r) and state["vt"].shape == (r, 192)
        assert state["rel_error"] == pytest.approx(errors[q], rel=1e-3)  # the reported error is the real one
        np.testing.assert_allclose(state["vt"] @ state["vt"].T, np.eye(r), atol=1e-5)
    assert opt <= errors[2] <= opt * 1.01
    assert errors[0] >= errors[2]


def test_full_rank_reproduces_the_fine_tune(tmp_path):
    base, ft, floats = write_pair(str(tmp_path), {"w": ("F32", (12, 9))})
    b, f = floats["w"]
    out = ds.edit(base, ft, str(tmp_path / "out"), "lowrank", rank_fraction=1.0, chunk_size=64)
    got = as_float(read_raw(out)["w"])
    np.testing.assert_allclose(got - b, f - b, atol=1e-6 * np.abs(f - b).max())


def test_rank_zero_drops_the_delta(tmp_path):
    """Twin's r = int(density * min(d, k)) is 0 for an 8 x 6 matrix at 0.1: no singular value kept."""
    base, ft, _ = write_pair(str(tmp_path), {"w": ("BF16", (8, 6)), "big": ("BF16", (20, 30))})
    out = ds.edit(base, ft, str(tmp_path / "out"), "lowrank")
    assert read_raw(out)["w"] == read_raw(base)["w"]
    assert read_raw(out)["big"] != read_raw(base)["big"]
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"), "lowrank")
    assert read_raw(ds.apply(base, art, str(tmp_path / "rebuilt"))) == read_raw(out)


def test_unchanged_matrix_stays_the_base_and_stores_no_chunk(tmp_path):
    base, _, _ = write_pair(str(tmp_path), {"w": ("BF16", (40, 37))})
    out = ds.edit(base, base, str(tmp_path / "out"), "lowrank", chunk_size=64)
    assert read_raw(out) == read_raw(base)
    art = ds.compress(base, base, str(tmp_path / "a.dsz"), "lowrank", chunk_size=64)
    assert ds.info(art)["tensors"][0]["unchanged"]
    assert read_raw(ds.apply(base, art, str(tmp_path / "rebuilt"))) == read_raw(base)


# --- edit, compress, apply -----------------------------------------------------------------------

def test_edit_is_base_plus_the_reconstruction_rounded(tmp_path):
    base, ft, floats = write_pair(str(tmp_path), {"layers.0.attn.w": ("BF16", (96, 64))})
    b, _ = floats["layers.0.attn.w"]
    out, jobs = edit_job(base, ft, str(tmp_path / "out"), LowRank())
    state = jobs[0].state
    expected = bf16_bits(b + state["_us"] @ state["vt"])
    assert read_raw(out)["layers.0.attn.w"][2] == expected.tobytes()


SPECS = {
    "model.layers.0.mlp.up_proj.weight": ("BF16", (48, 64)),
    "model.layers.0.self_attn.o_proj.weight": ("BF16", (40, 37)),  # rows of 74 B: chunks split rows
    "model.layers.0.mlp.down_proj.weight": ("F32", (33, 50)),
    "model.norm.weight": ("BF16", (64,)),
    "model.layers.0.mlp.bias": ("F32", (50,)),
    "model.embed_tokens.weight": ("BF16", (30, 16)),
    "lm_head.weight": ("BF16", (30, 16)),
}


@pytest.mark.parametrize("chunk_size", [64, 1024, None])
def test_compress_apply_equals_edit_bit_for_bit(tmp_path, chunk_size):
    base, ft, _ = write_pair(str(tmp_path), SPECS)
    edited = ds.edit(base, ft, str(tmp_path / "edited"), "lowrank", chunk_size=chunk_size)
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"), "lowrank", chunk_size=chunk_size)
    rebuilt = ds.apply(base, art, str(tmp_path / "rebuilt"), workers=1)
    assert read_raw(rebuilt) == read_raw(edited)
    ds.verify(art, base)
    info = {t["name"]: t for t in ds.info(art)["tensors"]}
    for name, (_dtype, shape) in SPECS.items():
        assert info[name]["policy"] == ("lowrank" if len(shape) == 2 and "embed" not in name
                                        and "lm_head" not in name else "lossless")


def test_stored_factors_are_u_s_rows_and_vt(tmp_path):
    import zarr

    base, ft, _ = write_pair(str(tmp_path), {"w": ("BF16", (48, 64))})
    _, jobs = edit_job(base, ft, str(tmp_path / "out"), LowRank(), chunk_bytes=1024)
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"), "lowrank", chunk_size=1024)
    u = zarr.open_array(store=art, path="tensors/000000/u", mode="r")[:]
    vt = zarr.open_array(store=art, path="tensors/000000/state.vt", mode="r")[:]
    np.testing.assert_array_equal(u, jobs[0].state["_us"].ravel())  # whole-row chunks: u is U_r S_r
    np.testing.assert_array_equal(vt, jobs[0].state["vt"].ravel())
    assert sorted(os.listdir(os.path.join(art, "tensors/000000"))) == ["state.vt", "u", "zarr.json"]
    r = int(0.1 * 48)
    entry = ds.info(art)["tensors"][0]
    assert entry["stored_bytes"] < 4 * r * (48 + 64) * 1.2 + 4096  # factors + metadata, no Q or U
    assert entry["stored_bytes"] < entry["bytes"]


def test_one_dimensional_tensors_and_embeddings_are_untouched(tmp_path):
    base, ft, _ = write_pair(str(tmp_path), {**SPECS, "cube": ("F32", (3, 4, 5))})
    fine = read_raw(ft)
    out = read_raw(ds.edit(base, ft, str(tmp_path / "out"), "lowrank", chunk_size=64))
    for name in ("model.norm.weight", "model.layers.0.mlp.bias", "model.embed_tokens.weight", "lm_head.weight",
                 "cube"):
        assert out[name] == fine[name], name
    assert out["model.layers.0.mlp.up_proj.weight"] != fine["model.layers.0.mlp.up_proj.weight"]
    # include puts embeddings under the method; a 3-D tensor stays exact (lowrank takes matrices)
    out = read_raw(ds.edit(base, ft, str(tmp_path / "inc"), "lowrank", include=("*",)))
    assert out["model.embed_tokens.weight"] != fine["model.embed_tokens.weight"]
    assert out["cube"] == fine["cube"] and out["model.norm.weight"] == fine["model.norm.weight"]


# --- chunking, workers, determinism ----------------------------------------------------------------

def test_chunk_sizes_give_close_outputs(tmp_path):
    specs = {"a": ("F32", (64, 48)), "b": ("F32", (40, 37))}
    base, ft, floats = write_pair(str(tmp_path), specs)
    outs = {cs: read_raw(ds.edit(base, ft, str(tmp_path / f"o{cs}"), "lowrank", chunk_size=cs))
            for cs in (64, 1024, None)}
    for name in specs:
        b, f = floats[name]
        ref = as_float(outs[None][name])
        for cs in (64, 1024):
            got = as_float(outs[cs][name])
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
            np.testing.assert_allclose(got - b, ref - b, rtol=0, atol=1e-5 * np.abs(f - b).max())


@pytest.mark.parametrize("chunk_size", [64, 1024])
def test_worker_count_and_scheduler_do_not_change_the_bits(tmp_path, chunk_size):
    base, ft, _ = write_pair(str(tmp_path), {"a": ("BF16", (48, 64)), "b": ("F32", (40, 37))})
    runs = [read_raw(ds.edit(base, ft, str(tmp_path / f"o{i}"), "lowrank", chunk_size=chunk_size, **kw))
            for i, kw in enumerate([{"workers": 1}, {"workers": 2}, {"scheduler": "sync"}])]
    assert runs[0] == runs[1] == runs[2]
    arts = [ds.compress(base, ft, str(tmp_path / f"a{w}.dsz"), "lowrank", chunk_size=chunk_size, workers=w)
            for w in (1, 2)]
    for role in ("u", "state.vt"):
        folder = os.path.join("tensors", "000000", role, "c")
        files = sorted(os.listdir(os.path.join(arts[0], folder)))
        assert files == sorted(os.listdir(os.path.join(arts[1], folder)))
        for name in files:
            with open(os.path.join(arts[0], folder, name), "rb") as x, \
                 open(os.path.join(arts[1], folder, name), "rb") as y:
                assert x.read() == y.read()


def test_the_seed_changes_only_the_sketch(tmp_path):
    base, ft, floats = write_pair(str(tmp_path), {"w": ("F32", (64, 48))})
    b, f = floats["w"]
    a = as_float(read_raw(ds.edit(base, ft, str(tmp_path / "s0"), "lowrank", seed=0))["w"])
    c = as_float(read_raw(ds.edit(base, ft, str(tmp_path / "s1"), "lowrank", seed=1))["w"])
    assert a.tobytes() != c.tobytes()
    np.testing.assert_allclose(a - b, c - b, atol=1e-4 * np.abs(f - b).max())


# --- bad data, CLI ------------------------------------------------------------------------------

def test_non_finite_delta_names_the_tensor(tmp_path):
    w = np.zeros((16, 8), np.float32)
    f = w.copy()
    f[3, 2] = np.nan
    base = write_checkpoint(str(tmp_path / "b"), {"layers.0.w": ("F32", (16, 8), w.view(np.uint8).ravel())})
    ft = write_checkpoint(str(tmp_path / "f"), {"layers.0.w": ("F32", (16, 8), f.view(np.uint8).ravel())})
    with pytest.raises(CheckpointError, match="tensor 'layers.0.w'.*element 26 is nan"):
        ds.edit(base, ft, str(tmp_path / "out"), "lowrank", rank_fraction=0.5)
    assert not os.path.exists(tmp_path / "out")


def test_cli_edit_and_methods_list(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (32, 24)), "norm": ("F32", (24,))})
    assert run_cli("edit", base, ft, "-o", tmp_path / "out", "--method", "lowrank",
                   "-p", "rank_fraction=0.25", "-p", "power_iters=1", "-q") == 0
    out = read_raw(str(tmp_path / "out"))
    assert out["norm"] == read_raw(ft)["norm"] and out["layers.0.w"] != read_raw(ft)["layers.0.w"]
    assert run_cli("methods") == 0
    assert "lowrank" in capsys.readouterr().out
    assert run_cli("edit", base, ft, "-o", tmp_path / "bad", "--method", "lowrank", "-p", "power_iters=-1") == 2
    assert "power_iters" in capsys.readouterr().err
