"""The model against transformers' LlamaForCausalLM (test-only oracle), and the KV cache."""

import itertools
import math

import pytest
import torch

from awq_ref.config import LlamaConfig
from awq_ref.generate import generate, sample_next
from awq_ref.model import Llama, RMSNorm, apply_rotary, rotary_tables

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

TINY_SIZES = {"vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
# head_dim 16, theta 5e5: wavelengths 6.3, 32.4, 167, ... With L = 100 the three bands of llama3
# scaling (kept < L/4 = 25, blended 25..40, divided > L/2.5 = 40) each hold at least one
# frequency (test_llama3_rope_test_config_covers_all_three_bands), and 167 < L * 2.5 tells
# L / low_freq_factor from L * low_freq_factor (Llama 3.1's factor of 1 would not).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.5,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 100}


def tiny_hf_dict(n_kv: int = 4, tied: bool = False, rope_scaling=None) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101,
                "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": n_kv, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "max_position_embeddings": 256, "tie_word_embeddings": tied,
                "rope_scaling": rope_scaling}


def pair(d: dict, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**d)).eval()
    ours = Llama(LlamaConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=not d["tie_word_embeddings"])
    return hf, ours


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope", "llama3-rope"])
def test_logits_match_transformers(n_kv, tied, rope):
    hf, ours = pair(tiny_hf_dict(n_kv, tied, rope))
    x = torch.randint(0, 101, (2, 110))  # past original_max_position_embeddings
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4


def test_llama3_rope_test_config_covers_all_three_bands():
    config = LlamaConfig.from_hf_dict(tiny_hf_dict(rope_scaling=LLAMA3_ROPE))
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).double()
                                           / config.head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len = LLAMA3_ROPE["original_max_position_embeddings"]
    short = wavelen < old_len / LLAMA3_ROPE["high_freq_factor"]
    long = wavelen > old_len / LLAMA3_ROPE["low_freq_factor"]
    assert short.any() and long.any() and (~short & ~long).any()
    assert (long & (wavelen < old_len * LLAMA3_ROPE["low_freq_factor"])).any()  # see above


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decode_equals_full_forward(dtype):
    _, model = pair(tiny_hf_dict(2))
    model = model.to(dtype)
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        full = model(x).float()
        cache = model.new_cache(2, 40)
        steps = [model(x[:, :17], cache)] + [model(x[:, i:i + 1], cache) for i in range(17, 40)]
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (torch.cat(steps, 1).float() - full).abs().max().item() <= tol


def test_kv_cache_in_multi_token_chunks_equals_full_forward():
    """Chunks of several tokens after a past: each query's own position in the mask."""
    _, model = pair(tiny_hf_dict(2))
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 40)
        bounds = [0, 1, 7, 17, 18, 27, 30, 40]  # after one token: a past of 1 builds its mask
        steps = [model(x[:, a:b], cache) for a, b in itertools.pairwise(bounds)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("t", [1, 2, 3])
def test_short_prefixes_see_no_later_token(t):
    _, model = pair(tiny_hf_dict(2))
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (model(x[:, :t]) - model(x)[:, :t]).abs().max().item() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    _, model = pair(tiny_hf_dict())
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_prefill_into_a_cache_is_the_plain_forward_bit_for_bit():
    """An empty cache's prefill and the cacheless forward compute the same positions 0..T-1
    (RoPE is relative, so positions shifted by one would only move the bits) with the same
    causal mask; last_only keeps the last position (B, 1, V) (lm_head over one row instead of
    T: a different GEMM, so equal up to rounding)."""
    _, model = pair(tiny_hf_dict(2))
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        full = model(x)
        assert torch.equal(model(x, model.new_cache(2, 20)), full)
        last = model(x, last_only=True)
        assert last.shape == (2, 1, 101)
        torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
        assert torch.equal(model.hidden(x), model.hidden(x, last_only=False))
        assert torch.equal(model.rotary(0, 1, torch.float32)[0], torch.ones(1, 16))


def test_rope_frequencies_follow_the_model_to_another_device():
    """inv_freq is copied to the model's device once, and again when the model moves."""
    _, model = pair(tiny_hf_dict(2))
    on_cpu = model.inv_freq()
    assert on_cpu.device.type == "cpu" and model.inv_freq() is on_cpu
    model.to("meta")
    assert model.inv_freq().device.type == "meta"


def test_greedy_generate_equals_argmax_of_full_forward():
    _, model = pair(tiny_hf_dict(2))
    prompt = [3, 14, 15, 92, 65]
    new = generate(model, prompt, 12)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt):]


