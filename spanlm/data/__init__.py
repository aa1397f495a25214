"""Data layer: raw text -> SentencePiece ids -> packed TFDS array_record rows -> grain batches."""
from spanlm.data.corpus import CorpusError, CorpusStats, Document, read_documents, resolve_files
from spanlm.data.pipeline import eval_batches, train_iterator
from spanlm.data.prepare import (PreparedDataset, ensure_prepared, is_prepared, load_prepared,
                                 pack_document, prepare_corpus)
from spanlm.data.tokenizer import (CLS_ID, MASK_ID, NUM_RESERVED, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID,
                                   Tokenizer, train_sentencepiece)
