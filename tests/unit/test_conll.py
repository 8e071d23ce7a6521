"""CoNLL files to model inputs: reading, labels from the data, a word's label on its first
sub-token only, special tokens and padding without targets, cut sentences, epochs of batches."""

import pytest
import torch

from plait.errors import ConfigError
from plait.finetune.conll import (
    Sentence,
    WordTokenizer,
    encode,
    label_names,
    padded_length,
    read_conll,
    read_splits,
    step_rows,
)
from plait.models.description import IGNORE

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_columns_between_are_ignored_and_docstart_skipped(tmp_path):
    (tmp_path / "train.txt").write_text(CONLL)
    got = read_conll(tmp_path / "train.txt")
    assert got == [Sentence(("EU", "rejects", "German"), ("B-ORG", "O", "B-MISC")),
                   Sentence(("Peter", "Blackburn"), ("B-PER", "I-PER"))]
    assert label_names({"train": got}) == ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert set(read_splits(str(tmp_path))) == {"train"}


def test_a_byte_order_mark_is_not_a_word_and_latin1_is_one_line(tmp_path):
    (tmp_path / "bom.txt").write_text("\ufeff-DOCSTART- O\n\nParis B-LOC\n", encoding="utf-8")
    assert read_conll(tmp_path / "bom.txt") == [Sentence(("Paris",), ("B-LOC",))]
    (tmp_path / "latin.txt").write_bytes("Köln B-LOC\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        read_conll(tmp_path / "latin.txt")
    assert "is not UTF-8" in str(e.value) and "latin.txt" in str(e.value)


def test_a_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "dev.txt").write_text("a O\n\nb B-X\nc\n")
    with pytest.raises(ConfigError) as e:
        read_conll(tmp_path / "dev.txt")
    assert f"{tmp_path / 'dev.txt'}:4" in str(e.value) and "'c'" in str(e.value)


@pytest.fixture
def wordpiece(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "peter", "black", "##burn", "lives"])}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                              ("[SEP]", 3)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return WordTokenizer(str(tmp_path / "tokenizer.json"))


def test_labels_sit_on_first_sub_tokens(wordpiece):
    s = [Sentence(("Peter", "blackburn", "lives"), ("B-PER", "I-PER", "O"))]
    labels = ["O", "B-PER", "I-PER"]
    pieces = wordpiece.split(s)
    assert pieces[0][0] == [2, 1, 5, 6, 7, 3]  # [CLS] [UNK] black ##burn lives [SEP] (no lowercasing here)
    enc = encode(s, pieces, labels, 8, wordpiece.pad_id)
    assert enc.tokens[0].tolist() == [2, 1, 5, 6, 7, 3, 0, 0]
    assert enc.padding[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert enc.targets[0].tolist() == [IGNORE, 1, 2, IGNORE, 0, IGNORE, IGNORE, IGNORE]
    assert enc.firsts == [[1, 2, 4]]
    cut = encode(s, pieces, labels, 4, wordpiece.pad_id)  # [CLS] [UNK] black [SEP]: "lives" is cut off
    assert cut.tokens[0].tolist() == [2, 1, 5, 3] and cut.firsts == [[1, 2, -1]]
    assert cut.targets[0].tolist() == [IGNORE, 1, 2, IGNORE]


def test_without_a_tokenizer_words_are_bytes():
    words = WordTokenizer("")
    s = [Sentence(("ab", "c"), ("B-X", "O"))]
    pieces = words.split(s)
    assert pieces == [([97, 98, 32, 99], [0, 0, None, 1])]
    enc = encode(s, pieces, ["O", "B-X", "I-X"], 8, words.pad_id)
    assert enc.targets[0, :4].tolist() == [1, IGNORE, IGNORE, 0] and enc.firsts == [[0, 3]]


def test_lengths_round_up_to_the_multiple_within_the_model():
    assert padded_length(13, 512, 8) == 16 and padded_length(13, 12, 8) == 8 and padded_length(17, 512, 24) == 24


def test_every_epoch_visits_each_sentence_once_in_a_fresh_order():
    steps = [step_rows(10, 5, s, seed=1) for s in range(4)]
    first, second = torch.tensor([*steps[0], *steps[1]]), torch.tensor([*steps[2], *steps[3]])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
