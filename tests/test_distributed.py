"""The same graph on a dask.distributed LocalCluster gives the same bits as local threads."""

import os

import pytest

import deltastream as ds

from common import make_pair, read_raw

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c


def test_local_cluster_gives_the_threaded_bits(tmp_path, cluster):
    base, ft = make_pair(str(tmp_path), {"w": ("BF16", (65, 33)), "b": ("F32", (9,)), "e": ("F16", (0,))},
                         shards=2)
    threaded = ds.compress(base, ft, str(tmp_path / "t.dsz"), chunk_size=512)
    on_cluster = ds.compress(base, ft, str(tmp_path / "c.dsz"), chunk_size=512, scheduler=cluster.scheduler_address)
    assert ds.info(threaded)["tensors"] == ds.info(on_cluster)["tensors"]
    chunk_dir = os.path.join("tensors", "000000", "delta", "c")
    for name in os.listdir(os.path.join(threaded, chunk_dir)):
        with open(os.path.join(threaded, chunk_dir, name), "rb") as a, \
             open(os.path.join(on_cluster, chunk_dir, name), "rb") as b:
            assert a.read() == b.read()
    out = ds.apply(base, on_cluster, str(tmp_path / "out"), scheduler=cluster.scheduler_address)
    assert read_raw(out) == read_raw(ft)
    ds.verify(on_cluster, base, scheduler=cluster.scheduler_address)


def test_edit_and_merge_on_a_local_cluster_give_the_threaded_bits(tmp_path, cluster):
    from common import perturb, random_bits, write_checkpoint

    base, ft = make_pair(str(tmp_path), {"layers.0.mlp.w": ("BF16", (48, 32)), "layers.0.norm": ("F32", (32,))})
    address = cluster.scheduler_address
    for method, params in [("dare", {"p": 0.7}), ("bitdelta", {"per": "row"}), ("trim", {"density": 0.3}),
                           ("lowrank", {"rank_fraction": 0.25})]:  # array states, fetched by the workers
        threaded = ds.edit(base, ft, str(tmp_path / f"t-{method}"), method, chunk_size=512, **params)
        clustered = ds.edit(base, ft, str(tmp_path / f"c-{method}"), method, chunk_size=512, scheduler=address,
                            **params)
        assert read_raw(threaded) == read_raw(clustered), method
    import numpy as np

    rng = np.random.default_rng(0)
    raw = read_raw(ft)
    second = {n: (d, s, perturb(rng, d, np.frombuffer(b, np.uint8).copy())) for n, (d, s, b) in raw.items()}
    write_checkpoint(str(tmp_path / "ft2"), second)
    (tmp_path / "m.yaml").write_text(f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                                     f"  - model: {ft}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                                     f"  - model: {tmp_path / 'ft2'}\n    parameters: {{weight: 0.5, density: 0.5}}\n")
    threaded = ds.merge(str(tmp_path / "m.yaml"), str(tmp_path / "mt"), chunk_size=512)
    clustered = ds.merge(str(tmp_path / "m.yaml"), str(tmp_path / "mc"), chunk_size=512, scheduler=address)
    assert read_raw(threaded) == read_raw(clustered)
    assert random_bits  # the kit's generator made the pair


def test_local_n_starts_its_own_cluster(tmp_path):
    base, ft = make_pair(str(tmp_path), {"w": ("BF16", (16, 16))})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"), scheduler="local:2")
    assert read_raw(ds.apply(base, art, str(tmp_path / "out"))) == read_raw(ft)


def test_cli_cluster_option_runs_every_pass_on_one_local_cluster(tmp_path, capsys):
    from common import run_cli

    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (32, 32))})
    assert run_cli("compress", base, ft, "-o", tmp_path / "a.dsz", "--method", "bitdelta", "-q",
                   "--cluster", "local:2") == 0
    threaded = ds.compress(base, ft, str(tmp_path / "t.dsz"), "bitdelta")
    assert read_raw(ds.apply(base, str(tmp_path / "a.dsz"), str(tmp_path / "o1"))) == \
        read_raw(ds.apply(base, threaded, str(tmp_path / "o2")))
    assert run_cli("compress", base, ft, "-o", tmp_path / "b.dsz", "--cluster", "remote") == 2
    assert "--cluster expects local:N" in capsys.readouterr().err
