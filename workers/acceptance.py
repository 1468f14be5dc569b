"""How often a draft placement's proposals survive verification by a target placement, measured on the engine.

For each (target, draft) pair and each mode (greedy, temperature 1), the same
prompts (consecutive slices of a text) run as one continuous batch with
speculation on, and the engine's own counters are read back: proposals
verified and kept, verify steps, and the steps that refused a proposal. Those
give the acceptance table (``policies.tables.AcceptanceFile``) that the router's
speculation decision reads (``policies.speculation``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from policies.errors import ConfigError
from policies.placement import Placement
from policies.tables import AcceptanceCounts, AcceptanceData, AcceptanceEntry, AcceptanceFile, Fingerprint
from workers.engine import Engine, EngineConfig, Request
from workers.model.supernet import SupernetLM
from workers.sampling import SamplingParams


def cut_prompts(tokens: Sequence[int], count: int, prompt_tokens: int) -> list[list[int]]:
    """``count`` prompts of ``prompt_tokens`` tokens, spread evenly over ``tokens``."""
    if len(tokens) < prompt_tokens + 1:
        raise ConfigError(f"the data has {len(tokens)} tokens; a prompt needs {prompt_tokens} (lower --prompt-tokens)")
    stride = max(1, (len(tokens) - prompt_tokens) // max(count, 1))
    starts = range(0, len(tokens) - prompt_tokens + 1, stride)
    return [list(tokens[s:s + prompt_tokens]) for s in list(starts)[:count]]


def measure_pair(model: SupernetLM, prompts: list[list[int]], target: Placement, draft: Placement,
                 draft_tokens: int, params: SamplingParams) -> AcceptanceCounts:
    """Run every prompt with speculation, all in one batch; the engine's counters for the pair."""
    memory = model.config.memory_model(kv_bytes=model.dtype.itemsize)
    context = len(prompts[0]) + params.max_tokens
    need = len(prompts) * memory.speculative_bytes(target, draft, context, draft_tokens)
    engine = Engine(model, EngineConfig(cache_budget_bytes=need + 2 * memory.block_bytes, max_running=len(prompts),
                                        decode_graphs="off"))
    for i, prompt in enumerate(prompts):
        seeded = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, ignore_eos=True,
                                seed=None if params.seed is None else params.seed + i)
        engine.add_request(Request(prompt, target, seeded, f"p{i}", draft=draft, draft_tokens=draft_tokens))
    for event in engine.run_until_idle():
        if event.error:
            raise RuntimeError(f"measuring ({target.code}, {draft.code}): {event.error}")
    (stats,) = [s for s in engine.stats().speculation if (s.target, s.draft) == (target.code, draft.code)]
    return AcceptanceCounts(verify_steps=stats.verifies, drafted=stats.drafted, accepted=stats.accepted,
                            rejected_steps=stats.rejected_steps,
                            accepted_per_verify=stats.accepted / stats.verifies if stats.verifies else 0.0,
                            acceptance_rate=stats.acceptance_rate or 0.0)


def measure(model: SupernetLM, prompts: list[list[int]], pairs: list[tuple[Placement, Placement]], draft_tokens: int,
            max_tokens: int, seed: int, fingerprint: Fingerprint, source: str,
            progress: bool | None = None) -> AcceptanceFile:
    """The acceptance table of ``pairs``: greedy and temperature-1 runs of ``prompts`` each."""
    entries = []
    runs = [(target, draft, mode) for target, draft in pairs for mode in ("greedy", "sampled")]
    counts: dict = {}
    for target, draft, mode in tqdm(runs, desc="acceptance", unit="run",
                                    disable=None if progress is None else not progress):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if mode == "greedy" else 1.0,
                                seed=None if mode == "greedy" else seed)
        counts[target, draft, mode] = measure_pair(model, prompts, target, draft, draft_tokens, params)
    for target, draft in pairs:
        entries.append(AcceptanceEntry(target=target.code, draft=draft.code, greedy=counts[target, draft, "greedy"],
                                       sampled=counts[target, draft, "sampled"]))
    data = AcceptanceData(source=source, prompts=len(prompts), prompt_tokens=len(prompts[0]), max_tokens=max_tokens,
                          seed=seed)
    return AcceptanceFile(format="supernet-router/acceptance", version=1, fingerprint=fingerprint,
                          draft_tokens=draft_tokens, data=data, entries=entries)
