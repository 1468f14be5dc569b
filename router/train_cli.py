"""``supernet-router train teacher|supernet``: the small supernet's two training stages (docs/model.md).

``register(commands)`` adds the ``train`` group to ``router.cli``'s sub-parsers;
the loop itself is ``workers/training/trainer.py``. Running the same command
again resumes an interrupted run from its last save.
"""

from __future__ import annotations

from pathlib import Path

from policies.errors import ConfigError

STAGE_DEFAULTS = {"teacher": dict(steps=1000, lr=3e-3), "supernet": dict(steps=350, lr=2e-3)}


def register(commands) -> None:
    train = commands.add_parser("train", help="train the small teacher, or distil it into a supernet")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, help_text in (("teacher", "an all-attention model trained on next-token loss"),
                             ("supernet", "four mixers per layer, trained by stochastic distillation from --teacher")):
        parser = stages.add_parser(stage, help=help_text)
        defaults = STAGE_DEFAULTS[stage]
        parser.add_argument("--corpus", default="stdlib",
                            help="'stdlib' (the Python standard library's sources, default), a folder of text files, "
                                 'or a .jsonl with a "text" per line')
        parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, log, resumable state")
        parser.add_argument("--steps", type=int, default=defaults["steps"], help=f"optimizer steps (default {defaults['steps']})")
        parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
        parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
        parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
        parser.add_argument("--lr", type=float, default=defaults["lr"], help=f"peak learning rate (default {defaults['lr']})")
        parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
        parser.add_argument("--seed", type=int, default=0, help="data, placement and init seed (default 0)")
        parser.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (default 100)")
        parser.add_argument("--save-every", type=int, default=100, help="save a resumable state every N steps (default 100)")
        if stage == "teacher":
            parser.add_argument("--shape", default="small", help="model shape: small (8 layers, default) or tiny")
            parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (default 4096)")
        else:
            parser.add_argument("--teacher", type=Path, required=True, help="checkpoint folder from `train teacher`")
            parser.add_argument("--window", type=int, help="sliding-window size (default: the shape's, 32 for small)")
        parser.set_defaults(run=run_train)


def run_train(args) -> int:
    import torch

    from workers.training.trainer import TrainSettings, train

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible (use --device cpu)")
    options = dict(stage=args.stage, corpus=args.corpus, steps=args.steps, batch_size=args.batch_size,
                   seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, seed=args.seed,
                   eval_every=args.eval_every, save_every=args.save_every)
    if args.stage == "teacher":
        options.update(shape=args.shape, vocab_size=args.vocab_size)
    else:
        if not (args.teacher / "config.json").exists():
            raise ConfigError(f"--teacher {args.teacher}: no config.json there (train one with `train teacher`)")
        if args.window is not None and args.window < 1:
            raise ConfigError(f"--window must be at least 1, got {args.window}")
        options.update(teacher=str(args.teacher), window_size=args.window)
    out = train(TrainSettings(**options), args.out, device=device)
    print(out)
    return 0
