"""The small supernet's numbers for docs/model.md, from a finished `bench/train_small.sh` run.

    .venv/bin/python bench/model_summary.py RUNS ASSET [--plot docs/img/training-curves.png]

Prints a readable report on stderr and one JSON line on stdout (bench/report.py record model_small).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def losses(quality_file: Path) -> dict[str, float]:
    """Placement code -> held-out loss (nats/token, the negated mean log-likelihood)."""
    return {r["placement"]: -r["mean_loglik"] for r in json.loads(quality_file.read_text())["results"]}


def unigram_loss(teacher: Path) -> float:
    """Held-out cross-entropy of the training split's token frequencies (add-one smoothed): the floor to beat."""
    from workers.model.tokenizer import Tokenizer
    from workers.training.corpus import TokenStream, read_documents, split

    tokenizer = Tokenizer.load(teacher)
    train, held_out = split(read_documents("stdlib"))
    counts = np.bincount(TokenStream.encode(train, tokenizer).tokens, minlength=tokenizer.vocab_size) + 1.0
    probability = counts / counts.sum()
    return float(-np.log(probability[TokenStream.encode(held_out, tokenizer).tokens]).mean())


def plot(runs: Path, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    teacher, supernet = log_records(runs / "teacher"), log_records(runs / "supernet")
    left.plot([r["step"] for r in teacher if "loss" in r], [r["loss"] for r in teacher if "loss" in r],
              label="train (next-token)", lw=1)
    held = [r for r in teacher if "heldout" in r]
    left.plot([r["step"] for r in held], [next(iter(r["heldout"].values())) for r in held], "o-", label="held-out")
    left.set(title="teacher (all attention)", xlabel="step", ylabel="loss, nats/token")
    left.legend()
    held = [r for r in supernet if "heldout" in r]
    for code in held[0]["heldout"]:
        right.plot([r["step"] for r in held], [r["heldout"][code] for r in held], "o-", label=f"held-out {code}")
    twin = right.twinx()
    twin.plot([r["step"] for r in supernet if "loss" in r], [r["loss"] for r in supernet if "loss" in r],
              color="grey", lw=0.8, label="train KL to teacher")
    twin.set_ylabel("KL(teacher || student), nats/token")
    right.set(title="supernet (stochastic distillation)", xlabel="step", ylabel="held-out loss, nats/token")
    right.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("asset", type=Path)
    parser.add_argument("--plot", type=Path, default=Path("docs/img/training-curves.png"))
    args = parser.parse_args()
    runs, asset = args.runs, args.asset

    from policies.surrogate import ClusterExpansion

    teacher_log, supernet_log = log_records(runs / "teacher"), log_records(runs / "supernet")
    teacher_heldout = next(iter([r for r in teacher_log if "heldout" in r][-1]["heldout"].values()))
    supernet_heldout = [r for r in supernet_log if "heldout" in r][-1]["heldout"]
    all_attention = "A" * len(next(iter(supernet_heldout)))
    unigram = unigram_loss(runs / "teacher")

    quality = losses(asset / "quality.json")
    fit = json.loads((asset / "surrogate.json").read_text())
    surrogate = ClusterExpansion.from_dict(fit["surrogate"])
    measured = losses(runs / "presets-measured.json")
    half_a, half_b = losses(runs / "halves-a.json"), losses(runs / "halves-b.json")

    def relative(table: dict[str, float]) -> dict[str, float]:
        return {code: value - table[all_attention] for code, value in table.items()}

    rel_a, rel_b = relative(half_a), relative(half_b)
    noise = max(abs(rel_a[c] - rel_b[c]) for c in rel_a)
    pure = {code: quality[code] for code in ("AAAAAAAA", "SSSSSSSS", "GGGGGGGG", "KKKKKKKK")}
    gaps = sorted(abs(a - b) for i, a in enumerate(pure.values()) for b in list(pure.values())[i + 1:])
    rmse = fit["holdout"]["rmse"]
    presets = {}
    for name in ("presets.json", "presets-h100.json"):
        for p in json.loads((asset / name).read_text())["presets"]:
            predicted = -surrogate.predict(p["placement"])
            presets[p["placement"]] = {"file": name, "name": p["name"], "predicted_loss": round(predicted, 4),
                                       "measured_loss": round(measured[p["placement"]], 4),
                                       "within_rmse": abs(predicted - measured[p["placement"]]) <= 2 * rmse}
    plot(runs, args.plot)

    summary = {
        "bench": "model_small",
        "teacher_heldout_loss": round(teacher_heldout, 4),
        "supernet_all_attention_heldout_loss": round(supernet_heldout[all_attention], 4),
        "all_attention_vs_teacher_pct": round(100 * (supernet_heldout[all_attention] / teacher_heldout - 1), 2),
        "unigram_heldout_loss": round(unigram, 4),
        "supernet_pure_heldout_loss": {k: round(v, 4) for k, v in supernet_heldout.items()},
        "quality_pure_loss": {k: round(v, 4) for k, v in pure.items()},
        "smallest_pure_gap": round(gaps[0], 4),
        "half_noise": round(noise, 4),
        "placements_scored": len(quality),
        "heldout_spearman": round(fit["holdout"]["spearman"], 4),
        "heldout_r2": round(fit["holdout"]["r2"], 4),
        "heldout_rmse": round(rmse, 4),
        "presets": presets,
        "perplexity_all_attention": round(math.exp(pure["AAAAAAAA"]), 2),
    }
    for key, value in summary.items():
        print(f"{key:>38}: {value}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
