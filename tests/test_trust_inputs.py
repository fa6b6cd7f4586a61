"""Checkpoint inputs are untrusted: special files, hostile headers, index files and side files
each give one line naming the file (and tensor), leave the inputs as they were and no output;
and a fuzz of safetensors headers agrees with the safetensors library on what is valid."""

import functools
import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltastream.checkpoint import open_checkpoint, read_bits
from deltastream.errors import CheckpointError

from common import error_line, make_pair, read_raw, run_cli, tree_digest, write_safetensors

#: a read that blocks (a FIFO) fails the test instead of hanging the suite
pytestmark = pytest.mark.usefixtures("no_hang")


def rewrite_header_text(path, text: str):
    """Replace a safetensors file's header by raw JSON text (surrogate escapes allowed), keeping the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        data = f.read()
    blob = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def header_text(path) -> str:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode().rstrip()


@pytest.fixture
def pair(tmp_path):
    return make_pair(str(tmp_path), {"layers.0.w": ("BF16", (16, 8)), "norm": ("F32", (8,))},
                     side_files={"config.json": '{"tie_word_embeddings": false}'})


def compress_fails(tmp_path, capsys, base, ft) -> str:
    """Run compress expecting a refusal: one line, inputs byte-identical, no output of any kind."""
    before = tree_digest(base, ft)
    listing = sorted(os.listdir(tmp_path))
    assert run_cli("compress", base, ft, "-o", tmp_path / "out.dsz", "-q") == 2
    line = error_line(capsys)
    assert tree_digest(base, ft) == before
    assert sorted(os.listdir(tmp_path)) == listing  # no out.dsz, no out.dsz.partial
    return line


def ft_file(ft) -> str:
    return os.path.join(ft, "model.safetensors")


# --- case 6: only regular files are read -------------------------------------------------------

def _fifo(path):
    os.remove(path)
    os.mkfifo(path)


def _dev_zero(path):
    os.remove(path)
    os.symlink("/dev/zero", path)


def _folder(path):
    os.remove(path)
    os.mkdir(path)


@pytest.mark.parametrize("make, kind", [(_fifo, "a FIFO"), (_dev_zero, "a character device"),
                                        (_folder, "a folder")])
def test_special_file_as_the_weights_is_refused(tmp_path, capsys, pair, make, kind):
    base, ft = pair
    make(ft_file(ft))
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{ft_file(ft)}': not a regular file ({kind})")


def test_special_file_given_directly_is_refused(tmp_path, capsys, pair):
    base, ft = pair
    fifo = str(tmp_path / "direct.safetensors")
    os.mkfifo(fifo)
    line = compress_fails(tmp_path, capsys, base, fifo)
    assert line.endswith(f"file '{fifo}': not a regular file (a FIFO)")


def test_special_index_and_shard_are_refused(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"a": ("F32", (3,)), "b": ("F32", (3,))}, shards=2)
    shard = os.path.join(ft, "model-00002-of-00002.safetensors")
    _fifo(shard)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{shard}': not a regular file (a FIFO)")
    index = os.path.join(base, "model.safetensors.index.json")
    _fifo(index)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{index}': not a regular file (a FIFO)")


@pytest.mark.parametrize("make, kind", [(_fifo, "a FIFO"), (_dev_zero, "a character device")])
def test_special_side_file_is_refused(tmp_path, capsys, pair, make, kind):
    base, ft = pair
    config = os.path.join(ft, "config.json")
    make(config)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{config}': not a regular file ({kind})")


def test_side_file_over_the_bound_is_refused(tmp_path, capsys, pair, monkeypatch):
    from deltastream.checkpoint import sidefiles

    base, ft = pair
    monkeypatch.setattr(sidefiles, "MAX_SIDE_FILE_BYTES", 10)
    line = compress_fails(tmp_path, capsys, base, ft)
    size = os.path.getsize(os.path.join(ft, "config.json"))
    assert line.endswith(f"file '{os.path.join(ft, 'config.json')}': side file of {size} bytes exceeds "
                         "the 10-byte limit for side files")


def test_side_file_read_refuses_a_file_swapped_for_a_fifo(tmp_path, pair):
    """Found as a regular file, replaced by a FIFO before it is read or copied: refused, not waited on."""
    from deltastream.checkpoint.sidefiles import load_side_file

    _, ft = pair
    ckpt = open_checkpoint(ft)
    _fifo(ckpt.side_files["config.json"])
    with pytest.raises(CheckpointError, match=r"config.json': not a regular file \(a FIFO\)$"):
        load_side_file(ckpt.side_files["config.json"])


def test_symlinked_inputs_are_read(tmp_path, pair):
    """Users link checkpoints and their files: a symlink to a regular file is a regular input."""
    base, ft = pair
    store = tmp_path / "store"
    store.mkdir()
    for name in ("model.safetensors", "config.json"):
        os.rename(os.path.join(ft, name), store / name)
        os.symlink(store / name, os.path.join(ft, name))
    assert run_cli("compress", base, ft, "-o", tmp_path / "a.dsz", "-q") == 0
    assert run_cli("apply", base, tmp_path / "a.dsz", "-o", tmp_path / "out", "-q") == 0
    assert read_raw(str(tmp_path / "out")) == read_raw(ft)
    assert open(tmp_path / "out" / "config.json").read() == open(store / "config.json").read()


# --- case 7: strings that are not UTF-8, numbers that are not u64, one line ---------------------

def _entry(dtype="U8", shape=(4,), offsets=(0, 4)):
    return json.dumps({"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)})


def single(tmp_path, text: str, data: bytes = b"\x01\x02\x03\x04") -> str:
    path = str(tmp_path / "m.safetensors")
    blob = text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("text, shown", [
    ('{"\\ud800":%s}' % _entry(), "'\\ud800'"),
    ('{"a":{"dtype":"U8\\udfff","shape":[4],"data_offsets":[0,4]}}', "'U8\\udfff'"),
    ('{"__metadata__":{"\\ud800":"v"},"a":%s}' % _entry(), "'\\ud800'"),
    ('{"__metadata__":{"k":"\\udbff"},"a":%s}' % _entry(), "'\\udbff'"),
    ('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"note":["x\\ud800"]}}', "'x\\ud800'"),
], ids=["name", "dtype", "metadata key", "metadata value", "ignored field"])
def test_string_that_is_not_utf8_is_refused(tmp_path, text, shown):
    path = single(tmp_path, text)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    assert str(exc.value) == (f"file '{path}': invalid header: the string {shown} holds a lone surrogate "
                              "escape (not valid UTF-8)")


def test_lone_surrogate_name_is_refused_by_compress(tmp_path, capsys, pair):
    base, ft = pair
    text = header_text(ft_file(ft)).replace('"norm"', '"norm\\ud800"')
    rewrite_header_text(ft_file(ft), text)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{ft_file(ft)}': invalid header: the string 'norm\\ud800' holds a "
                         "lone surrogate escape (not valid UTF-8)")


def test_paired_surrogates_are_a_valid_name(tmp_path):
    path = single(tmp_path, '{"\\ud83d\\ude00":%s}' % _entry())
    assert list(open_checkpoint(path).tensors) == ["\U0001f600"]


@pytest.mark.parametrize("number, digits", [("9" * 5000, 5000), (str(2**64), 20), ("1" * 21, 21)],
                         ids=["5000 digits", "2**64", "21 digits"])
def test_number_beyond_u64_is_refused(tmp_path, capsys, pair, number, digits):
    base, ft = pair
    text = header_text(ft_file(ft)).replace('"data_offsets": [0,', f'"data_offsets": [{number},', 1)
    assert number in text
    rewrite_header_text(ft_file(ft), text)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{ft_file(ft)}': invalid header JSON: a {digits}-digit integer is out of "
                         "range (more than 2**64-1)")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_not_json(tmp_path, literal):
    path = single(tmp_path, '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":%s}}' % literal)
    with pytest.raises(CheckpointError, match=f"invalid header JSON: {literal} is not a finite JSON number$"):
        open_checkpoint(path)


def test_negative_zero_is_not_a_size(tmp_path):
    """serde reads -0 as the float -0.0, so safetensors refuses it as a size; so do we."""
    path = single(tmp_path, '{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b"")
    with pytest.raises(CheckpointError, match=r"tensor 'a' in file .*: invalid shape \[-0.0\]$"):
        open_checkpoint(path)


@pytest.mark.parametrize("name", ["a\nb", "a\x1b[31mred", "a\u202eb"])
def test_names_with_control_characters_stay_one_line(tmp_path, capsys, pair, name):
    base, ft = pair
    text = header_text(ft_file(ft)).replace('"norm"', json.dumps(name)).replace('"F32"', '"Q4"')
    rewrite_header_text(ft_file(ft), text)
    line = compress_fails(tmp_path, capsys, base, ft)
    shown = name.replace("\n", "\\x0a").replace("\x1b", "\\x1b").replace("\u202e", "\\u202e")
    assert line.endswith(f"tensor '{shown}' in file '{ft_file(ft)}': unknown dtype 'Q4'")


def test_shown_values_are_escaped_and_bounded(tmp_path):
    path = single(tmp_path, '{"a":{"dtype":"U8","shape":["\\n\\u001b",%s],"data_offsets":[0,4]}}'
                  % ",".join(["1"] * 10_000))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    message = str(exc.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 200
    assert message.startswith(f"tensor 'a' in file '{path}': invalid shape ['\\n\\x1b', 1, 1")


# --- case 18: nesting, sizes beyond u64, metadata and key types ---------------------------------

def test_deep_nesting_in_a_header_is_refused(tmp_path, capsys, pair):
    base, ft = pair
    text = header_text(ft_file(ft)).replace('"norm":', '"x":' + "[" * 100_000 + "]" * 100_000 + ',"norm":')
    rewrite_header_text(ft_file(ft), text)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{ft_file(ft)}': invalid header JSON: nested deeper than 127 levels")


@pytest.mark.parametrize("depth, ok", [(125, True), (126, False)])
def test_nesting_bound_is_safetensors_own(tmp_path, depth, ok):
    """serde_json stops at 128 levels; an ignored field nested up to there is read, one more is not."""
    text = '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":%s}}' % ("[" * depth + "]" * depth)
    path = single(tmp_path, text)
    if ok:
        assert list(open_checkpoint(path).tensors) == ["a"]
    else:
        with pytest.raises(CheckpointError, match="nested deeper than 127 levels$"):
            open_checkpoint(path)


def test_deep_nesting_in_an_index_is_refused(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"a": ("F32", (3,)), "b": ("F32", (3,))}, shards=2)
    index = os.path.join(ft, "model.safetensors.index.json")
    with open(index, "w") as f:
        f.write('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{index}': invalid index JSON: nested deeper than 127 levels")


def test_deep_nesting_in_config_json_is_not_a_traceback(tmp_path, capsys, pair):
    """config.json is read only for tie_word_embeddings: an unreadable one is carried as it is."""
    base, ft = pair
    with open(os.path.join(ft, "config.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    assert run_cli("compress", base, ft, "-o", tmp_path / "a.dsz", "-q") == 0
    assert run_cli("edit", base, ft, "-o", tmp_path / "e", "--method", "dare", "-p", "p=0.5", "-q") == 0


@pytest.mark.parametrize("config, problem", [("[" * 100_000 + "]" * 100_000, "not a JSON object"),
                                             ("[1]", "not a JSON object"), (None, "not a regular file (a FIFO)")],
                         ids=["nested", "a list", "FIFO"])
def test_merge_setting_torch_dtype_reads_config_json_safely(tmp_path, capsys, config, problem):
    base, ft = make_pair(str(tmp_path), {"w": ("F32", (4,))})
    path = os.path.join(base, "config.json")
    if config is None:
        os.mkfifo(path)
    else:
        open(path, "w").write(config)
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                      f"    parameters: {{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n"
                      "dtype: float16\ntokenizer_source: base\n")
    before = tree_digest(base, ft)
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 2
    line = error_line(capsys)
    assert line.endswith(f"file '{path}': " + ("cannot set torch_dtype: " if "JSON" in problem else "") + problem)
    assert tree_digest(base, ft) == before and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("shape, dtype, what", [
    ([0, 2**64], "U8", "a 20-digit integer is out of range (more than 2**64-1)"),
    ([2**32, 2**32, 0], "U8", "shape [4294967296, 4294967296, 0] has more than 2**64-1 elements"),
    ([0, 2**62], "F32", None),  # 0 elements, 0 bytes: valid as safetensors reads it
    ([2**62], "F32", "shape [4611686018427387904] of F32 is more than 2**64-1 bytes"),
], ids=["dim 2**64", "elements", "0 elements", "bytes"])
def test_sizes_beyond_u64_are_refused(tmp_path, shape, dtype, what):
    path = single(tmp_path, '{"a":{"dtype":"%s","shape":%s,"data_offsets":[0,0]}}' % (dtype, shape), b"")
    if what is None:
        assert open_checkpoint(path).tensors["a"].nbytes == 0
        return
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    assert str(exc.value).endswith(what)


def test_huge_zero_element_tensor_is_refused_by_compress(tmp_path, capsys, pair):
    base, ft = pair
    for folder in (base, ft):
        text = header_text(ft_file(folder))
        rewrite_header_text(ft_file(folder), text[:-1] + ',"empty":{"dtype":"U8","shape":[0,%d],'
                            '"data_offsets":[0,0]}}' % 2**64)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert "a 20-digit integer is out of range (more than 2**64-1)" in line


@pytest.mark.parametrize("metadata, ok", [("[]", False), ("null", True), ('{"k":1}', False),
                                          ('{"k":null}', False), ('"x"', False), ("{}", True)])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata, ok):
    """As safetensors: null is no metadata; anything else that is not an object of strings is refused."""
    path = single(tmp_path, '{"__metadata__":%s,"a":%s}' % (metadata, _entry()))
    if ok:
        assert open_checkpoint(path).metadata == {}
    else:
        with pytest.raises(CheckpointError, match=r"invalid header: __metadata__ must map strings to strings$"):
            open_checkpoint(path)


@pytest.mark.parametrize("text, key", [
    ('{"a":%s,"a":%s}' % (_entry(), _entry()), "a"),
    ('{"__metadata__":{"k":"x","k":"y"},"a":%s}' % _entry(), "k"),
    ('{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}', "dtype"),
    ('{"a\\n":%s,"a\\n":%s}' % (_entry(), _entry()), "a\\x0a"),
], ids=["tensor", "metadata key", "field", "escaped"])
def test_duplicate_keys_are_refused(tmp_path, text, key):
    """json.loads keeps the last silently; safetensors refuses some duplicates and keeps the last of
    others. A header another reader can take two ways is refused, every duplicate alike."""
    path = single(tmp_path, text)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    assert str(exc.value) == f"file '{path}': invalid header JSON: duplicate key '{key}'"


@pytest.mark.parametrize("doc, what", [
    ('{"metadata": [], "weight_map": %s}', "'metadata' is not an object"),
    ('{"metadata": null, "weight_map": %s}', "'metadata' is not an object"),
    ('{"weight_map": [%s]}', "no 'weight_map' of tensor -> file"),
    ('[%s]', "no 'weight_map' of tensor -> file"),
    ('{"weight_map": %s, "weight_map": {}}', "invalid index JSON: duplicate key 'weight_map'"),
], ids=["metadata list", "metadata null", "weight_map list", "not an object", "duplicate"])
def test_index_types_are_checked(tmp_path, capsys, doc, what):
    base, ft = make_pair(str(tmp_path), {"a": ("F32", (3,)), "b": ("F32", (3,))}, shards=2)
    index = os.path.join(ft, "model.safetensors.index.json")
    weight_map = json.dumps(json.load(open(index))["weight_map"])
    with open(index, "w") as f:
        f.write(doc % weight_map)
    line = compress_fails(tmp_path, capsys, base, ft)
    assert line.endswith(f"file '{index}': invalid index: {what}" if "JSON" not in what
                         else f"file '{index}': {what}")


@pytest.mark.parametrize("shard, what", [
    ("x\\ud800.safetensors", "invalid index: the string 'x\\ud800.safetensors' holds a lone surrogate "
                               "escape (not valid UTF-8)"),
    ("../\\u001b[2J.safetensors", "index names shard '../\\x1b[2J.safetensors' outside its folder"),
    ("s\\u0000.safetensors", None),
], ids=["surrogate", "escape sequence", "NUL"])
def test_index_shard_names_are_checked_and_escaped(tmp_path, capsys, shard, what):
    base, ft = make_pair(str(tmp_path), {"a": ("F32", (3,)), "b": ("F32", (3,))}, shards=2)
    index = os.path.join(ft, "model.safetensors.index.json")
    with open(index, "w") as f:
        f.write('{"weight_map": {"a": "%s"}}' % shard)
    line = compress_fails(tmp_path, capsys, base, ft)
    if what is None:
        assert line.endswith(f"file '{ft}/s\\x00.safetensors': shard named in the index is missing")
    else:
        assert line.endswith(f"file '{index}': {what}")


def test_paths_in_messages_are_escaped(tmp_path):
    base = str(tmp_path / "ck")
    os.makedirs(base)
    for name in ("s\n1.safetensors", "s2.safetensors"):
        write_safetensors(os.path.join(base, name), {"a": ("U8", (1,), np.zeros(1, np.uint8))})
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "s2.safetensors", "b": "s\n1.safetensors"}}, f)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(base)
    assert str(exc.value) == (f"tensor 'b' in file '{base}/s\\x0a1.safetensors': listed in the index but "
                              "not in the shard")


# --- fuzz: mutated headers are refused in one line, or read exactly as safetensors reads them ----

FUZZ_TENSORS = {"w": ("F32", (2, 3)), "ids": ("I64", (2,)), "mask": ("BOOL", (3,)), "h": ("BF16", (2,)),
                "empty": ("F16", (0, 4))}
_names = ["w", "ids", "mask", "h", "empty", "__metadata__", "dtype", "shape", "data_offsets", "format"]
_strings = st.sampled_from(_names + ["F32", "U8", "BF16", "F4", "Q4", "\ud800", "a\udfffb", "\U0001f600",
                                     "x\ny", "\x1b[2J", ""]) | st.text(max_size=6)
_scalars = (st.none() | st.booleans() | st.floats() | _strings
            | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 24, 2**63, 2**64 - 1, 2**64, 10**30, 10**400]))
_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_strings, kids, max_size=3),
                       max_leaves=6)
_NEST, _DUP = "@@nest@@", "@@dup@@"


@functools.lru_cache(maxsize=1)
def _valid_file() -> bytes:
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (dtype, shape) in FUZZ_TENSORS.items():
        size = int(np.prod(shape)) * {"F32": 4, "I64": 8, "BOOL": 1, "BF16": 2, "F16": 2}[dtype]
        raw = rng.integers(0, 2 if dtype == "BOOL" else 256, size, dtype=np.uint8)
        tensors[name] = (dtype, shape, raw)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "valid.safetensors")
        write_safetensors(path, tensors, {"format": "pt"})
        return open(path, "rb").read()


@st.composite
def _json_edit(draw, doc: dict):
    """Change the parsed header at a random place: replace, delete, add, nest (a placeholder for
    the text step) or duplicate a key (under a placeholder name; the key is returned)."""
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return None
        key = draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, (dict, list)) or draw(st.booleans()):
            break
        node = child
    action = draw(st.sampled_from(["replace", "replace", "delete", "add", "nest", "duplicate"]))
    if action == "replace":
        node[key] = draw(_values)
    elif action == "nest":
        node[key] = _NEST
    elif action == "delete":
        del node[key]
    elif isinstance(node, dict):
        if action == "add":
            node[draw(_strings)] = draw(_values)
        else:
            node[_DUP] = node[key]
            return key
    else:
        node.append(draw(_values))
    return None


@st.composite
def mutated_files(draw):
    """A valid safetensors file with 1-3 mutations of its header JSON, its bytes or its length field."""
    valid = _valid_file()
    (n,) = struct.unpack("<Q", valid[:8])
    header, data = bytearray(valid[8:8 + n]), valid[8 + n:]
    length = None  # None: the new header's true length
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["json", "json", "flip", "insert", "delete", "length", "truncate"]))
        if op == "json":
            try:
                doc = json.loads(bytes(header))
            except (ValueError, RecursionError):
                continue
            if not isinstance(doc, dict):
                continue
            dup = draw(_json_edit(doc))
            text = json.dumps(doc)
            if dup is not None:
                text = text.replace(json.dumps(_DUP), json.dumps(dup), 1)
            depth = draw(st.sampled_from([1, 120, 125, 126, 127, 2000, 100_000]))
            header = bytearray(text.replace(json.dumps(_NEST), "[" * depth + "]" * depth).encode())
        elif op in ("flip", "insert", "delete") and header:
            at = draw(st.integers(0, len(header) - 1))
            byte = draw(st.sampled_from(b'{}[]",:-.0123456789eE\\u\x00 \xff') | st.integers(0, 255))
            if op == "flip":
                header[at] = byte
            elif op == "insert":
                header.insert(at, byte)
            else:
                del header[at]
        elif op == "length":
            length = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, len(header) - 8), len(header) + 8))
        elif op == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
    raw = struct.pack("<Q", len(header) if length is None else length) + bytes(header) + data
    return raw[:len(raw) - draw(st.sampled_from([0] * 8 + [1, len(raw) - 7]))]


def _ours(path):
    """Every tensor as (dtype, shape, bytes) through deltastream's reader, or the one-line refusal."""
    try:
        ckpt = open_checkpoint(path)
        return {name: (t.dtype.name, t.shape, read_bits(t, 0, t.numel).tobytes())
                for name, t in ckpt.tensors.items()}, ckpt.metadata
    except CheckpointError as exc:
        message = str(exc)
        assert "\n" not in message and f"file '{path}': " in message, message
        return None, message


