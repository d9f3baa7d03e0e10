"""A hand-built word-level tokenizer for tests whose token ids must be known exactly."""
from __future__ import annotations

WORDS = ["Answer:", "yes", "no", "A", "B", "C", "the", "cat", "dog", "please", "thanks"] + [f"w{i}" for i in range(40)]
PAD, BOS, EOS, UNK = 5, 1, 2, 3


def word_tokenizer(pad: bool = True):
    """A hand-built word-level PreTrainedTokenizerFast: whitespace split, bos prepended, pad id 5 (not 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<x0>": 0, "<s>": BOS, "</s>": EOS, "<unk>": UNK, "<x4>": 4, "<pad>": PAD}
    for w in WORDS:
        vocab[w] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", BOS), ("</s>", EOS)])
    kw = dict(pad_token="<pad>") if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, **kw)


def wid(tok, word: str) -> int:
    return tok.convert_tokens_to_ids(word)