def test_generate_stops_on_eos_and_sampling_is_seeded():
    _, model = pair(tiny_hf_dict(2))
    first = generate(model, [1, 2, 3], 1)[0]
    assert generate(model, [1, 2, 3], 10, eos_ids=(first,)) == [first]
    a = generate(model, [1, 2, 3], 10, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [1, 2, 3], 10, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
    # ...and it does sample, by the seed: the seeds give several continuations, not greedy's
    greedy = generate(model, [1, 2, 3], 10)
    runs = {tuple(generate(model, [1, 2, 3], 10, temperature=1.0, seed=s)) for s in range(8)}
    assert len(runs) > 1 and runs != {tuple(greedy)}


def test_generate_runs_without_autograd():
    """Decoding records no graph: with grad on, the KV cache's in-place writes would keep every
    step's graph alive and memory would grow with each token (the decorator once slipped)."""
    _, model = pair(tiny_hf_dict(2))
    assert any(p.requires_grad for p in model.parameters())  # as load_model leaves them
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.requires_grad))
    generate(model, [1, 2, 3], 3)
    assert seen == [False] * 3


def test_generate_checks_its_arguments():
    _, model = pair(tiny_hf_dict(2))  # vocab_size 101
    for bad in ({"top_p": 0.0}, {"top_p": 1.01}, {"temperature": -0.1}):
        with pytest.raises(ValueError, match="need temperature >= 0 and 0 < top_p <= 1"):
            generate(model, [1, 2, 3], 4, **bad)
    for prompt in ([1, 101], [-1, 2]):  # one past the table (an added pad token), negative
        with pytest.raises(ValueError, match="do not fit the model's vocabulary"):
            generate(model, prompt, 4)
    assert len(generate(model, [1, 100], 2)) == 2  # the last row is an id like any
    assert generate(model, [1, 2], 0) == []


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_softmax_of_logits_over_temperature(temperature):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 3
    g_ours, g_want = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    probs = torch.softmax(logits / temperature, -1)
    for _ in range(20):
        assert sample_next(logits, temperature, 1.0, g_ours) == int(
            torch.multinomial(probs, 1, generator=g_want))


def test_tiny_temperatures_sample_the_argmax_and_nan_is_refused():
    logits = torch.tensor([1.0, 3.0, 2.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1e-45, 1.0, g) for _ in range(10)} == {1}  # logits/T overflow
    _, model = pair(tiny_hf_dict(2))
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(model, [1, 2, 3], 4, temperature=float("nan"))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 0.5, g) for _ in range(50)}
    assert picks == {0}
    # the smallest set with mass >= top_p: one of two equal tokens (0.5 each) holds 0.5 already
    ties = torch.tensor([0.0, 0.0, -float("inf")])
    assert len({sample_next(ties, 1.0, 0.5, g) for _ in range(50)}) == 1
    assert {sample_next(ties, 1.0, 0.51, g) for _ in range(50)} == {0, 1}


def mistral_hf_dict(window: int | None) -> dict:
    d = {k: v for k, v in tiny_hf_dict(2).items() if k != "rope_scaling"}
    return {**d, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "sliding_window": window}


@pytest.mark.parametrize("window", [None, 48], ids=["no-window", "window"])
def test_mistral_matches_transformers_within_its_window(window):
    """Mistral is Llama's computation: transformers' MistralForCausalLM is the oracle up to the
    sliding window; past it we refuse (windowed attention is not implemented), and the window
    does change transformers' logits there, so running on would be wrong."""
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(
        transformers.MistralConfig(**mistral_hf_dict(window))).eval()
    config = LlamaConfig.from_hf_dict(hf.config.to_dict())
    assert (config.model_type, config.sliding_window) == ("mistral", window)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    assert config.to_hf_dict()["architectures"] == ["MistralForCausalLM"]
    ours = Llama(config).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
        cache = ours.new_cache(2, 48)
        steps = [ours(x[:, :40], cache)] + [ours(x[:, i:i + 1], cache) for i in range(40, 48)]
        assert (torch.cat(steps, 1) - ours(x)).abs().max().item() <= 1e-5
    if window is None:
        return
    longer = torch.randint(0, 101, (1, 60))
    with pytest.raises(ValueError, match="sliding attention window of 48"):
        ours(longer)
    with pytest.raises(ValueError, match="sequences .* limited to 48"):
        ours.new_cache(1, 49)
    # generate fills T + new - 1 positions (the last new token is never fed back): exactly the
    # window, and a prompt of the window's length still gets its one token
    prompt = x[0, :40].tolist()
    assert len(generate(ours, prompt, 9)) == 9
    assert len(generate(ours, x[0].tolist(), 1)) == 1
    with pytest.raises(ValueError, match="49 positions exceed"):
        generate(ours, prompt, 10)
    unwindowed = transformers.MistralForCausalLM(
        transformers.MistralConfig(**mistral_hf_dict(None)))
    unwindowed.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (hf(longer).logits[0, -1]
                - unwindowed.eval()(longer).logits[0, -1]).abs().max() > 1e-3


