"""The device path of edit gives the CPU's bits: the same torch code runs on CUDA when there is a
GPU and on the CPU here (``torch:cpu``), so the CUDA test only adds the device itself."""

import pytest

import deltastream as ds
from deltastream.errors import ParameterError
from deltastream.methods import METHODS

from common import make_pair, read_raw

SPECS = {"layers.0.mlp.w": ("BF16", (64, 48)), "layers.0.attn.w": ("F16", (32, 40)),
         "layers.1.mlp.w": ("F32", (24, 16)), "layers.0.norm": ("BF16", (48,))}
#: every lossy method with each parameter set it declares: the torch paths, and the CPU fallback
CASES = [(name, params) for name, cls in sorted(METHODS.items()) if cls.lossy for params in cls.examples or ({},)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    return tmp, *make_pair(str(tmp), SPECS, seed=4)


def _counting(monkeypatch, role: str) -> list:
    """Count the chunks that found a registered torch implementation of ``role``."""
    from deltastream.methods import backends

    calls = []
    original = backends.find

    def find(method, r, device, dtype_name):
        fn = original(method, r, device, dtype_name)
        if fn is not None and r == role and device != "cpu":
            calls.append(1)
        return fn
    monkeypatch.setattr(backends, "find", find)
    return calls


def _has_torch(method, params, role: str) -> bool:
    from deltastream.methods import backends, get_method

    return backends.find(get_method(method, **params), role, "torch:cpu", "BF16") is not None


def _check(pair, device, method, params):
    tmp, base, ft = pair
    tag = f"{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
    cpu = ds.edit(base, ft, str(tmp / f"cpu-{tag}"), method, chunk_size=700, seed=2, overwrite=True, **params)
    dev = ds.edit(base, ft, str(tmp / f"dev-{tag}"), method, chunk_size=700, seed=2, overwrite=True,
                  device=device, **params)
    assert read_raw(dev) == read_raw(cpu)


@pytest.mark.parametrize("method,params", CASES)
def test_torch_kernels_give_the_numpy_bits(pair, method, params, monkeypatch):
    calls = _counting(monkeypatch, "edit")
    _check(pair, "torch:cpu", method, params)
    # the chunks of the edited tensors ran on the torch path where a kernel exists
    assert bool(calls) == _has_torch(method, params, "edit")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method,params", CASES)
def test_cuda_gives_the_cpu_bits(pair, method, params):
    _check(pair, "cuda", method, params)


def test_device_names(pair):
    from deltastream.device import resolve_device

    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ParameterError, match="--device must be auto, cpu or cuda"):
        resolve_device("tpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ParameterError, match="torch sees no CUDA device"):
            resolve_device("cuda")


APPLY_CASES = [(name, params) for name, cls in sorted(METHODS.items()) if cls.compact
               for params in [{}, *cls.examples]]


def _check_apply(pair, device, method, params):
    tmp, base, ft = pair
    tag = f"{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
    art = ds.compress(base, ft, str(tmp / f"{tag}.dsz"), method, chunk_size=700, seed=3, overwrite=True, **params)
    cpu = ds.apply(base, art, str(tmp / f"acpu-{tag}"), overwrite=True)
    dev = ds.apply(base, art, str(tmp / f"adev-{tag}"), overwrite=True, device=device)
    assert read_raw(dev) == read_raw(cpu)


@pytest.mark.parametrize("method,params", APPLY_CASES)
def test_torch_decoders_give_the_numpy_bits(pair, method, params, monkeypatch):
    calls = _counting(monkeypatch, "decode")
    _check_apply(pair, "torch:cpu", method, params)
    assert bool(calls) == _has_torch(method, params, "decode")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method,params", APPLY_CASES)
def test_cuda_decoders_give_the_cpu_bits(pair, method, params):
    _check_apply(pair, "cuda", method, params)


def _chunk_files(art: str) -> dict:
    import os

    out = {}
    for folder, _, files in os.walk(art):
        for f in files:
            if f.isdigit() or f.startswith("state."):
                with open(os.path.join(folder, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(folder, f), art)] = fh.read()
    return out


@pytest.mark.parametrize("method,params", APPLY_CASES + [("bitdelta", {"per": "row"})])
def test_torch_encoders_write_the_numpy_bytes(pair, method, params, monkeypatch):
    tmp, base, ft = pair
    calls = _counting(monkeypatch, "encode")
    tag = f"{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
    cpu = ds.compress(base, ft, str(tmp / f"ecpu-{tag}.dsz"), method, chunk_size=700, seed=3, overwrite=True,
                      **params)
    dev = ds.compress(base, ft, str(tmp / f"edev-{tag}.dsz"), method, chunk_size=700, seed=3, overwrite=True,
                      device="torch:cpu", **params)
    assert _chunk_files(dev) == _chunk_files(cpu)
    assert [t["stored_bytes"] for t in ds.info(dev)["tensors"]] == [t["stored_bytes"] for t in ds.info(cpu)["tensors"]]
    assert read_raw(ds.apply(base, dev, str(tmp / f"e-{tag}"), overwrite=True)) == \
        read_raw(ds.apply(base, cpu, str(tmp / f"c-{tag}"), overwrite=True))
    assert bool(calls) == _has_torch(method, params, "encode")
