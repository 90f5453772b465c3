"""The one offline tokenizer of the tiny hosts: a word-level vocabulary with the host's special tokens."""

from __future__ import annotations

from typing import Any, Optional, Sequence


def word_tokenizer(words: Sequence[str], *, pre_tokenizer: Optional[Any] = None, **special: Any):
    """A ``PreTrainedTokenizerFast`` over ``words`` (a word's id is its position; unknown words are
    "<unk>", which ``words`` must hold), split by ``pre_tokenizer`` (default: on whitespace).
    ``special`` goes to ``PreTrainedTokenizerFast`` as is: the host's special tokens (``pad_token``,
    ``extra_special_tokens``, ...), ``padding_side``, ``chat_template``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizer if pre_tokenizer is not None else pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=vocabulary, unk_token="<unk>", **special)
