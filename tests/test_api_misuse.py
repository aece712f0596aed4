"""The public API called the ways a user gets wrong: a clear error naming the argument (or the
right result), never a deep traceback or a silently different model."""

import pytest
import torch

import awq_ref
from awq_ref import AwqConfig, AwqResult, Llama, LlamaConfig, QuantSpec

TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tiny() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**TINY)).eval()


def calib(b: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call", [
    lambda m, skip: awq_ref.quantize(m, "rtn", group_size=32, modules_to_not_convert=skip),
    lambda m, skip: awq_ref.search_awq(m, calib(), QuantSpec(4, 32), AwqConfig(progress=False),
                                       modules_to_not_convert=skip),
    lambda m, skip: awq_ref.apply_awq(m, AwqResult(spec=QuantSpec(4, 32)),
                                      modules_to_not_convert=skip),
])
def test_one_name_as_a_string_is_refused(tiny, call):
    """"mlp.down_proj" as a string was read as its characters: every linear's name holds an "m",
    so nothing was quantized (or clipped, or searched), without a word."""
    with pytest.raises(TypeError, match=r"modules_to_not_convert must be a list.*\['mlp"):
        call(tiny, "mlp.down_proj")


def test_zero_point_must_be_a_bool(tiny):
    """zero_point="false" (a string, truthy) quantized asymmetrically."""
    with pytest.raises(ValueError, match="zero_point must be True or False, got 'false'"):
        awq_ref.quantize(tiny, "rtn", group_size=32, zero_point="false", pack=False)


@pytest.mark.parametrize("bad", [{"n_grid": 2.5}, {"n_grid": "3"}, {"n_refine": 1.5},
                                 {"clip_grid": 2.5}, {"loss_tokens": 2.5}, {"duo_scaling": "no"},
                                 {"clip": "no"}, {"clip_skip": "self_attn.q_proj"},
                                 {"clip_damp": float("nan")}, {"n_grid": True}])
def test_awq_config_fields_of_the_wrong_type(bad):
    """Floats failed deep in the search (range(2.5)) or ran as another setting (clip_grid 2.5,
    "no" as True, a clip_skip string matched as substrings, clip_damp nan as 0, True as 1)."""
    key = next(iter(bad))
    with pytest.raises((TypeError, ValueError), match=f"AwqConfig.{key} must be"):
        AwqConfig(**bad)


@pytest.mark.parametrize("tokens", [calib()[:0], calib()[:, :0], calib().tolist()])
def test_calibration_tokens_empty_or_not_a_tensor(tiny, tokens):
    """(0, T) failed in torch.cat, (B, 0) with ZeroDivisionError, a list with AttributeError."""
    with pytest.raises((TypeError, ValueError), match="calib_tokens must be"):
        awq_ref.search_awq(tiny, tokens, QuantSpec(4, 32), AwqConfig(progress=False))


@pytest.mark.parametrize("n, seqlen", [(0, 8), (2, 0), (-1, 8)])
def test_calibration_windows_need_a_positive_count_and_length(n, seqlen):
    tok = type("Tok", (), {"encode": staticmethod(lambda text: list(range(50)))})()
    with pytest.raises(ValueError, match="n >= 1 windows of seqlen >= 1"):
        awq_ref.calibration_tokens(tok, ["some text"], n=n, seqlen=seqlen)


def test_save_and_load_refuse_a_dtype_that_is_no_float(tiny, tmp_path):
    """dtype=torch.int8 wrote a checkpoint with int8 embeddings, which no reader loads."""
    qm = awq_ref.quantize(tiny, "rtn", group_size=32)
    with pytest.raises(TypeError, match="save_quantized: dtype must be a torch floating-point"):
        awq_ref.save_quantized(qm, tmp_path / "q8", dtype=torch.int8)
    assert not (tmp_path / "q8").exists()
    out = awq_ref.save_quantized(qm, tmp_path / "q")
    with pytest.raises(TypeError, match="load_quantized_model: dtype must be"):
        awq_ref.load_quantized_model(out, dtype="float16")


@pytest.mark.parametrize("tokens", [torch.arange(640).view(10, 64) % 96,
                                    (torch.arange(640) % 96).float(), list(range(640))])
