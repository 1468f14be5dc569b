"""Tokenizers: load a checkpoint's own ``tokenizer.json``, or train a small byte-level BPE.

Whether a BOS token is added is the tokenizer file's to say (its
post-processor), as in Hugging Face; the model adds no tokens.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from policies.errors import CheckpointError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3: bos 1 and eos 2, as the Apriel2 config defaults

# For checkpoints whose tokenizer_config.json has no chat_template (and written into the small ones).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict):
        self._tokenizer = tokenizer
        self.config = config
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self._chat_template = None  # compiled on first use (compiling costs ~100x a render)

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(f"{directory}: no tokenizer.json beside the weights")
        try:
            tokenizer = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{file}: unreadable tokenizer ({exc})") from None
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return cls(tokenizer, config)

    def _special_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # AddedToken serialisation
            token = token.get("content")
        return self._tokenizer.token_to_id(token) if token else None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for a conversation, ending where the assistant's reply starts (as HF renders it)."""
        if self._chat_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            source = self.config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._chat_template = environment.from_string(source)
        template = self._chat_template
        special = {k: self._token_text(k) for k in ("bos_token", "eos_token")}
        return template.render(messages=messages, add_generation_prompt=True, **special)

    def _token_text(self, key: str) -> str:
        token = self.config.get(key) or ""
        return token.get("content", "") if isinstance(token, dict) else token

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids for a conversation; a BOS the template already wrote is not added twice."""
        text = self.apply_chat_template(messages)
        ids = self.encode(text)
        bos = self._token_text("bos_token")
        if bos and text.startswith(bos) and len(ids) > 1 and ids[0] == ids[1] == self.bos_token_id:
            ids = ids[1:]
        return ids

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")


def stdlib_texts(max_bytes: int, skip_bytes: int = 0) -> Iterator[str]:
    """Python standard library sources, in a fixed order: text that every machine with Python has.

    ``skip_bytes`` skips whole files until that much text has gone by (held-out text after a training prefix).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    total, skipped = 0, 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("[a-z]*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if skipped < skip_bytes:
            skipped += len(text)
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (any text encodes) whose post-processor prepends ``<s>``."""
    tokenizer = _HFTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "model_max_length": 4096,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    return Tokenizer(tokenizer, config)