def _theirs(path):
    """The same through the safetensors library (torch, which knows every dtype), or None if refused."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            out = {}
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                dtype = f.get_slice(name).get_dtype()
                raw = b"" if 0 in shape else f.get_tensor(name).reshape(-1).view(torch.uint8).numpy().tobytes()
                out[name] = (dtype, shape, raw)
            return out, f.metadata() or {}
    except Exception:  # noqa: BLE001 - any refusal of safetensors' counts
        return None, None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(raw=mutated_files())
def test_fuzzed_headers_read_as_safetensors_reads_them(tmp_path, raw):
    path = str(tmp_path / "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    ours, ours_meta = _ours(path)
    theirs, theirs_meta = _theirs(path)
    if theirs is None:
        assert ours is None, "safetensors refuses a file deltastream reads"
    if ours is not None:
        assert ours == theirs and ours_meta == theirs_meta


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(raw=mutated_files())
def test_fuzzed_fine_tune_compresses_right_or_fails_in_one_line(capsys, raw):
    """The whole command on a mutated fine-tune: an artifact that rebuilds what safetensors reads
    in it, or exit 2 with one line, the inputs as they were and no output."""
    with tempfile.TemporaryDirectory() as tmp:
        base, ft = os.path.join(tmp, "base"), os.path.join(tmp, "ft")
        for folder, content in ((base, _valid_file()), (ft, raw)):
            os.makedirs(folder)
            with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                f.write(content)
        before = tree_digest(base, ft)
        capsys.readouterr()
        rc = run_cli("compress", base, ft, "-o", os.path.join(tmp, "a.dsz"), "-q")
        assert tree_digest(base, ft) == before
        if rc == 2:
            error_line(capsys)
            assert sorted(os.listdir(tmp)) == ["base", "ft"]
            return
        assert rc == 0
        assert run_cli("apply", base, os.path.join(tmp, "a.dsz"), "-o", os.path.join(tmp, "out"), "-q") == 0
        assert _theirs(os.path.join(tmp, "out", "model.safetensors"))[0] == _theirs(ft_file(ft))[0]
