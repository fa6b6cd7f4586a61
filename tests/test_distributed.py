"""The same graph on a dask.distributed LocalCluster gives the same bits as local threads."""

import os

import pytest
from common import make_pair, read_raw

import deltastream as ds

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
