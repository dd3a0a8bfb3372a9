"""The tokenizer of the embedded tiny random DeepSeek-V3 model, built in code, in Hugging Face format.

`build_tiny_tokenizer(out_dir)` writes `tokenizer.json` and `tokenizer_config.json`, which both
`moemesh.model.tokenizer.Tokenizer.from_dir` and `transformers.AutoTokenizer.from_pretrained` load.

Vocabulary: the DeepSeek-V3 special tokens first (BOS is id 0, EOS id 1, as in DeepSeek-V3), then
one token per character of a fixed alphabet, then BPE merges. The merges are not trained: they are
derived from an English and code word list written for this module, in list order, each word
alone and with a leading space; after the words come operator pairs and made-up syllables, which only
large vocabularies reach. Each word is first split with the merges made so far, then merged up to a
single token, so every token is reachable and building is deterministic and takes milliseconds.
A small model needs tokens that look like text, not good compression, so this is enough.

Streaming clients see each token's text on its own, so every token that is not special decodes to at
least one visible character, except four whitespace tokens (space, tab, newline, carriage return).
That rules out byte-level tokens (a lone UTF-8 continuation byte decodes to nothing printable) and
byte fallback (same), so the alphabet is characters, not bytes:

- printable ASCII, space, tab, newline, carriage return: ASCII text round-trips exactly;
- Latin-1 letters and signs and a few typographic marks (é, ß, £, “, —, …): they round-trip too;
- any other character (CJK, emoji, ASCII control codes) encodes to `<unk>`, one per character, which
  is special and so dropped by decode(skip_special_tokens=True). Lossy, but never an error.

With `chat_tokens=True` the vocabulary also ends with DeepSeek's chat tokens (`<think>`, `</think>`, the
tool-call and tool-output markers of `moemesh.chat.tokens`), as DeepSeek's ends with them after its
own: single tokens that the chat parsers key on. They are added tokens but not special, as in DeepSeek's
vocabulary, so decode() keeps them. The default (False) writes the same files as before, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from moemesh.chat import tokens as chat

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
UNK_TOKEN = "<unk>"
# Ids are positions in this tuple; the returned dict uses these names, as a model config does.
SPECIAL_TOKENS = (
    ("bos_token_id", BOS_TOKEN),
    ("eos_token_id", EOS_TOKEN),
    ("pad_token_id", PAD_TOKEN),
    ("user_token_id", USER_TOKEN),
    ("assistant_token_id", ASSISTANT_TOKEN),
    ("unk_token_id", UNK_TOKEN),
)
# With chat_tokens=True: the last ids of the vocabulary, in this order, named as in the returned dict.
CHAT_TOKENS = (
    ("think_open_token_id", chat.THINK_OPEN),
    ("think_close_token_id", chat.THINK_CLOSE),
    ("tool_calls_begin_token_id", chat.TOOL_CALLS_BEGIN),
    ("tool_call_begin_token_id", chat.TOOL_CALL_BEGIN),
    ("tool_sep_token_id", chat.TOOL_SEP),
    ("tool_call_end_token_id", chat.TOOL_CALL_END),
    ("tool_calls_end_token_id", chat.TOOL_CALLS_END),
    ("tool_outputs_begin_token_id", chat.TOOL_OUTPUTS_BEGIN),
    ("tool_outputs_end_token_id", chat.TOOL_OUTPUTS_END),
    ("tool_output_begin_token_id", chat.TOOL_OUTPUT_BEGIN),
    ("tool_output_end_token_id", chat.TOOL_OUTPUT_END),
)
assert tuple(t for _, t in CHAT_TOKENS) == chat.CHAT_TOKENS  # one list of DeepSeek's chat tokens
MODEL_MAX_LENGTH = 4096  # the tiny model's context

WHITESPACE = " \t\n\r"
_TYPOGRAPHIC = "–—‘’“”…•€™"
ALPHABET = tuple(
    [chr(c) for c in range(0x21, 0x7F)]
    + list(WHITESPACE)
    # Latin-1 without the no-break space (whitespace) and the soft hyphen (invisible).
    + [chr(c) for c in range(0xA1, 0x100) if c != 0xAD]
    + list(_TYPOGRAPHIC)
)

# GPT-2-like pieces: a word with its leading space, one digit, a run of signs, or whitespace. Merges
# never cross a piece boundary, and runs of whitespace stay single-character tokens.
PRE_TOKENIZER_PATTERN = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Written for this module: common English words, roughly most frequent first, then code words.
_WORDS = """
the of and to in is it that for you was with on as are be this have not at by from or but
he she they we his her their an my your our all one can will there what so if about which
when up out do no time just more some would like them other than then now into only its could
new also two first way well even because any these give day most us good make know get see
after use work year over back think how want people me go here very through where much should
man woman world life hand part child eye place week case point number group problem fact
say said made found took came went told asked seemed left called felt become began kept
look need feel try ask seem call leave put mean keep let begin help talk turn start show hear
play run move live believe hold bring happen write provide sit stand lose pay meet include
continue set learn change lead understand watch follow stop create speak read allow add spend
grow open walk win offer remember love consider appear buy wait serve die send expect build
stay fall cut reach kill remain suggest raise pass sell require report decide pull
long great little own old right big high different small large next early young important few
public bad same able last late hard major better best sure free true whole real full
clear strong possible simple short low local sure easy special main human social
home water room mother father area money story month lot study book job word business issue
side kind head house service friend power hour game line end member law car city community name
president team minute idea kid body information school face others level office door health
person art war history party result morning reason research girl guy moment air teacher force
education food light river tree sun moon sky rain wind snow stone fire road garden window table
paper letter music voice color picture question answer example list order system program
never always often sometimes again still ever yet already soon today tomorrow yesterday
each every both either neither such many several enough less least own
before while during without under around among between against toward upon within
who whom whose why however therefore although though unless until since whether
hello thanks please sorry yes okay
def return import class self print none true false null function const var let
while elif else try except finally raise lambda yield async await pass break
string int float bool list dict tuple value key index data file path error test result
config model token layer tensor batch size shape input output request response server client
"""
_CAPITALIZED = 120  # the first words of the list also get a capitalized form
_SIGNS = (
    " =", " ==", " !=", " +", " -", " *", " /", " <", " >", " <=", " >=", " (", " [", " {", " #",
    " //", " ->", " =>", " +=", " -=", " &&", " ||", " \"", " '", " `", " |",
    "()", "):", ");", "),", "(),", "[]", "{}", "\",", "\".", "\":", "',", "').", "...", "**", "__",
    "://", "->", "=>", ".\"", ",\"", "?\"", "!\"", "--", "##", "###", "```", "}}", "{{",
)
# Syllables for large vocabularies, once the words are used up.
_ONSETS = (
    "b c d f g h j k l m n p r s t v w y z ch sh th wh bl br cl cr dr fl fr gl gr pl pr sc sk sl sm "
    "sn sp st sw tr qu"
).split()
_VOWELS = "a e i o u ai ea ee oo ou".split()
_CODAS = ["", *"n r s t l m d ck ll ng nt nd st".split()]


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 1024, *, chat_tokens: bool = False) -> dict[str, int]:
    """Write the tiny model's `tokenizer.json` and `tokenizer_config.json` into `out_dir`.

    `vocab_size` counts every token, special ones included. Returns the special token ids by name
    (`bos_token_id`, `eos_token_id`, `pad_token_id`, `user_token_id`, `assistant_token_id`,
    `unk_token_id`, and with `chat_tokens` the names of `CHAT_TOKENS`). `chat_tokens` makes DeepSeek's
    think and tool-call tokens the vocabulary's last ids (fewer merges, the same vocab_size). Raises
    ValueError for a vocab_size outside what this construction reaches.
    """
    extra = CHAT_TOKENS if chat_tokens else ()
    vocab, merges = _vocab_and_merges(vocab_size, reserved=len(extra))
    for _, token in extra:
        vocab[token] = len(vocab)
    tokenizer = _assemble(vocab, merges, [token for _, token in extra])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # write_bytes: no platform newline translation, so the files are byte-identical everywhere.
    (out_dir / "tokenizer.json").write_bytes((tokenizer.to_str(pretty=True) + "\n").encode("utf-8"))
    config_text = json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_bytes(config_text.encode("utf-8"))
    return {name: vocab[token] for name, token in (*SPECIAL_TOKENS, *extra)}


# A DeepSeek-V3-style template: BOS, the system prompts, then the turns; an assistant turn ends in EOS.
CHAT_TEMPLATE = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system')"
    " | map(attribute='content') | join('\\n\\n') -%}\n"
    "{{- bos_token + system -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'user' -%}\n"
    f"    {{{{- '{USER_TOKEN}' + message['content'] -}}}}\n"
    "  {%- elif message['role'] == 'assistant' -%}\n"
    f"    {{{{- '{ASSISTANT_TOKEN}' + message['content'] + eos_token -}}}}\n"
    "  {%- elif message['role'] != 'system' -%}\n"
    "    {{- raise_exception('the tiny model knows the roles system, user and assistant, not '"
    " + message['role']) -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT_TOKEN}' -}}}}{{%- endif -%}}\n"
)


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        # transformers would otherwise remove the space in " ." when decoding: not lossless.
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def _assemble(vocab: dict[str, int], merges: list[tuple[str, str]], plain_added: list[str]) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        tokenizers.Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"
    )
    # Tokens hold their spaces literally, so decoding is concatenation.
    tokenizer.decoder = decoders.Fuse()
    # For transformers, which adds BOS through the post-processor; our Tokenizer adds it itself.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, 0)]
    )
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(token, special=True, normalized=False) for _, token in SPECIAL_TOKENS]
    )
    if plain_added:
        # Matched as whole tokens in any text, yet kept by decode(skip_special_tokens=True), as in DeepSeek's.
        tokenizer.add_tokens([tokenizers.AddedToken(token, special=False, normalized=False) for token in plain_added])
    return tokenizer


def _vocab_and_merges(vocab_size: int, reserved: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of `vocab_size - reserved` tokens (`reserved` ids are left for the caller)."""
    vocab: dict[str, int] = {}
    for token in [t for _, t in SPECIAL_TOKENS] + list(ALPHABET):
        vocab[token] = len(vocab)
    if vocab_size - reserved < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab) + reserved} (special tokens + alphabet), "
                         f"got {vocab_size}")
    vocab_size -= reserved
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for form in _forms():
        pieces = _split(form, ranks)
        while len(pieces) > 1 and len(vocab) < vocab_size:
            i = _pair_to_merge(pieces)
            pair = (pieces[i], pieces[i + 1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces[i : i + 2] = [pair[0] + pair[1]]
        if len(vocab) == vocab_size:
            return vocab, merges
    raise ValueError(f"vocab_size must be at most {len(vocab) + reserved} for the tiny tokenizer, "
                     f"got {vocab_size + reserved}")


def _forms() -> Iterator[str]:
    """The strings that become tokens, most wanted first; each is one pre-tokenizer piece."""
    for i, word in enumerate(_WORDS.split()):
        yield word
        yield " " + word
        if i < _CAPITALIZED:
            yield word.capitalize()
            yield " " + word.capitalize()
    yield from _SIGNS
    for digit in "0123456789":
        yield " " + digit
    for onset in _ONSETS:
        for vowel in _VOWELS:
            for coda in _CODAS:
                yield onset + vowel + coda
                yield " " + onset + vowel + coda


def _split(text: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as `tokenizers` runs it: apply the lowest-ranked adjacent merge, leftmost first."""
    pieces = list(text)
    while len(pieces) > 1:
        best = min(range(len(pieces) - 1), key=lambda i: ranks.get((pieces[i], pieces[i + 1]), len(ranks)))
        if (pieces[best], pieces[best + 1]) not in ranks:
            return pieces
        pieces[best : best + 2] = [pieces[best] + pieces[best + 1]]
    return pieces


def _pair_to_merge(pieces: list[str]) -> int:
    """Join the shortest pair first, and a leading space last, so " word" comes from " " + "word"."""
    candidates = [i for i in range(len(pieces) - 1) if pieces[i] != " "] or [0]
    return min(candidates, key=lambda i: len(pieces[i]) + len(pieces[i + 1]))
