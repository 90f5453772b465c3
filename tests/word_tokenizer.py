"""The one offline tokenizer of the tiny hosts: a word-level vocabulary with the host's special tokens."""

from __future__ import annotations

from typing import Any, Sequence


def word_tokenizer(words: Sequence[str], *, split: str = "spaces", pad_token: str = "<pad>", bos_token: str = "<s>",
                   eos_token: str = "</s>", **special: Any):
    """A ``PreTrainedTokenizerFast`` over ``words`` (a word's id is its position; unknown words are
    "<unk>", which ``words`` must hold). ``split``: "spaces" (words are what whitespace separates),
    "punctuation" (punctuation apart from the words too) or "lines" (spaces separate words and every
    newline is a token of its own, "\\n\\n" two, as in the tiny vocabularies of hosts whose prompts hold
    newlines). ``special`` goes to ``PreTrainedTokenizerFast`` as is: the host's further special tokens
    (``extra_special_tokens``, ...), ``padding_side``, ``chat_template``."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    splits = {
        "spaces": pre_tokenizers.WhitespaceSplit,
        "punctuation": pre_tokenizers.Whitespace,
        "lines": lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]),
    }
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = splits[split]()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=vocabulary, unk_token="<unk>", pad_token=pad_token,
                                                bos_token=bos_token, eos_token=eos_token, **special)
