"""Speculative decoding: measured decode tokens/s on this CPU, and the speed model's predicted gain for 15B.

``--measure`` (the default checkpoint, fp32, one thread): the quality preset
(all attention) alone and as a full batch, with and without each faster preset
drafting k tokens, greedy, prompts of ``--prompt-tokens`` seeded random tokens.
Decode tokens/s = tokens generated after the first / seconds from the first
token to the last (the draft's prefill included, the target's excluded).

``--predict``: the router's own prediction (``SlaPolicy``, 15B shapes, the
roofline H100 speed table, or ``--speed`` a measured one; published presets as drafts of all-attention at an
assumed per-token acceptance) of TPOT with and without speculation at 4k / 16k /
32k context and batch 1 / 16 / memory-filling (a replica holding that many
all-attention rows at that context): the gain and the chosen draft and k.

    .venv/bin/python bench/speculation.py              # both; one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(batches: list[int], prompt_tokens: int, max_tokens: int, draft_tokens: int, seed: int) -> dict:
    import torch

    from router.defaults import SHIPPED, default_checkpoint, default_presets
    from workers.engine import Engine, EngineConfig, Request
    from workers.model.loader import load_checkpoint
    from workers.sampling import SamplingParams

    torch.set_num_threads(1)
    model = load_checkpoint(default_checkpoint(), dtype=torch.float32)
    config = model.config
    presets = default_presets(SHIPPED / "presets.json")
    target = config.placement(next(p.placement for p in presets if p.name == "quality"))
    drafts = {p.name: config.placement(p.placement) for p in presets if p.name != "quality"}
    memory = config.memory_model(kv_bytes=4)
    out = {}
    for batch in batches:
        generator = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(4, config.vocab_size, (prompt_tokens,), generator=generator).tolist()
                   for _ in range(batch)]
        for name, draft in [("plain", None), *drafts.items()]:
            k = draft_tokens if draft is not None else 0
            need = batch * memory.speculative_bytes(target, draft, prompt_tokens + max_tokens, k)
            engine = Engine(model, EngineConfig(cache_budget_bytes=need + 2 * memory.block_bytes, max_running=batch,
                                                max_prefill_tokens=prompt_tokens * batch))
            for i, prompt in enumerate(prompts):
                engine.add_request(Request(prompt, target, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                           f"r{i}", draft=draft, draft_tokens=k))
            first, tokens = None, 0
            while engine.has_work():
                events = engine.step()
                produced = sum(e.token_id is not None for e in events)
                if produced and first is None:
                    first, tokens = time.perf_counter(), tokens - produced  # count tokens after the first step
                tokens += produced
            seconds = time.perf_counter() - first
            entry = {"tokens_per_s": round(tokens / seconds, 1)}
            if draft is not None:
                (pair,) = engine.stats().speculation
                entry.update(draft=draft.code, acceptance=round(pair.acceptance_rate, 3),
                             tokens_per_verify=round((pair.accepted + pair.verifies) / pair.verifies, 2))
            out[f"b{batch}/{name}"] = entry
        plain = out[f"b{batch}/plain"]["tokens_per_s"]
        for name in drafts:
            out[f"b{batch}/{name}"]["speedup"] = round(out[f"b{batch}/{name}"]["tokens_per_s"] / plain, 2)
    return out


def predict(acceptance: float, contexts: list[int], budget_gib: float, speed_path: str | None = None) -> dict:
    from policies.cost import SpeedModel
    from policies.published import PUBLISHED_PRESETS
    from policies.placement import Mixer, Placement
    from policies.roofline import roofline_speed_dict, super_apriel_memory
    from policies.routing import PresetInfo, RoutingRequest, SlaPolicy
    from policies.routing.predict import Predictor
    from policies.routing.types import RunningRow, WorkerState
    from policies.speculation import AcceptanceRates
    from policies.tables import SpeedFile

    memory = super_apriel_memory()
    if speed_path is None:
        speed = SpeedModel.from_file(SpeedFile.model_validate(roofline_speed_dict(memory)))
    else:  # a measured 15B table (`supernet-router profile --shape superapriel-15b --device cuda`)
        from policies.tables import read_speed_model

        speed = read_speed_model(speed_path)

    def spread(preset) -> Placement:
        slots = []
        for mixer, n in preset.counts().items():
            slots += [((i + 0.5) / n, mixer) for i in range(n)]
        return Placement(tuple(m for _, m in sorted(slots, key=lambda s: (s[0], s[1].value))))

    presets = [PresetInfo(p.name, spread(p), p.retention_pct / 100) for p in PUBLISHED_PRESETS]
    target = presets[0]
    rates = AcceptanceRates({(target.placement.code, p.placement.code): (acceptance, acceptance) for p in presets[1:]})
    policy = SlaPolicy(Predictor(speed, presets), acceptance=rates)
    budget = int(budget_gib * 2**30)
    out = {}
    for context in contexts:
        per_row = memory.sequence_bytes(target.placement, context + 256)
        filling = memory.max_sequences(target.placement, context + 256, budget)
        for batch in (1, 16, filling):
            running = tuple(RunningRow(target.placement, context, 256, per_row) for _ in range(batch - 1))
            state = WorkerState("w", running, cache_budget_bytes=2**62, cache_used_bytes=0)
            decision = policy.decide(RoutingRequest(context, 256, preset=target.name), [state])
            tpot = decision.prediction.tpot_ms
            plain = decision.plain_tpot_ms or tpot
            out[f"{context // 1024}k/b{batch}"] = {
                "plain_tpot_ms": round(plain, 2), "tpot_ms": round(tpot, 2), "gain": round(plain / tpot, 2),
                "draft": decision.draft_preset, "draft_tokens": decision.draft_tokens}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--acceptance", type=float, default=0.75, help="assumed per-token acceptance for --predict")
    parser.add_argument("--budget-gib", type=float, default=40.0, help="cache budget of a 15B replica (H100: ~40)")
    parser.add_argument("--speed", help="--predict on this measured 15B speed table instead of the roofline one")
    parser.add_argument("--only", choices=["measure", "predict"], help="run one part")
    args = parser.parse_args()
    result = {"bench": "speculation", "params": {k: v for k, v in vars(args).items() if k != "only"}}
    # Flat columns for docs/benchmarks.md: b<batch>/<draft>: tokens/s, x (against plain), acceptance, tokens per
    # verify step; 15b/<context>/b<batch>: predicted gain, the draft chosen and k.
    if args.only in (None, "measure"):
        measured = measure([int(b) for b in args.batches.split(",")], args.prompt_tokens, args.max_tokens,
                           args.draft_tokens, args.seed)
        for key, entry in measured.items():
            result[f"{key} tok/s"] = entry["tokens_per_s"]
            if "speedup" in entry:
                result[f"{key} x"] = entry["speedup"]
                result[f"{key} acceptance"] = entry["acceptance"]
                result[f"{key} tokens/verify"] = entry["tokens_per_verify"]
    if args.only in (None, "predict"):
        for key, entry in predict(args.acceptance, [4096, 16384, 32768], args.budget_gib, args.speed).items():
            result[f"15b/{key} gain"] = entry["gain"]
            result[f"15b/{key} draft"] = f"{entry['draft']} k={entry['draft_tokens']}" if entry["draft"] else "off"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
