"""The chat template travels from the source (GGUF metadata, an HF folder) to a saved folder."""

import json

import pytest

from awq_ref.loaders import load_tokenizer
from awq_ref.loaders.gguf_tokenizer import gguf_chat_template

NAMED = [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "T"}]


def _folder(path, **config):
    """A tiny tokenizer.json (word level) with tokenizer_config.json holding `config`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir()
    tk = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, **config}))
    return path


@pytest.mark.parametrize("where, template", [
    ("config", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    ("config", NAMED),
    ("chat_template.jinja", "{{ 'jinja file' }}\n"),
    ("chat_template.json", "{{ 'json file' }}"),
])
def test_folder_template_is_read_and_saved(tmp_path, where, template):
    src = _folder(tmp_path / "src", **({"chat_template": template} if where == "config" else {}))
    if where == "chat_template.jinja":
        (src / where).write_text(template)
    elif where == "chat_template.json":
        (src / where).write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(src)
    assert tok.chat_template == template
    tok.save_pretrained(tmp_path / "out")  # an HF folder's files come back as they were
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in src.iterdir())
    assert all((tmp_path / "out" / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())
    assert load_tokenizer(tmp_path / "out").chat_template == template


def test_hf_folder_keeps_what_we_do_not_model(tmp_path):
    """pad token, model_max_length, the tokenizer class, special_tokens_map.json: verbatim."""
    src = _folder(tmp_path / "src", pad_token="</s>", model_max_length=2048,
                  tokenizer_class="LlamaTokenizerFast")
    (src / "special_tokens_map.json").write_text('{"pad_token": "</s>"}')
    (src / "unrelated.txt").write_text("not a tokenizer file")
    load_tokenizer(src).save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


def test_no_template_none_and_no_key(tmp_path):
    tok = load_tokenizer(_folder(tmp_path / "src"))
    assert tok.chat_template is None
    tok.files = {}  # as if not read from an HF folder: the config is written here
    tok.save_pretrained(tmp_path / "out")
    assert "chat_template" not in json.loads(
        (tmp_path / "out" / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("bad", [5, [], [{"name": "a"}], [{"name": 1, "template": "x"}],
                                 [{"name": "a", "template": "x", "extra": "y"}], {"t": "x"}])
def test_malformed_template_is_a_value_error_naming_the_file(tmp_path, bad):
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be"):
        load_tokenizer(_folder(tmp_path / "src", chat_template=bad))


def test_undecodable_jinja_file_is_a_value_error(tmp_path):
    src = _folder(tmp_path / "src")
    (src / "chat_template.jinja").write_bytes(b"{{ \xff\xfe }}")
    with pytest.raises(ValueError, match="chat_template.jinja: not UTF-8"):
        load_tokenizer(src)


def test_gguf_named_templates_become_hf_list():
    base = {"tokenizer.ggml.model": "gpt2"}
    assert gguf_chat_template(base) is None
    assert gguf_chat_template({**base, "tokenizer.chat_template": "A"}) == "A"
    assert gguf_chat_template({**base, "tokenizer.chat_template": "A",
                               "tokenizer.chat_template.tool_use": "B",
                               "tokenizer.chat_template.rag": "C"}) == [
        {"name": "default", "template": "A"}, {"name": "rag", "template": "C"},
        {"name": "tool_use", "template": "B"}]
    assert gguf_chat_template({**base, "tokenizer.chat_template.rag": "C"}) == [
        {"name": "rag", "template": "C"}]


def test_default_model_template_reaches_transformers(default_gguf, tmp_path):
    """The instruct model's template, from the GGUF to a saved folder that transformers'
    apply_chat_template renders (what vLLM's chat endpoint does with it)."""
    tok = load_tokenizer(default_gguf)
    assert tok.chat_template.startswith("{% for message in messages %}")
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == tok.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = hf.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                  add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def _hf_templates(folder):
    """transformers' reading of the folder's templates, in our form (str or named list)."""
    transformers = pytest.importorskip("transformers")
    got = transformers.AutoTokenizer.from_pretrained(str(folder)).chat_template
    return [{"name": n, "template": t} for n, t in got.items()] if isinstance(got, dict) else got


def test_named_template_files_are_read_and_saved_as_transformers_reads_them(tmp_path):
    """transformers 5 saves named templates as additional_chat_templates/NAME.jinja beside
    chat_template.jinja, and the files win over tokenizer_config's "chat_template". A saved
    checkpoint lost the named ones (the tool_use template of a chat model)."""
    src = _folder(tmp_path / "src", chat_template="{{ 'config' }}")
    (src / "chat_template.jinja").write_text("D {{ messages }}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("T {{ tools }}")
    want = [{"name": "default", "template": "D {{ messages }}"},
            {"name": "tool_use", "template": "T {{ tools }}"}]
    assert load_tokenizer(src).chat_template == want == _hf_templates(src)
    load_tokenizer(src).save_pretrained(tmp_path / "out")
    saved = tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja"
    assert saved.read_text() == "T {{ tools }}"
    assert load_tokenizer(tmp_path / "out").chat_template == want == _hf_templates(tmp_path / "out")


def test_the_template_file_wins_over_the_config(tmp_path):
    src = _folder(tmp_path / "src", chat_template="{{ 'config' }}")
    (src / "chat_template.jinja").write_text("{{ 'file' }}")
    assert load_tokenizer(src).chat_template == "{{ 'file' }}" == _hf_templates(src)


def test_a_template_file_not_named_in_utf8_is_a_value_error(tmp_path):
    import os

    src = _folder(tmp_path / "src")
    (src / "additional_chat_templates").mkdir()
    with open(os.path.join(os.fsencode(src / "additional_chat_templates"), b"\xff.jinja"),
              "w") as f:
        f.write("X")
    with pytest.raises(ValueError, match="not named in UTF-8"):
        load_tokenizer(src)
