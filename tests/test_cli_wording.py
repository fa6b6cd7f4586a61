"""What the commands say: verify names what it checked (a lossy rebuild cannot match the
fine-tune's checksums), and info's text and --json share one vocabulary for a tensor's policy."""

from __future__ import annotations

import json
import os
import shutil

from common import run_cli

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden(case: str) -> str:
    return os.path.join(GOLDEN, "artifacts", f"{case}.dsz")


def out_line(capsys, *argv) -> str:
    capsys.readouterr()
    assert run_cli(*argv) == 0
    return capsys.readouterr().out.strip()


def test_verify_of_a_lossless_artifact_says_the_rebuild_has_the_fine_tunes_checksums(capsys, golden_pair):
    BASE = golden_pair[0]
    line = out_line(capsys, "verify", golden("lossless"), BASE, "-q")
    assert line == (f"ok: artifact '{golden('lossless')}' and base '{BASE}' match: the base has the recorded "
                    "checksums and every chunk decodes against it; the rebuilt fine-tune has the fine-tune's "
                    "recorded checksums")


def test_verify_of_a_lossy_artifact_does_not_claim_the_fine_tunes_checksums(capsys, golden_pair):
    BASE = golden_pair[0]
    line = out_line(capsys, "verify", golden("dare"), BASE, "-q")
    assert line.endswith("; 3 exact tensors rebuild to the fine-tune's recorded checksums, 2 stored by lossy "
                         "'dare' rebuild the edited fine-tune (checked by their stored chunks' CRC-32C, not against "
                         "the fine-tune)")


def test_verify_without_a_base_says_what_it_checked(capsys):
    assert out_line(capsys, "verify", golden("dare"), "-q") == (
        f"ok: artifact '{golden('dare')}' is intact: every stored chunk decodes and matches its recorded CRC-32C, "
        "every side file its sha256")


def test_info_text_and_json_use_one_policy_vocabulary(tmp_path, capsys, golden_pair):
    BASE = golden_pair[0]
    ft = str(tmp_path / "ft")
    shutil.copytree(golden_pair[1], ft)
    shutil.copy(os.path.join(BASE, "model.safetensors"), os.path.join(ft, "model.safetensors"))  # nothing changed
    art = str(tmp_path / "same.dsz")
    assert run_cli("compress", BASE, ft, "-o", art, "-q", "--method", "dare") == 0
    tensors = json.loads(out_line(capsys, "info", art, "--json"))["tensors"]
    assert {(t["policy"], t["unchanged"]) for t in tensors} == {("dare", True), ("lossless", True)}
    text = out_line(capsys, "info", art)
    for t in tensors:
        row = next(line for line in text.splitlines() if line.startswith(t["name"] + " "))
        assert f" {t['policy']}, unchanged " in row
    dare = json.loads(out_line(capsys, "info", golden("dare"), "--json"))["tensors"]
    assert {t["policy"] for t in dare} == {"dare", "lossless", "new", "grown"} and not any(t["unchanged"] for t in dare)
