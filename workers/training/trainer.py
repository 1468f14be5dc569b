"""The training loop for both stages: the all-attention teacher (next-token loss) and the supernet (distillation).

A run lives in its ``--out`` folder:

    config.json, model.safetensors, tokenizer*.json   the latest checkpoint (Apriel2 layout, bf16)
    trainer_state.pt                                  fp32 weights, optimizer, step: what a resume reads
    train_log.jsonl                                   loss, learning rate, tokens/s; held-out loss at evaluations
    corpus.json                                       the corpus split, in documents, characters and tokens

Every batch is a function of (seed, step) alone: the rows are random windows
of the training stream and, for the supernet, each row's placement draws one
mixer per layer uniformly. So a resumed run is the run that was not
interrupted, and the same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from policies.errors import ConfigError
from policies.placement import MIXERS, Mixer, Placement
from workers.evaluation import Scorer
from workers.model.batch import ForwardBatch
from workers.model.config import parse_config
from workers.model.loader import load_checkpoint, save_checkpoint
from workers.model.supernet import SupernetLM
from workers.model.tiny import init_weights
from workers.model.tokenizer import Tokenizer, train_bpe
from workers.training.corpus import Document, TokenStream, read_documents, split
from workers.training.shapes import SHAPES, supernet_config, supernet_config_from_teacher, teacher_config
from workers.training.surgery import init_from_teacher

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
EXPORT_DTYPE = torch.bfloat16  # halves the shipped file; the fp32 master weights stay in trainer_state.pt


@dataclass(frozen=True)
class TrainSettings:
    stage: str  # "teacher" or "supernet"
    corpus: str = "stdlib"
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    shape: str = "small"  # teacher only: a name in shapes.SHAPES
    vocab_size: int = 4096  # teacher only: the BPE vocabulary
    window_size: int | None = None  # supernet only: sliding window (default: the shape's)
    teacher: str | None = None  # supernet only: the teacher's checkpoint folder
    eval_every: int = 200
    eval_tokens: int = 16384
    save_every: int = 200
    log_every: int = 10

    def check(self) -> None:
        if self.stage not in ("teacher", "supernet"):
            raise ConfigError(f"unknown stage {self.stage!r} (expected teacher or supernet)")
        for name in ("steps", "batch_size", "eval_every", "eval_tokens", "save_every", "log_every", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown --shape {self.shape!r} (known: {', '.join(SHAPES)})")
        if self.stage == "supernet" and not self.teacher:
            raise ConfigError("training a supernet needs --teacher DIR (a checkpoint from `train teacher`)")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Stage:
    """What differs between the two stages: the model, what trains, and the loss."""

    def __init__(self, settings: TrainSettings, out: Path, device: torch.device, train_docs: list[Document]):
        self.settings, self.out, self.device = settings, out, device
        self.teacher: SupernetLM | None = None
        if settings.stage == "teacher":
            self.tokenizer = _teacher_tokenizer(settings, out, train_docs)
            shape = SHAPES[settings.shape]
            raw = teacher_config(supernet_config(shape, self.tokenizer.vocab_size, self.tokenizer.bos_token_id,
                                                 self.tokenizer.eos_token_id))
            self.model = SupernetLM(parse_config(raw)).to(device)
            init_weights(self.model, torch.Generator().manual_seed(settings.seed), std=0.02)
        else:
            teacher_dir = Path(settings.teacher)
            self.tokenizer = Tokenizer.load(teacher_dir)
            self.tokenizer.save(out)
            self.teacher = load_checkpoint(teacher_dir, device=device, dtype=torch.float32, kernels="torch")
            self.teacher.requires_grad_(False)
            window = settings.window_size or SHAPES[settings.shape]["window_size"]
            raw = supernet_config_from_teacher(self.teacher.config.raw, window)
            self.model = SupernetLM(parse_config(raw)).to(device)
            init_from_teacher(self.model, self.teacher, torch.Generator().manual_seed(settings.seed))
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(".mixer." in name)  # embeddings, MLPs, norms and head stay the teacher's
        self.num_layers = self.model.config.num_layers

    def placements(self, rng: np.random.Generator, rows: int) -> list[Placement]:
        if self.teacher is None:
            return [Placement((Mixer.ATTENTION,) * self.num_layers)] * rows
        draws = rng.integers(0, len(MIXERS), size=(rows, self.num_layers))
        return [Placement(tuple(MIXERS[i] for i in row)) for row in draws]

    def loss(self, tokens: torch.Tensor, placements: list[Placement]) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
        logits = self.model(ForwardBatch.dense(inputs, placements), all_logits=True).float()
        if self.teacher is None:
            return F.cross_entropy(logits, targets)
        with torch.no_grad():
            teacher_batch = ForwardBatch.dense(inputs, [self.teacher.config.main_placement] * len(placements))
            reference = torch.log_softmax(self.teacher(teacher_batch, all_logits=True).float(), dim=-1)
        # KL(teacher || student) per token: the student learns the teacher's whole next-token distribution
        return F.kl_div(torch.log_softmax(logits, dim=-1), reference, log_target=True, reduction="batchmean")

    def eval_placements(self) -> list[Placement]:
        if self.teacher is None:
            return [self.model.config.main_placement]
        return [Placement((m,) * self.num_layers) for m in MIXERS]


def _teacher_tokenizer(settings: TrainSettings, out: Path, train: list[Document]) -> Tokenizer:
    """A BPE trained on the corpus's training split (reused when resuming)."""
    if (out / "tokenizer.json").exists():
        return Tokenizer.load(out)
    log.warning("training a %d-token BPE on the %s corpus", settings.vocab_size, settings.corpus)
    tokenizer = train_bpe((d.text for d in train), settings.vocab_size)
    tokenizer.save(out)
    return tokenizer


