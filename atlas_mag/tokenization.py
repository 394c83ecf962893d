"""The Atlas-MAG tokenizer: training a ByteLevel BPE like the published one (32,000 tokens, `<pad>`=0,
`<unk>`=1, `<bos>`=2, `<eos>`=3) and loading tokenizers from a `tokenizer.json` file, a folder or the Hub."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .cli import local_or_hub

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 32000, min_frequency: int = 2, split_digits: bool = False
) -> PreTrainedTokenizerFast:
    """Train a ByteLevel BPE on `texts`, laid out like the published tokenizer: the four special tokens take
    ids 0-3 in the order `<pad> <unk> <bos> <eos>`, then the 256 byte symbols, then the merges. `split_digits`
    makes every digit a token of its own (as Llama's and SmolLM's tokenizers do), so a number of n digits is n
    tokens whatever its value."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS) + 256:
        raise ValueError("The tokenizer learned no merges: the training text is empty or too small.")
    return wrap_backend_tokenizer(tokenizer)


def wrap_backend_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` tokenizer as a PreTrainedTokenizerFast with <pad>/<unk>/<bos>/<eos> that puts <bos> before
    every text, as training did (documents were `<bos> text <eos>`; a prompt gets no <eos>)."""
    absent = [token for token in SPECIAL_TOKENS.values() if backend.token_to_id(token) is None]
    if absent:
        raise ValueError(
            f"the tokenizer lacks the special tokens {absent}; Atlas-MAG needs {list(SPECIAL_TOKENS.values())}"
        )
    # add_bos_token makes transformers install a TemplateProcessing post-processor `<bos> $A` on the backend.
    # Transformers 5 saves that in tokenizer.json (not add_bos_token in tokenizer_config.json), so
    # AutoTokenizer.from_pretrained reproduces it.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        # Batched generation pads prompts on the left, so every prompt ends where generation starts.
        padding_side="left",
        **SPECIAL_TOKENS,
    )


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a bare `tokenizer.json` (with the four special tokens above), or from a folder or Hub
    repository that `AutoTokenizer` can read. It must define `<bos>` and `<eos>` ids for document packing."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist or is not a file")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as error:
            raise ValueError(f"{path} is not a `tokenizers` JSON file ({error})") from error
        try:
            tokenizer = wrap_backend_tokenizer(backend)
        except ValueError as error:
            raise ValueError(f"tokenizer {path}: {error}") from error
    else:
        tokenizer = AutoTokenizer.from_pretrained(local_or_hub(name_or_path, "tokenizer"))
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"Tokenizer {name_or_path} has no bos/eos token; documents are packed as <bos> text <eos>")
    return tokenizer
