"""tools/report.py's figure data on a random tiny Llama: shapes, agreement with search_awq, and
the plots render (tools/figures.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import report
import torch

from awq_ref.api import quantize
from awq_ref.awq.pipeline import AwqConfig, search_awq
from awq_ref.awq.result import AwqResult
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.quantizer import QuantSpec

SPEC = QuantSpec(4, 16, True)
FAST = AwqConfig(n_grid=10, loss_seqs=3, loss_tokens=96, chunk_tokens=64, progress=False)


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1)
    model = Llama(cfg).eval()
    with torch.no_grad():  # a few outlier channels, as in trained models
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 8
    return model


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    tokens = torch.randint(0, 97, (6, 32), generator=torch.Generator().manual_seed(0))
    return model, tokens, search_awq(model, tokens, SPEC, FAST)


def test_activation_means_per_block_and_group(setup):
    model, tokens, _ = setup
    means = report.activation_means(model, tokens, (0, 2))
    assert {b for b, _ in means} == {0, 2}
    assert means[(0, "q/k/v input")].shape == (64,)
    assert means[(2, "down_proj input")].shape == (96,)
    assert all((m >= 0).all() for m in means.values())
    assert means[(0, "q/k/v input")][:3].mean() > means[(0, "q/k/v input")][3:].mean()


def test_loss_curves_pick_what_search_awq_picked(setup):
    model, tokens, result = setup
    curves = report.loss_curves(model, tokens, SPEC, (1,), FAST)
    assert [c["label"] for c in curves] == list(report.INPUT_LABELS.values())
    ratios = report.chosen_ratios(result, 3)
    for j, c in enumerate(curves):
        assert len(c["losses"]) == FAST.n_grid
        assert c["ratio"] == c["ratios"][int(np.argmin(c["losses"]))]
        assert c["ratio"] == ratios[1, j]


def test_chosen_ratios_survive_save_and_load(setup, tmp_path):
    _, _, result = setup
    result.save(tmp_path / "r.safetensors")
    loaded = AwqResult.load(tmp_path / "r.safetensors")
    np.testing.assert_array_equal(report.chosen_ratios(loaded, 3), report.chosen_ratios(result, 3))
    assert report.chosen_ratios(result, 3).shape == (3, 4)
    with pytest.raises(ValueError, match="search record"):
        report.chosen_ratios(AwqResult(spec=SPEC), 3)


def test_block_errors_zero_for_fp_and_awq_below_rtn_on_average(setup):
    model, tokens, result = setup
    errors = report.block_errors(model, tokens, {
        "fp": model, "RTN W4": quantize(model, "rtn", 4, 16, pack=False),
        "AWQ W4": quantize(model, "awq", 4, 16, pack=False, result=result)})
    assert errors["fp"].tolist() == [0.0, 0.0, 0.0]
    assert (errors["RTN W4"] > 0).all()
    assert errors["AWQ W4"].mean() < errors["RTN W4"].mean()


def test_quality_table_and_command():
    args = {"model": "default", "bits": [4], "group": 64, "calib_windows": 128, "seqlen": 512,
            "eval_windows": 20, "eval_seqlen": 2048, "overrides": []}
    rows = [{"method": "fp", "bits": None, "ppl": 20.0, "quant_s": None},
            {"method": "awq", "bits": 4, "ppl": 21.0, "kl": 0.05, "top1": 0.9, "quant_s": 60.0,
             "recovery": 0.5},
            {"method": "rtn", "bits": 3, "ppl": 30.0, "kl": 0.5, "top1": 0.7, "quant_s": 1.0}]
    table = report.quality_table({"args": args, "rows": rows}, {"fp16": 2_000_000, "w4": 600_000})
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count("|") == 9 for line in lines)
    assert "| AWQ | W4 g64 | 21.000 | 0.0500 | 0.9000 | 0.500 | 60.0 s | 0.6 MB |" in table
    assert "n/a" in lines[4]
    assert report.quality_command(args).startswith("tools/awq_quality.py --model default --bits 4")
    seed1 = {**args, "seed": 1, "methods": ["awq"], "calib": "other.txt",
             "eval": "/data/wikitext-2-raw/wiki.test.raw"}
    assert report.quality_command(seed1).endswith(
        "--eval-seqlen 2048 --seed 1 --methods awq --calib other.txt")  # defaults left out
    with pytest.raises(SystemExit, match=r"partial awq_quality.py report .*\['awq W3'\]"):
        report.quality_table({"args": args, "rows": [rows[0], {"method": "awq", "bits": 3}]},
                             {"fp16": 1, "w4": 1})
    for partial in ([rows[1]], [rows[1], rows[0]], []):  # no fp row first: no KL reference
        with pytest.raises(SystemExit, match="no fp row first"):
            report.quality_table({"args": args, "rows": partial}, {"fp16": 1, "w4": 1})


def test_figures_render(setup, tmp_path):
    pytest.importorskip("matplotlib")
    import figures

    model, tokens, result = setup
    figures.plot_activations(report.activation_means(model, tokens, (0,)), tmp_path / "a.png")
    figures.plot_loss_curves(report.loss_curves(model, tokens, SPEC, (0,), FAST),
                             tmp_path / "b.png")
    figures.plot_ratios(report.chosen_ratios(result, 3), list(report.INPUT_LABELS.values()),
                        tmp_path / "c.png")
    figures.plot_block_errors({"RTN W4": np.array([0.1, 0.2, 0.3]),
                               "AWQ W4": np.array([0.05, 0.1, 0.2])}, tmp_path / "d.png")
    for name in "abcd":
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_figures_plot_what_their_docstrings_say(tmp_path, monkeypatch):
    """The data drawn, read back from the figures: (b) losses over the loss at a = 0, the
    chosen a circled; (d) AWQ / RTN per block; (a) the top 1% channels marked."""
    pytest.importorskip("matplotlib")
    import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    curve = {"block": 0, "label": "o_proj input", "ratios": [0.0, 0.5, 1.0],
             "losses": [4.0, 2.0, 3.0], "ratio": 0.5}
    figures.plot_loss_curves([curve], tmp_path / "b.png")
    ax = drawn[-1].axes[0]
    assert list(ax.lines[0].get_ydata()) == [1.0, 0.5, 0.75]
    assert ax.collections[0].get_offsets().tolist() == [[0.5, 0.5]]  # the circle
    figures.plot_block_errors({"RTN W4": np.array([0.2, 0.5]), "AWQ W4": np.array([0.1, 0.4])},
                              tmp_path / "d.png")
    assert list(drawn[-1].axes[1].lines[0].get_ydata()) == pytest.approx([0.5, 0.8])
    means = np.arange(1.0, 201.0)  # channels 198 and 199 are the top 1% of 200
    figures.plot_activations({(0, "q/k/v input"): means}, tmp_path / "a.png")
    assert drawn[-1].axes[0].collections[0].get_offsets()[:, 0].tolist() == [198, 199]


def test_block_error_is_relative_to_the_blocks_update(setup):
    """e_i = ||B_q(x) - B(x)||^2 / ||B(x) - x||^2, written out for block 0 (x: token embeddings)."""
    model, tokens, _ = setup
    rtn = quantize(model, "rtn", 4, 16, pack=False)
    got = report.block_errors(model, tokens, {"RTN W4": rtn})["RTN W4"]
    with torch.no_grad():
        x = model.model.embed_tokens(tokens).float()
        rotary = model.rotary(0, tokens.shape[1], torch.float32)
        y = model.model.layers[0](x, *rotary)
        want = (rtn.model.layers[0](x, *rotary) - y).pow(2).sum() / (y - x).pow(2).sum()
    assert got[0] == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_sizes_count_fp16_bytes_once(tied):
    """fp16: 2 bytes per stored parameter, a tied lm_head counted once (it is one tensor)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=tied)).eval()
    sizes = report.checkpoint_sizes(model, 16)
    assert sizes["fp16"] == 2 * sum(p.numel() for p in model.parameters())  # tied: listed once
    assert 0 < sizes["w4"] < sizes["fp16"]