def test_evaluate_takes_one_integer_token_stream(tiny, tokens):
    """A (B, T) batch was sliced by rows and failed in view(), floats in the embedding."""
    with pytest.raises((TypeError, ValueError), match="tokens must be"):
        awq_ref.evaluate(tiny, tokens, seqlen=32, windows=2, progress=False)


def test_generate_token_ids_as_a_tensor_or_of_the_wrong_kind(tiny):
    """A 1-D tensor prompt failed on `if not prompt_ids`; a text, a (1, T) batch and an int
    eos_ids failed deep (the last after the prompt's forward)."""
    prompt = [1, 5, 7]
    want = awq_ref.generate(tiny, prompt, 4)
    assert awq_ref.generate(tiny, torch.tensor(prompt), 4) == want
    for bad in ("Once upon", torch.tensor([prompt]), [1.0, 5.0]):
        with pytest.raises(TypeError, match="prompt_ids must be a sequence of integer"):
            awq_ref.generate(tiny, bad, 4)
    with pytest.raises(TypeError, match="eos_ids must be a sequence of integer"):
        awq_ref.generate(tiny, prompt, 4, eos_ids=2)


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        model = Llama(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="on the meta device"):
        awq_ref.quantize(model, "rtn", group_size=32, pack=False)
    with pytest.raises(ValueError, match="on the meta device"):
        awq_ref.search_awq(model, calib(), QuantSpec(4, 32), AwqConfig(progress=False))


def test_quantize_folder_checks_its_skip_names_and_calibration_like_quantize(tmp_path):
    """The streamed path takes the same arguments and refuses the same mistakes, before reading
    the folder."""
    from awq_ref.stream import quantize_folder

    with pytest.raises(TypeError, match="quantize_folder: modules_to_not_convert must be a list"):
        quantize_folder(tmp_path, tmp_path / "q", method="rtn", modules_to_not_convert="lm_head")
    for tokens in (calib()[:0], calib().tolist()):
        with pytest.raises((TypeError, ValueError), match="calib_tokens must be"):
            quantize_folder(tmp_path, tmp_path / "q", calib_tokens=tokens)


def test_group_size_true_is_no_group_of_one():
    with pytest.raises(ValueError, match="group_size must be a positive integer or -1, got True"):
        QuantSpec(4, True)


def test_load_model_refuses_a_dtype_that_is_no_float(stories_dir):
    with pytest.raises(TypeError, match="load_model: dtype must be a torch floating-point dtype"):
        awq_ref.load_model(stories_dir / "stories260K.bin", dtype=torch.int32)


@pytest.mark.parametrize("bad", [-1, 2.0, True])
def test_generate_max_new_tokens_is_a_count(tiny, bad):
    """-1 returned [] as if asked for none; 2.0 failed inside torch.zeros."""
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        awq_ref.generate(tiny, [1, 2], bad)


def test_weights_made_in_inference_mode_are_refused_before_the_search(monkeypatch):
    """A model built under torch.inference_mode() holds inference tensors, which torch will not
    change in place outside the mode: quantize(inplace=True) ran the whole search, then failed
    in apply_scale with torch's own error. Now one line before the search; the copy (the
    default), RTN's packing (no in-place change) and the call inside the mode still work."""
    with torch.inference_mode():
        torch.manual_seed(0)
        frozen = Llama(LlamaConfig(**TINY)).eval()
    monkeypatch.setattr("awq_ref.awq.pipeline.search_awq",
                        lambda *a, **k: pytest.fail("the search ran before the refusal"))
    for call in (lambda: awq_ref.quantize(frozen, "awq", group_size=32, calib_tokens=calib(),
                                          inplace=True),
                 lambda: awq_ref.quantize(frozen, "rtn", group_size=32, pack=False, inplace=True),
                 lambda: awq_ref.apply_awq(frozen, AwqResult(spec=QuantSpec(4, 32)))):
        with pytest.raises(ValueError, match=r"embed_tokens.weight was made under "
                                             r"torch.inference_mode\(\).*outside inference_mode"):
            call()
    awq_ref.quantize(frozen, "rtn", group_size=32, pack=False)  # a copy: normal tensors
    awq_ref.quantize(frozen, "rtn", group_size=32, inplace=True)  # packing swaps the layers
    with torch.inference_mode():
        torch.manual_seed(0)
        inside = Llama(LlamaConfig(**TINY)).eval()
        awq_ref.quantize(inside, "rtn", group_size=32, pack=False, inplace=True)