def qwen2_hf_dict(tied: bool) -> dict:
    d = {k: v for k, v in tiny_hf_dict(2, tied).items() if k != "rope_scaling"}
    return {**d, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
            "sliding_window": 32, "max_window_layers": 1}  # the window is off: no effect


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_matches_transformers(tied):
    """Qwen2 is Llama with biases on q, k and v (none on o): transformers' Qwen2ForCausalLM is
    the oracle, past its (switched-off) window too; the biases are random, so they count."""
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**qwen2_hf_dict(tied))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    config = LlamaConfig.from_hf_dict(hf.config.to_dict())
    assert (config.model_type, config.qkv_bias, config.attention_bias) == ("qwen2", True, False)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    saved = config.to_hf_dict()
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and "attention_bias" not in saved
    ours = Llama(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=not tied)
    assert ours.model.layers[0].self_attn.o_proj.bias is None
    x = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def qwen3_hf_dict(tied: bool, attention_bias: bool = False) -> dict:
    d = {k: v for k, v in tiny_hf_dict(2, tied).items() if k != "rope_scaling"}
    return {**d, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": attention_bias,
            "use_sliding_window": False, "sliding_window": None}  # H * Dh = 128 != hidden 64


@pytest.mark.parametrize("tied, bias", [(True, False), (False, True)])
def test_qwen3_matches_transformers(tied, bias):
    """Qwen3 is Llama with each head's q and k RMS-normalised before RoPE (and head_dim apart
    from hidden / heads): transformers' Qwen3ForCausalLM is the oracle; random norm weights
    and biases, so they count; the fused q/k/v path and the KV cache give the same."""
    from awq_ref.fuse import fuse_projections

    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_hf_dict(tied, bias))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:  # norms (q_norm, k_norm included) and biases
                p.normal_()
    config = LlamaConfig.from_hf_dict(hf.config.to_dict())
    assert (config.model_type, config.qk_norm, config.attention_bias) == ("qwen3", True, bias)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    assert config.to_hf_dict()["architectures"] == ["Qwen3ForCausalLM"]
    ours = Llama(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=not tied)
    x = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        want = hf(x).logits
        assert (want - ours(x)).abs().max().item() <= 1e-4
        cache = ours.new_cache(2, 48)
        steps = [ours(x[:, :40], cache)] + [ours(x[:, i:i + 1], cache) for i in range(40, 48)]
        assert (torch.cat(steps, 1) - want).abs().max().item() <= 1e-4
        assert fuse_projections(ours) == 2 * 2
        assert (want - ours(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rmsnorm_is_the_written_out_formula_bit_for_bit(dtype):
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576) + 0.5)
    x = (torch.randn(3, 5, 576, generator=torch.Generator().manual_seed(0)) * 300).to(dtype)
    x32 = x.float()  # 300^2 overflows fp16: the formula must run in fp32
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = norm(x)
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_apply_rotary_equals_the_rotate_half_form_bit_for_bit():
    t, dh = 7, 64
    freqs = torch.outer(torch.arange(3, 3 + t, dtype=torch.float32),
                        1.0 / 10000 ** (torch.arange(0, dh, 2).float() / dh))  # (T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    x = torch.randn(2, 4, t, dh)
    for dtype in (torch.float32, torch.float16):
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        xd = x.to(dtype)
        xd1, xd2 = xd.chunk(2, dim=-1)
        want = xd * cos + torch.cat((-xd2, xd1), dim=-1) * sin  # HF's formula
        assert torch.equal(apply_rotary(xd, *rotary_tables(freqs, dtype)), want)
