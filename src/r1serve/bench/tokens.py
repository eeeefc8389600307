"""Token arithmetic for the benchmark: the optional tokenizer, and what the bench does without one.

The bench measures any endpoint, so it never imports the engine; a Hugging Face `tokenizer.json` (read with
the `tokenizers` library) is all it needs to build prompts of an exact token length and to count tokens when
a server streams no usage. Without `--tokenizer` it approximates: prompts are sequences of common English
words, each preceded by a space, which the byte-level BPE tokenizers of Qwen2, Llama 3 and GPT-4 encode as
one token per word (the tests check this against the real R1 tokenizer); and output tokens are counted as
one per text-bearing stream chunk, which is what servers that stream token by token send.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

# Common English words that are one token (with a leading space) in Qwen2 / Llama 3 / GPT-4 vocabularies.
COMMON_WORDS: tuple[str, ...] = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there been one all we their has would when if so no will can more other what time up out
about into than them only some could new these two may first then do any like my now over such our man me
even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great old year off come
since against go came right used take three states himself few house use during without again place around
however home small found thought went say part once general high upon school every does got united left
number course war until always away something fact though water less public put think almost hand enough
far took head yet government system better set told nothing night end why called didn find look going
asked later knew point next city business give group toward young let room president side social given
present several order national possible rather second face per among form important often things early
white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members mind country area others done turned although
open problem sense began help certain means anything whole kind mother half real wife line behind across
""".split())

TOKENIZER_FILE = "tokenizer.json"


class BenchTokenizer:
    """A `tokenizers.Tokenizer` from a file or a model folder, with the few operations the bench needs."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"--tokenizer {path}: no {TOKENIZER_FILE} there (give a folder or the file)")
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise ValueError(f"--tokenizer {file}: cannot be read as a tokenizer ({e})") from e
        self.path = file
        self._word_ids: list[int] | None = None

    def count(self, text: str) -> int:
        """Number of tokens in `text`, without special tokens (no BOS)."""
        return len(self._tok.encode(text, add_special_tokens=False).ids) if text else 0

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=False)

    def word_token_ids(self) -> list[int]:
        """Ids of the tokens that are a space and 2–12 lowercase ASCII letters: a text of them re-encodes to
        exactly the same ids, which is what makes random prompts exact in length."""
        if self._word_ids is None:
            pattern = re.compile(r"Ġ[a-z]{2,12}")  # byte-level BPE writes a leading space as Ġ
            vocab = self._tok.get_vocab(with_added_tokens=False)
            self._word_ids = sorted(i for s, i in vocab.items() if pattern.fullmatch(s))
            if len(self._word_ids) < 100:
                raise ValueError(
                    f"--tokenizer {self.path}: not a byte-level BPE tokenizer with word tokens "
                    f"(found {len(self._word_ids)}); random prompts need one"
                )
        return self._word_ids

    def random_text(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """Random words that this tokenizer encodes as `num_tokens` tokens; returns (text, length)."""
        if num_tokens <= 0:
            return "", 0
        vocab = self.word_token_ids()
        token_ids = [rng.choice(vocab) for _ in range(num_tokens)]
        text = self.decode(token_ids)
        for _ in range(4):  # word tokens round-trip; re-check anyway, and trim or pad if a merge slipped in
            length = self.count(text)
            if length == num_tokens:
                break
            excess = length - num_tokens
            if excess > 0:
                token_ids = token_ids[: len(token_ids) - excess]
            else:
                token_ids = token_ids + [rng.choice(vocab) for _ in range(-excess)]
            text = self.decode(token_ids)
        return text, self.count(text)


def approximate_text(num_tokens: int, rng: random.Random) -> str:
    """Without a tokenizer: `num_tokens` common words, each one BPE token with its leading space."""
    return "".join(" " + rng.choice(COMMON_WORDS) for _ in range(num_tokens))
