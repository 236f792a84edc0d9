"""``lmforge interp lens|dla|patch`` write a table (.md/.csv/.json) and a heatmap PNG; bad input is one line."""

from __future__ import annotations

import csv
import json

import pytest

from lmforge.cli import main

from ..serve.tiny_server import save_tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_chat_model(tmp_path_factory.mktemp("interp_cli")))


def written(out, stem):
    assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    with open(out / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((out / f"{stem}.json").read_text())
    assert len(data["rows"]) == len(rows) and (out / f"{stem}.md").read_text().count("\n") >= len(rows) + 2
    return rows, data


def test_lens_writes_a_row_per_layer_and_position(model_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    assert main(["interp", "lens", model_dir, "--prompt", "the quick brown", "--target", " fox",
                 "--top-k", "3", "--out", str(out)]) == 0
    rows, data = written(out, "lens")
    assert data["layers"] == ["embed", "L0", "L1"]
    assert len(rows) == 3 * len(data["input_tokens"])
    assert all(0.0 <= float(r["target_prob"]) <= 1.0 and len(r["top_probs"].split()) == 3 for r in rows)
    assert "wrote" in capsys.readouterr().out


def test_dla_writes_components_that_add_up(model_dir, tmp_path):
    out = tmp_path / "dla"
    assert main(["interp", "dla", model_dir, "--prompt", "the quick brown", "--answer", " fox", "--wrong", " dog",
                 "--out", str(out)]) == 0
    rows, data = written(out, "dla")
    layer_level = ("embed", "attn", "mlp", "final_norm_bias")
    summed = sum(float(r["direct_logit"]) for r in rows if r["component"] in layer_level)
    assert abs(summed - data["total"]) < 1e-3
    assert sum(r["component"] == "head" for r in rows) == 2 * 4  # 2 layers x 4 heads


@pytest.mark.parametrize("what", ["resid_pre", "attn_head"])
def test_patch_writes_the_grid(model_dir, tmp_path, what):
    out = tmp_path / "patch"
    assert main(["interp", "patch", model_dir, "--clean", "the quick brown", "--corrupted", "the lazy brown",
                 "--answer", " fox", "--wrong", " dog", "--what", what, "--out", str(out)]) == 0
    rows, _ = written(out, f"patch_{what}")
    assert len(rows) == (2 * 4 if what == "attn_head" else 2 * len({int(r["position"]) for r in rows}))
    if what == "resid_pre":  # layer 0, where the prompts differ: the clean run restored exactly
        restored = [float(r["recovered"]) for r in rows if r["layer"] == "0" and r["clean_token"] == " quick"]
        assert restored == [pytest.approx(1.0, abs=1e-6)]


@pytest.mark.parametrize("argv, message", [
    (["lens", "--prompt", "the quick", "--target", " quick brown fox"], "is 3 tokens"),
    (["patch", "--clean", "the quick brown", "--corrupted", "the", "--answer", " fox", "--wrong", " dog"],
     "token-aligned"),
])
def test_bad_input_is_one_line(model_dir, tmp_path, capsys, argv, message):
    assert main(["interp", argv[0], model_dir, *argv[1:], "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge interp: error:") and message in err and err.count("\n") == 1