def test_results_markdown_says_awq_over_rtn_and_the_command():
    data = {"block_errors": {"RTN W4": [0.2, 0.5], "AWQ W4": [0.1, 0.1]},
            "search_seconds": {"W4": 12.0}, "ratios": [[0.25, float("nan")], [0.5, 0.75]],
            "made_by": "a test", "setting": "W4 g16", "config": "{}"}
    md = report.results_markdown("TABLE", "SOURCE", data)
    assert "Mean over blocks of AWQ / RTN: 0.35 at W4." in md  # mean(0.1/0.2, 0.1/0.5)
    assert "mean\n0.50, range 0.25 to 0.75." in md
    args = {"model": "default", "bits": [4, 3], "group": 64, "calib_windows": 128, "seqlen": 512,
            "eval_windows": None, "eval_seqlen": 2048, "overrides": ["duo_scaling=true"],
            "half_split": True}
    assert report.quality_command(args) == (
        "tools/awq_quality.py --model default --bits 4 3 --group 64 --calib-windows 128 "
        "--seqlen 512 --eval-windows all --eval-seqlen 2048 --set duo_scaling=true --half-split")
    fp = {"method": "fp", "bits": None, "ppl": 20.0, "quant_s": None}
    table = report.quality_table({"args": args, "rows": [fp]}, {"fp16": 270_000_000, "w4": 1})
    assert "| 270.0 MB (fp16) |" in table  # MB = 10^6 bytes, as the table says


def test_existing_results_are_rewritten_only_with_their_table(tmp_path):
    """Without --from-json, results.md would lose its quality table: refused before any work."""
    import subprocess

    (tmp_path / "results.md").write_text("the published table")
    done = subprocess.run([sys.executable, str(Path(report.__file__)), "--out", str(tmp_path),
                           "--reuse-figure-data"], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "holds the quality table" in done.stderr, done.stderr
    assert (tmp_path / "results.md").read_text() == "the published table"