def train(settings: TrainSettings, out: str | Path, device: str = "cpu", progress: bool | None = None,
          stop_after: int | None = None) -> Path:
    """Train (or resume) a run in ``out``; returns the folder. ``stop_after`` ends early, as an interruption would."""
    settings.check()
    train_docs, heldout_docs = split(read_documents(settings.corpus))  # a bad corpus fails before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    device = torch.device(device)
    saved = _read_state(out, settings)
    stage = Stage(settings, out, device, train_docs)
    model = stage.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    step = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
        log.warning("%s: resuming at step %d of %d", out, step, settings.steps)

    train_stream = TokenStream.encode(train_docs, stage.tokenizer)
    heldout_stream = TokenStream.encode(heldout_docs, stage.tokenizer)
    if len(train_stream.tokens) <= settings.seq_len + 1:
        raise ConfigError(f"the corpus has {len(train_stream.tokens)} training tokens: fewer than one --seq-len window")
    (out / "corpus.json").write_text(json.dumps({"corpus": settings.corpus, "train": train_stream.summary(),
                                                 "heldout": heldout_stream.summary()}, indent=2) + "\n")
    # Held-out loss: the same windows every evaluation, each scored from position 0 (the toolkit's Scorer).
    scorer = Scorer(model, heldout_stream.windows(settings.seq_len + 1, settings.eval_tokens).tolist(), batch_windows=16)
    train_tokens = torch.from_numpy(train_stream.tokens.astype(np.int64))
    tokens_per_step = settings.batch_size * settings.seq_len
    log_file = out / LOG_FILE
    if log_file.exists():  # keep what the saved state has seen: a resume rewrites the rest
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_file.write_text("".join(line + "\n" for line in kept))

    def save() -> None:
        _write_state(out, settings, model, optimizer, step)
        save_checkpoint(model, out, dtype=EXPORT_DTYPE)

    def evaluate() -> None:
        model.eval()
        losses = {p.code: round(-scorer(p)[0], 5) for p in stage.eval_placements()}
        model.train()
        _append(log_file, {"step": step, "heldout": losses})
        bar.write(f"step {step}: held-out loss " + ", ".join(f"{code} {value:.4f}" for code, value in losses.items()),
                  file=sys.stderr)

    model.train()
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    bar = tqdm(total=settings.steps, initial=step, desc=f"train {settings.stage}", unit="step",
               disable=None if progress is None else not progress)
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    try:
        if step == 0:
            evaluate()
        while step < end:
            rng = np.random.default_rng([settings.seed, step])
            starts = rng.integers(0, len(train_tokens) - settings.seq_len - 1, size=settings.batch_size)
            batch = torch.stack([train_tokens[s:s + settings.seq_len + 1] for s in starts]).to(device)
            placements = stage.placements(rng, settings.batch_size)
            lr = settings.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = stage.loss(batch, placements)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, settings.clip)
            optimizer.step()
            step += 1
            window_loss += float(loss.detach())
            window_steps += 1
            bar.update(1)
            if step % settings.log_every == 0 or step == end:
                seconds = time.perf_counter() - window_start
                rate = tokens_per_step * window_steps / seconds
                _append(log_file, {"step": step, "loss": round(window_loss / window_steps, 5), "lr": lr,
                                   "tokens_per_s": round(rate, 1)})
                bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", tok_s=f"{rate:,.0f}")
                window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
            if step % settings.eval_every == 0 or step == settings.steps:
                evaluate()
            if step % settings.save_every == 0 or step == end:
                save()
    except KeyboardInterrupt:
        save()
        bar.write(f"interrupted at step {step}: saved; the same command resumes it", file=sys.stderr)
        raise
    finally:
        bar.close()
    if saved is not None and saved["step"] == settings.steps:
        save_checkpoint(model, out, dtype=EXPORT_DTYPE)  # already finished: make sure the export is there
    return out


def _read_state(out: Path, settings: TrainSettings) -> dict | None:
    file = out / STATE_FILE
    if not file.exists():
        return None
    saved = torch.load(file, map_location="cpu", weights_only=False)
    old = saved["settings"]
    new = dataclasses.asdict(settings)
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        key = changed[0]
        raise ConfigError(f"{out} holds a run with {key}={old.get(key)!r}, not {new[key]!r}: "
                          "repeat its options to resume it, or give another --out")
    return saved


def _write_state(out: Path, settings: TrainSettings, model: SupernetLM, optimizer, step: int) -> None:
    temporary = out / (STATE_FILE + ".tmp")
    torch.save({"settings": dataclasses.asdict(settings), "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, temporary)
    os.replace(temporary, out / STATE_FILE)  # an interruption mid-write leaves the previous state whole


def _append(file: Path, record: dict) -> None:
    with file.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
