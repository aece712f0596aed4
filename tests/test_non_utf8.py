"""Names and arguments that are not UTF-8. A POSIX file name may hold any bytes (a folder named
in Latin-1; under a non-UTF-8 locale, every non-ASCII name): Python gives them as str with
surrogate escapes, which the Rust bindings of tokenizers and safetensors (and sentencepiece)
refuse as paths. Such files are read and written here as bytes or through /proc/self/fd, so
such folders work as any other; a prompt decoded by a non-UTF-8 locale is read as UTF-8."""

from __future__ import annotations

import os
import shutil

import torch
from test_cli_errors import _random_folder

from awq_ref.awq.result import AwqResult
from awq_ref.awq.resume import Progress
from awq_ref.cli import main
from awq_ref.loaders import load_tokenizer
from awq_ref.quant.checkpoint import load_quantized_model
from awq_ref.quant.quantizer import QuantSpec


def _odd_folder(tmp_path):
    odd = tmp_path / os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not UTF-8
    odd.mkdir()
    return odd


def _bpe_json() -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tk = HFTokenizer(models.BPE(vocab={"<s>": 0, "a": 1, "b": 2, "ab": 3, "<unk>": 4},
                                merges=[("a", "b")], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk.to_str(pretty=True)


def test_tokenizer_files_in_a_folder_whose_name_is_not_utf8(sp_model, tmp_path):
    """Read from an HF folder (its files copied as they were), from a bare tokenizer.json (the
    backend writes the file: as it is, or with a BOS post-processor added) and from a
    SentencePiece tokenizer.model."""
    odd = _odd_folder(tmp_path)
    (odd / "tokenizer.json").write_text(_bpe_json(), encoding="utf-8")
    tok = load_tokenizer(odd)
    assert tok.encode("ab a") == [3, 1]
    tok.save_pretrained(odd / "saved")
    assert load_tokenizer(odd / "saved").encode("ab a") == [3, 1]
    bare = load_tokenizer(odd / "tokenizer.json")  # a file: save_pretrained runs backend.save
    bare.save_pretrained(odd / "from_file")
    assert load_tokenizer(odd / "from_file").encode("ab a") == [3, 1]
    (odd / "tokenizer_config.json").write_text('{"bos_token": "<s>", "add_bos_token": true}')
    with_bos = load_tokenizer(odd / "tokenizer.json")  # backend.save_adding_bos
    with_bos.save_pretrained(odd / "with_bos")
    assert load_tokenizer(odd / "with_bos").encode("ab a") == [0, 3, 1]
    folder, sp = sp_model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (odd / name).unlink()
    shutil.copy(folder / "tokenizer.model", odd / "tokenizer.model")
    ids = [1, *sp.encode("The cat")]  # <s> first, as Llama's SentencePiece tokenizer adds it
    assert load_tokenizer(odd).encode("The cat") == ids
    load_tokenizer(odd).save_pretrained(odd / "saved_sp")
    assert load_tokenizer(odd / "saved_sp").encode("The cat") == ids


def test_safetensors_files_whose_names_are_not_utf8_are_read(capsys, tmp_path, one_thread):
    """A model, a saved search (read back, and replaced by a rerun's --save-result) and a
    search's resumable state, in a folder named with Latin-1 bytes."""
    odd = _odd_folder(tmp_path)
    folder = _random_folder(odd)
    result, out, again = odd / "r.st", odd / "q", odd / "again"
    search = ["quantize", "--model", str(folder), "--n-samples", "2", "--calib-seqlen", "16",
              "--n-grid", "2", "--save-result", str(result)]
    assert main([*search, "--out", str(out)]) == 0
    assert main([*search, "--out", str(odd / "rerun")]) == 0  # replaces a saved result only
    assert main(["quantize", "--model", str(folder), "--out", str(again), "--result",
                 str(result)]) == 0
    a, b = load_quantized_model(out), load_quantized_model(again)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    work = Progress(odd / "work")
    work.bind("fp")
    work.save(1, AwqResult(spec=QuantSpec(4, 32), scales={"p": torch.ones(4)}), torch.zeros(2, 3))
    restored = AwqResult(spec=QuantSpec(4, 32))
    assert work.restore(restored)[0] == 1 and torch.equal(restored.scales["p"], torch.ones(4))
    assert work.saved_blocks() == 1


def test_a_prompt_decoded_under_a_non_utf8_locale_is_read_as_utf8(capsys, stories_dir):
    """Under LC_ALL=C with PYTHONUTF8=0, Python decodes the argument "café" as ASCII with
    surrogate escapes ('caf\\udcc3\\udca9'), which the tokenizer cannot take: its bytes are
    read as the UTF-8 they are; bytes that are no UTF-8 at all become U+FFFD."""
    from awq_ref.cli_common import command_line_text

    assert command_line_text("caf\udcc3\udca9") == "café"
    assert command_line_text("caf\udce9") == "caf\ufffd"
    assert command_line_text("café") == "café"  # decoded by a Latin-1 locale: kept as it is
    assert main(["generate", "--model", str(stories_dir / "stories260K.bin"), "--prompt",
                 "caf\udcc3\udca9", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("café")
