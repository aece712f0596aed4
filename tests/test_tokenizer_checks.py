"""The Tokenizer's own checks and the files it writes, at their edges: special ids from 0 to
the last token (and not one past), ids that are not integers however a JSON file spells them,
a chat-template list with one bad entry, the tokenizer_config.json built for a file without
one, a tokenizer.json with only padding or only truncation set, SentencePiece's own <unk>."""

import json
import shutil

import pytest

from awq_ref.loaders import load_tokenizer
from awq_ref.tokenizer import Tokenizer, check_chat_template
from tests.test_tokenizer_hostile import write_tokenizer_json

TEMPLATE = {"name": "default", "template": "{{ messages }}"}


@pytest.mark.parametrize("value", [
    [TEMPLATE, {"name": "tool_use"}], [TEMPLATE, {"name": "x", "template": 1}], [TEMPLATE, "x"],
    [],
])
def test_a_chat_template_list_with_one_bad_entry_is_refused(value):
    with pytest.raises(ValueError, match="src: chat_template must be a string or a non-empty"):
        check_chat_template(value, "src")
    assert check_chat_template([TEMPLATE, {**TEMPLATE, "name": "b"}], "src")[1]["name"] == "b"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A byte-level BPE backend of 257 tokens (the 256 bytes, then "ab")."""
    folder = write_tokenizer_json(tmp_path_factory.mktemp("tok") / "t")
    return load_tokenizer(folder).backend


@pytest.mark.parametrize("bos, eos", [(0, (256,)), (256, (0, 256))])
def test_special_ids_from_zero_to_the_last_token(backend, bos, eos):
    tok = Tokenizer(backend, bos, eos, add_bos=True)
    assert (tok.bos_id, tok.eos_ids) == (bos, tuple(dict.fromkeys(eos)))


@pytest.mark.parametrize("bos, eos", [(257, ()), (None, (257,)), (-1, ()), (None, (1.0,)),
                                      (True, ()), (None, ("2",))])
def test_special_ids_past_the_vocabulary_or_not_integers_are_refused(backend, bos, eos):
    with pytest.raises(ValueError, match=r"src: (bos|eos) id\(s\) .* are not token ids of the "
                                         "vocabulary of 257"):
        Tokenizer(backend, bos, eos, add_bos=True, source="src")


@pytest.mark.parametrize("eos, shown", [([2, -1], r"\[2, -1\]"), (True, "True"),
                                        ("2", "'2'"), ([2, 1.5], r"\[2, 1.5\]")])
def test_eos_ids_a_folder_spells_wrong_are_refused_naming_the_file(tmp_path, eos, shown):
    folder = write_tokenizer_json(tmp_path / "t")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(ValueError, match=f"generation_config.json: token id.s. {shown} must be "
                                         "non-negative integers"):
        load_tokenizer(folder)


@pytest.mark.parametrize("bos, message", [
    ("1", "token id.s. '1' must be non-negative integers"),
    (-1, "token id.s. -1 must be non-negative integers"),
    ([1, 2], r"bos_token_id=\[1, 2\] must be one token id"),
])
def test_a_bos_id_a_folder_spells_wrong_is_refused_naming_the_file(tmp_path, bos, message):
    """tokenizer_config.json's own bos_token ("!") is dropped here, so the BOS comes from
    generation_config.json, the file the error must name."""
    folder = write_tokenizer_json(tmp_path / "t")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "\""}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos}))
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        load_tokenizer(folder)


def test_tokenizer_config_built_for_a_bare_file_names_its_tokens(sp_model, tmp_path):
    """A tokenizer.model read as a file, with no HF files beside it: save_pretrained writes the
    model and a tokenizer_config.json naming BOS and EOS by their text, adding BOS only."""
    shutil.copy(sp_model[0] / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.source == str(tmp_path / "tokenizer.model") and not tok.files
    tok.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                      "add_eos_token": False, "bos_token_id": 1, "eos_token_ids": [2]}
    saved = (tmp_path / "saved" / "tokenizer.model").read_bytes()
    assert saved == (tmp_path / "tokenizer.model").read_bytes()
    no_bos = Tokenizer(tok.backend, None, (2,), add_bos=False)
    no_bos.save_pretrained(tmp_path / "no-bos")
    config = json.loads((tmp_path / "no-bos" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["bos_token_id"]) == (None, None)


def test_sentencepiece_unk_token_is_its_own_id(sp_model):
    backend = load_tokenizer(sp_model[0]).backend
    assert backend.token_to_id("<unk>") == 0 and backend.token_to_id("<s>") == 1
    assert backend.token_to_id("<never-a-piece>") is None


@pytest.mark.parametrize("bos, eos", [(0, 1), (1, 0)])
def test_sentencepiece_special_ids_of_zero_are_read(tmp_path, wikitext_test, bos, eos):
    """A SentencePiece model whose BOS or EOS is id 0 (unk 2): an id, not absent (-1 is)."""
    spm = pytest.importorskip("sentencepiece")
    text = wikitext_test.read_bytes().decode(errors="replace")[:50_000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=300, model_type="bpe", bos_id=bos, eos_id=eos, unk_id=2, minloglevel=2)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert (tok.bos_id, tok.eos_ids) == (bos, (eos,))
    assert tok.encode("the")[0] == bos


@pytest.mark.parametrize("fields", ["padding", "truncation"])
def test_padding_or_truncation_alone_is_saved_as_it_came(tmp_path, fields):
    """Read as a file (a folder's files are written back verbatim, see save_pretrained), the
    tokenizer.json is written by the backend: as it came, though neither setting is applied."""
    settings = {
        "padding": {"strategy": {"Fixed": 50}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "!"},
        "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                       "stride": 0}}
    folder = write_tokenizer_json(tmp_path / "t", **{fields: settings[fields]})
    tok = load_tokenizer(folder / "tokenizer.json")
    assert not tok.files
    assert len(tok.encode("ab abc hello world", add_bos=False)) > 2  # neither applied here
    tok.save_pretrained(tmp_path / "saved")
    saved = (tmp_path / "saved" / "tokenizer.json").read_text()
    assert json.loads(saved)[fields] == settings[fields]
    assert saved == json.dumps(json.loads(saved), indent=2, ensure_ascii=False)  # pretty


def test_an_empty_tokenizer_json_vocabulary_has_no_tokens():
    """Size = highest id + 1 (see TokenizersBackend): 0 for no ids at all, not 1 or 2."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from awq_ref.tokenizer import TokenizersBackend

    assert TokenizersBackend(HFTokenizer(models.WordLevel({}, unk_token="u"))).vocab_size() == 0
    assert TokenizersBackend(HFTokenizer(models.WordLevel({"u": 0}, unk_token="u"))
                             ).vocab_size() == 1
    added = HFTokenizer(models.WordLevel({"u": 0}, unk_token="u"))
    added.add_special_tokens(["<|end|>"])  # an added token: its id 1 counts
    assert TokenizersBackend(added).vocab_size() == 2


@pytest.mark.parametrize("text", ["{", '{"model": {"type": "BPE", "vocab": 3}}', "[]"])
def test_a_tokenizer_json_the_library_cannot_read_is_a_value_error(tmp_path, text):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match="tokenizer.json: cannot read tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
