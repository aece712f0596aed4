"""The command line on tiny real models whose inputs do not fit together: a tokenizer whose ids
outgrow the model's vocabulary, a reference model of another vocabulary. Each is one clear line
and exit status 2, not an IndexError from inside torch (found by review, 2026-12-07)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_resume import write_tiny_model  # with a byte-level BPE of 261 tokens

from awq_ref.cli import main
from awq_ref.quant.quantizer import QuantSpec

SMALL = {"num_hidden_layers": 2}  # test_resume's TINY otherwise: hidden 64, 256 positions
TEXT = "Hello world, hello world. " * 40  # "He", "ll", "Hell", "\u0120w": ids 256..260


def write_folder(folder: Path, vocab_size: int, **changes) -> Path:
    """An HF folder: a random 2-block Llama of `vocab_size` ids with the 261-token byte-level
    tokenizer, which decodes bytes back to text as GPT-2-style tokenizers do."""
    from tokenizers import Tokenizer, decoders

    write_tiny_model(folder, vocab_size=vocab_size, **{**SMALL, **changes})
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tk.decoder = decoders.ByteLevel()
    tk.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-inputs")
    (root / "text.txt").write_text(TEXT)
    models = {n: write_folder(root / f"v{n}", n) for n in (200, 261, 300)}
    return {**models, "text": root / "text.txt"}


def _refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_tokenizer_ids_past_the_vocabulary(folders, capsys, tmp_path):
    model, text = str(folders[200]), str(folders["text"])
    fits = "do not fit the model's vocabulary (vocab_size 200)"
    _refused(capsys, ["generate", "--model", model, "--prompt", "Hello world"], fits)
    _refused(capsys, ["ppl", "--model", model, "--text", text, "--seqlen", "16"], fits)
    out = tmp_path / "q"
    for stream in ([], ["--stream"]):
        _refused(capsys, ["quantize", "--model", model, "--out", str(out), "--group-size", "32",
                          "--calib", text, "--n-samples", "2", "--calib-seqlen", "16", *stream],
                 fits)
        assert not out.exists()


def test_a_padded_vocabulary_is_fine_and_references_must_match(folders, capsys):
    text = str(folders["text"])
    assert main(["ppl", "--model", str(folders[300]), "--text", text, "--seqlen", "16",
                 "--windows", "2"]) == 0  # 261 tokens in a table of 300: a padded vocabulary
    capsys.readouterr()
    _refused(capsys, ["ppl", "--model", str(folders[261]), "--text", text, "--seqlen", "16",
                      "--reference", str(folders[300])], "vocabularies differ ([261, 300] tokens)")


def test_streamed_text_keeps_characters_split_across_tokens(folders, capsys, monkeypatch):
    """Byte-level tokens end mid-character; the stream must print each character once whole
    (it once printed U+FFFD for the partial bytes and skipped the character)."""
    import sys

    from awq_ref.loaders import load_tokenizer

    tok = load_tokenizer(folders[261])
    piece = " \u4e2d\u6587!"  # 2 characters of 3 bytes each: 1 + 6 + 1 byte tokens
    new = tok.encode(piece, add_bos=False)
    assert len(new) == 8

    def fake_generate(model, ids, max_new_tokens, on_token, **kw):
        for t in new:
            on_token(t)
        return new

    monkeypatch.setattr(sys.modules["awq_ref.generate"], "generate", fake_generate)
    assert main(["generate", "--model", str(folders[261]), "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out == "Hi" + piece + "\n"
    new = new[:-2]  # ends inside the second character: its bytes, as decoded, at the end
    assert main(["generate", "--model", str(folders[261]), "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out == "Hi" + tok.decode(new) + "\n" and out.startswith("Hi \u4e2d")


def test_a_saved_search_of_another_model_is_refused(folders, capsys, tmp_path):
    text = str(folders["text"])
    base = ["quantize", "--group-size", "32"]
    saved = tmp_path / "v300.safetensors"
    assert main([*base, "--model", str(folders[300]), "--out", str(tmp_path / "a"), "--calib",
                 text, "--n-samples", "2", "--calib-seqlen", "16", "--n-grid", "2",
                 "--save-result", str(saved)]) == 0
    capsys.readouterr()
    other = tmp_path / "other"  # the same tokenizer and vocabulary, hidden 128 instead of 64
    write_folder(other, 300, hidden_size=128)
    _refused(capsys, [*base, "--model", str(other), "--out", str(tmp_path / "b"), "--result",
                      str(saved)], f"--result {saved}: AwqResult: the scale of")
    assert not (tmp_path / "b").exists()


def test_runs_past_the_trained_context_say_so(folders, capsys):
    from awq_ref.loaders import load_tokenizer

    model, text = str(folders[261]), str(folders["text"])  # max_position_embeddings 256
    assert main(["ppl", "--model", model, "--text", text, "--seqlen", "300"]) == 0
    assert "note: --seqlen: 300 positions, past this model's trained context of 256" in (
        capsys.readouterr().err)
    assert main(["ppl", "--model", model, "--text", text, "--seqlen", "256"]) == 0
    assert "note:" not in capsys.readouterr().err
    # The last new token is never fed back: T + N - 1 positions run
    fits = 257 - len(load_tokenizer(folders[261]).encode("Hello"))
    for new, past in ((fits, False), (fits + 1, True)):
        assert main(["generate", "--model", model, "--prompt", "Hello", "--max-new-tokens",
                     str(new)]) == 0
        assert ("--max-new-tokens: 257 positions, past this model's trained context" in
                capsys.readouterr().err) == past


def test_calibration_text_that_is_not_utf8_is_named(folders, capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    _refused(capsys, ["quantize", "--model", str(folders[261]), "--out", str(tmp_path / "q"),
                      "--group-size", "32", "--calib", str(bad), "--calib-seqlen", "64"],
             f"{bad}: not UTF-8 text")


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi"],
                                     ["quantize", "--out", "never-written"]])
def test_a_seed_past_what_torch_takes_is_refused_by_the_parser(command, capsys):
    """torch.Generator takes 0 ... 2**64-1 and says only "Overflow when unpacking long long"
    past it; the parser names the range before anything is loaded."""
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--model", "no-such-folder", "--seed", str(2**64)])
    assert exit_.value.code == 2
    assert "--seed: a seed is 0 ... 2**64-1, got 18446744073709551616" in capsys.readouterr().err
    assert not Path("never-written").exists()


def test_the_seed_reaches_the_sampler_up_to_the_largest(folders, capsys):
    outs = set()
    for seed in (0, 1, 2, 3, 2**64 - 1):
        assert main(["generate", "--model", str(folders[261]), "--prompt", "Hello",
                     "--max-new-tokens", "8", "--temperature", "1", "--seed", str(seed)]) == 0
        outs.add(capsys.readouterr().out)
    assert len(outs) > 1 and all(o.startswith("Hello") for o in outs)


def test_a_quantized_checkpoint_is_not_quantized_again(folders, capsys, tmp_path):
    """Passing the output back in (an easy slip) was an AttributeError traceback (AWQ) or a
    silent byte copy (RTN); it is refused before loading, by the CLI and by the API."""
    from awq_ref.api import quantize
    from awq_ref.awq.pipeline import search_awq
    from awq_ref.loaders import load_model

    first = tmp_path / "q"
    assert main(["quantize", "--model", str(folders[261]), "--out", str(first), "--method",
                 "rtn", "--group-size", "32"]) == 0
    capsys.readouterr()
    for method in ("rtn", "awq"):
        _refused(capsys, ["quantize", "--model", str(first), "--out", str(tmp_path / method),
                          "--method", method, "--group-size", "32"],
                 f"--model {first} is already quantized")
        assert not (tmp_path / method).exists()
    model = load_model(first)
    with pytest.raises(ValueError, match="quantize: the model is already quantized"):
        quantize(model, group_size=32)
    with pytest.raises(ValueError, match="search_awq: the model is already quantized"):
        search_awq(model, torch.zeros(1, 8, dtype=torch.long), QuantSpec(4, 32))


def test_quantize_folder_names_what_it_reads(tmp_path, default_gguf, capsys):
    from awq_ref.stream import quantize_folder

    for source in (default_gguf, "default"):
        with pytest.raises(ValueError, match="quantize_folder reads an HF safetensors folder"):
            quantize_folder(source, tmp_path / "q", method="rtn", group_size=64)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(default_gguf.read_bytes()[:64])
    _refused(capsys, ["ppl", "--model", str(tmp_path / "models"), "--text", "x"],
             "config file not found (an HF checkpoint folder holds config.json and its "
             "safetensors files; for a GGUF file pass the file itself (m.gguf here))")


def test_calibration_past_free_memory_is_refused_before_loading(folders, capsys, tmp_path,
                                                                 monkeypatch):
    """A typo like --calib-seqlen 100000 once had the kernel's OOM killer end the run without a
    word (and its neighbours'); the activations' size, beside the weights', is checked against
    free memory first."""
    from awq_ref import cli_common, cli_quantize
    from awq_ref.loaders import load_config

    weights = load_config(folders[261]).weight_count() * 4  # float32
    monkeypatch.setattr(cli_common, "available_memory_bytes", lambda: weights + 600_000)
    monkeypatch.setattr(cli_quantize, "load", lambda *a: pytest.fail("the model was loaded"))
    argv = ["quantize", "--model", str(folders[261]), "--out", str(tmp_path / "q"),
            "--group-size", "32", "--calib", str(folders["text"]), "--n-samples", "4"]
    assert main([*argv, "--calib-seqlen", "300"]) == 2  # 2 x 4 x 300 x 64 x 4 = 614,400 bytes
    err = capsys.readouterr().err
    assert "note: --calib-seqlen: 300 positions, past this model's trained context of 256" in err
    assert (f"error: --model {folders[261]} in float32 with --n-samples 4 x --calib-seqlen 300: "
            f"weights about {weights / 1e6:.1f} MB and activations (2 x B x T x hidden 64 x 4 "
            f"bytes) about 0.6 MB, more than the {(weights + 600_000) / 1e6:.1f} MB free here; "
            "try fewer or shorter windows, --stream (block by block), --dtype bfloat16 (half the "
            "weights)") in err
    monkeypatch.setattr(cli_common, "available_memory_bytes", lambda: 600_000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the device check
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*argv, "--calib-seqlen", "300", "--device", "cuda"]) == 2  # saved via the host
    err = capsys.readouterr().err
    assert "with --n-samples 4 x --calib-seqlen 300: activations (2 x B x T" in err
    assert "weights" not in err  # they go to the GPU
    monkeypatch.setattr(cli_common, "available_memory_bytes", lambda: weights + 600_000)
    monkeypatch.setattr(cli_quantize, "load", lambda *a: pytest.fail("loaded: nothing to say"))
    with pytest.raises(pytest.fail.Exception, match="loaded: nothing to say"):
        main([*argv, "--calib-seqlen", "290"])  # 593,920 bytes fit beside the weights


def test_weights_past_free_memory_are_refused_before_loading(folders, capsys, tmp_path,
                                                             monkeypatch):
    """An 8B model in float32 on a 24 GB machine: the OOM killer ended the load without a word.
    Every command that loads an fp model checks its weights' bytes in --dtype first; quantize
    --stream holds one block at a time and is not refused."""
    from awq_ref import cli_common
    from awq_ref.loaders import load_config

    model = str(folders[261])
    weights = load_config(model).weight_count()
    monkeypatch.setattr(cli_common, "available_memory_bytes", lambda: 3 * weights)
    _refused(capsys, ["ppl", "--model", model, "--text", str(folders["text"])],
             f"--model {model} in float32: weights about {4 * weights / 1e6:.1f} MB, more than "
             f"the {3 * weights / 1e6:.1f} MB free here; try --dtype bfloat16 (half the weights)")
    _refused(capsys, ["quantize", "--model", model, "--out", str(tmp_path / "q"),
                      "--method", "rtn", "--group-size", "32"],
             "try --stream (block by block), --dtype bfloat16 (half the weights)")
    assert not (tmp_path / "q").exists()
    assert main(["generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", "2",
                 "--dtype", "bfloat16"]) == 0  # 2 bytes a weight fit
    assert main(["quantize", "--model", model, "--out", str(tmp_path / "q"), "--method", "rtn",
                 "--group-size", "32", "--stream"]) == 0


def test_a_calibration_folder_is_named_as_one(folders, capsys, tmp_path):
    _refused(capsys, ["quantize", "--model", str(folders[261]), "--out", str(tmp_path / "q"),
                      "--group-size", "32", "--calib", str(tmp_path)],
             f"--calib {tmp_path}: a folder, not a file")



def test_bad_sampling_settings_are_refused_before_the_prompt_is_echoed(folders, capsys):
    for bad in (["--top-p", "0"], ["--temperature", "-1"], ["--temperature", "nan"]):
        assert main(["generate", "--model", str(folders[261]), "--prompt", "Hello", *bad]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and "need temperature >= 0 and 0 < top_p <= 1" in printed.err


def test_a_run_that_ignores_an_interrupted_search_says_so(folders, capsys, tmp_path):
    (tmp_path / "q.partial").mkdir()  # as an interrupted --method awq run leaves it
    assert main(["quantize", "--model", str(folders[261]), "--out", str(tmp_path / "q"),
                 "--method", "rtn", "--group-size", "32"]) == 0
    assert (f"note: {tmp_path / 'q.partial'} holds an interrupted search this run does not use "
            "(--method rtn)") in capsys.readouterr().err
    assert (tmp_path / "q.partial").is_dir()  # not ours to delete


def test_free_memory_is_the_containers_where_it_sets_a_limit(tmp_path):
    """Under docker --memory, Kubernetes or Slurm the host's MemAvailable is not this process's:
    the check passed and the cgroup's OOM killer ended the run without a word. The cgroup's
    headroom (limit - usage, page cache not counted) now lowers it, v2 and v1; no limit, no
    change; the cgroup named by /proc/self/cgroup, or the mount's root in a container."""
    from awq_ref.cli_common import available_memory_bytes

    def tree(name, cgroup, files):
        root = tmp_path / name
        (root / "proc" / "self").mkdir(parents=True)
        (root / "proc" / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 8000000 kB\n")
        (root / "proc" / "self" / "cgroup").write_text(cgroup)
        for path, text in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        return root

    job = "sys/fs/cgroup/job/42"
    v2 = tree("v2", "0::/job/42\n", {f"{job}/memory.max": "2000000000\n",
                                      f"{job}/memory.current": "1500000000\n",
                                      f"{job}/memory.stat": "anon 1\ninactive_file 500000000\n"})
    assert available_memory_bytes(v2) == 1_000_000_000  # 2e9 - 1.5e9 + 0.5e9 page cache
    slurm = tree("slurm", "0::/job/7/task_0\n", {  # the job's limit, above the task's cgroup
        "sys/fs/cgroup/job/7/task_0/memory.max": "max\n",
        "sys/fs/cgroup/job/7/task_0/memory.current": "100\n",
        "sys/fs/cgroup/job/7/task_0/memory.stat": "inactive_file 0\n",
        "sys/fs/cgroup/job/7/memory.max": "4000000000\n",
        "sys/fs/cgroup/job/7/memory.current": "1000000000\n",
        "sys/fs/cgroup/job/7/memory.stat": "inactive_file 0\n"})
    assert available_memory_bytes(slurm) == 3_000_000_000
    v1 = tree("v1", "4:memory:/docker/abc\n3:cpu:/\n", {  # namespaced: the mount is the cgroup
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "3000000000\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": "1000000000\n",
        "sys/fs/cgroup/memory/memory.stat": "total_inactive_file 0\n"})
    assert available_memory_bytes(v1) == 2_000_000_000
    unlimited = tree("none", "4:memory:/\n0::/\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": "1\n",
        "sys/fs/cgroup/memory/memory.stat": "", "sys/fs/cgroup/memory.max": "max\n"})
    assert available_memory_bytes(unlimited) == 8_000_000 * 1024  # MemAvailable
    assert available_memory_bytes(tmp_path / "absent") is None  # not Linux
    # `ulimit -v` (RLIMIT_AS): the address space left, limit - VmSize, is what can be allocated
    capped = tree("ulimit", "0::/\n", {
        "proc/self/limits": "Limit  Soft Limit  Hard Limit  Units\n"
                            "Max address space         6000000000           unlimited   bytes\n",
        "proc/self/status": "Name:\tpython\nVmSize:\t 1000000 kB\n"})
    assert available_memory_bytes(capped) == 6_000_000_000 - 1_024_000_000
    (capped / "proc/self/limits").write_text("Max address space  unlimited  unlimited  bytes\n")
    assert available_memory_bytes(capped) == 8_000_000 * 1024
