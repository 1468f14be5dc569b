"""The per-request loops over (preset, worker) pairs, compiled with numba.

A decision looks at every pair (16 presets x 64 replicas: 1024), and numpy
spends about two microseconds per call whatever the array size, so the two
dozen array operations a decision needs cost more than its 50 us budget.
Compiled, each loop is one call that touches every pair once.

``cache=True`` keeps the machine code on disk (``__pycache__`` beside this
file, else numba's user cache), so a new process loads it instead of
compiling. ``NUMBA_DISABLE_JIT=1`` runs these as plain Python, for debugging.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _first_at_least(values, lo, hi, x):
    """The first index in [lo, hi] whose value is >= x, values sorted and values[hi] >= x (binary search)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def forecast_pairs(prompt_tokens, max_tokens, chunk, chunk_fixed_ms, prefill_contexts, prefill_per_token,
                   bytes_terms, windows, page_tokens, tpot_terms, calibration, queue_terms, step_now, free, idle, budget,
                   release_bytes, release_ms, release_start):
    """One request on every (preset p, worker w) pair. ``times`` [4, presets, workers]: queue wait, ttft, tpot
    and completion (ms); ``flags`` [2, presets, workers]: fits (the cache fits the worker once everything
    there has finished) and admit_now (no FIFO queue there and the cache fits its free memory now). Two
    arrays, not six: each array handed back to Python costs about half a microsecond.

    All times calibrated by the worker's measured / predicted step ratio (``Fleet``):
        prefill    = prompt * per_token(p, prompt / 2) + chunks * chunk_fixed_ms
        queue      = prompts queued ahead * their mean per_token + their chunks' fixed costs
        memory     = until enough running rows have finished to free the cache the request needs
        tpot       = tpot_terms[0] + context * tpot_terms[1]   (context: the row's mean while it decodes)
        queue wait = queue + memory
        ttft       = queue wait + prefill + chunks * the running batch's step
        completion = ttft + (max_tokens - 1) * tpot
    """
    presets, workers = tpot_terms.shape[1], tpot_terms.shape[2]
    # per_token is read at half the prompt (its mean context while prefilled): linear between the profiled
    # contexts, along the last segment above them, held at the edge below (``policies.cost.interpolate``).
    half, last = prompt_tokens / 2, len(prefill_contexts) - 1
    i, t = 0, 0.0
    if last > 0:
        i = min(max(np.searchsorted(prefill_contexts, half) - 1, 0), last - 1)
        t = max((half - prefill_contexts[i]) / (prefill_contexts[i + 1] - prefill_contexts[i]), 0.0)
    j = min(i + 1, last)
    chunks = np.ceil(prompt_tokens / chunk)
    prefill = np.empty(presets)
    need = np.empty(presets)  # cache bytes: const + per full-attention page + per windowed page (whole blocks)
    length = prompt_tokens + max_tokens
    pages = np.ceil(length / page_tokens)
    total_per_token = 0.0
    for p in range(presets):
        per_token = prefill_per_token[p, i] + t * (prefill_per_token[p, j] - prefill_per_token[p, i])
        total_per_token += per_token
        prefill[p] = chunks * chunk_fixed_ms + prompt_tokens * per_token
        need[p] = bytes_terms[0, p] + pages * bytes_terms[1, p]
        for k in range(len(windows)):
            need[p] += np.ceil(min(length, windows[k]) / page_tokens) * bytes_terms[2 + k, p]
    context = prompt_tokens + max_tokens / 2
    decode_steps = max(max_tokens - 1, 0.0)

    queue = np.empty(workers)
    for w in range(workers):
        queue[w] = queue_terms[0, w] * (total_per_token / presets) + queue_terms[1, w]  # queued: any preset

    times = np.empty((4, presets, workers))
    flags = np.empty((2, presets, workers), dtype=np.bool_)
    for p in range(presets):
        for w in range(workers):  # innermost: contiguous in memory
            step = tpot_terms[0, p, w] + context * tpot_terms[1, p, w]
            missing = need[p] - free[w]
            memory = 0.0
            if missing > 0:  # the first release that frees enough (the curve ends at infinite bytes)
                memory = release_ms[_first_at_least(release_bytes, release_start[w], release_start[w + 1] - 1, missing)]
            first = queue[w] + memory + chunks * step_now[w] + prefill[p] * calibration[w]
            times[0, p, w] = queue[w] + memory
            times[1, p, w] = first
            times[2, p, w] = step
            times[3, p, w] = first + decode_steps * step
            flags[0, p, w] = need[p] <= budget[w]
            flags[1, p, w] = idle[w] and missing <= 0
    return times, flags


@_jit
def earliest_per_preset(times, flags, allowed, ttft_limit, tpot_limit, deadline, ttft_error, tpot_error, step_caps):
    """From ``forecast_pairs``' arrays: per preset, the earliest completion and its worker in four pools
    ([4, presets]; inf: the pool is empty):
        0: pairs admitted now that meet the budget,
        1: pairs that meet the budget,
        2: usable pairs (the preset is allowed and its cache fits the worker),
        3: pairs of pool 0 whose step also stays within ``step_caps[w]``, what the worker's running rows can
           still take and meet their own budgets (the new row's TPOT is the step they will share).
    The budget is checked on calibrated predictions: ttft and tpot scaled by the ratios measured on served
    requests; limits are inf where the request sets none. Ties go to the lowest worker index."""
    presets, workers = times.shape[1], times.shape[2]
    soonest = np.full((4, presets), np.inf)
    where = np.zeros((4, presets), dtype=np.int64)
    for p in range(presets):
        if not allowed[p]:
            continue
        for w in range(workers):
            if not flags[0, p, w]:  # the cache never fits there
                continue
            done = times[3, p, w]
            if done < soonest[2, p]:
                soonest[2, p], where[2, p] = done, w
            first = times[1, p, w] * ttft_error
            tpot = times[2, p, w] * tpot_error
            meets = (first <= ttft_limit and tpot <= tpot_limit
                     and first + (done - times[1, p, w]) * tpot_error <= deadline)
            if meets:
                if done < soonest[1, p]:
                    soonest[1, p], where[1, p] = done, w
                if flags[1, p, w]:  # admitted now
                    if done < soonest[0, p]:
                        soonest[0, p], where[0, p] = done, w
                    if tpot <= step_caps[w] and done < soonest[3, p]:
                        soonest[3, p], where[3, p] = done, w
    return soonest, where


@_jit
def poisson_quantile(mean, q):
    """The smallest k with P(N <= k) >= q for N ~ Poisson(mean) (q < 1; capped at 64)."""
    p = np.exp(-mean)
    cdf, k = p, 0
    while cdf < q and k < 64:
        k += 1
        p *= mean / k
        cdf += p
    return k


@_jit
def add_future_load(times, arrivals_per_ms, interference_ms, max_tokens, quantile):
    """Each pair's TPOT (and completion) with the prefills of the requests that arrive while it decodes, in place.

    Requests reach a worker as a Poisson stream at ``arrivals_per_ms[w]``; each new prompt is prefilled in chunks
    beside the running decodes, stretching them by its prefill time, ``interference_ms[w]``. Over a decode of
    (max_tokens - 1) steps at ``tpot``, the arrivals number N ~ Poisson(rate * steps * tpot); the request must
    meet its budget at N's ``quantile``-th quantile n, so its TPOT counts n prefills spread over its steps:
        tpot' = tpot + n * interference / steps
    n is counted at the unstretched decode's length, then once more at the stretched one's.
    (A request that meets its budget only while nothing else arrives keeps the best preset on an idle replica
    and loses its budget as soon as the next prompt comes: under load that was the common case.)"""
    steps = max(max_tokens - 1.0, 1.0)
    presets, workers = times.shape[1], times.shape[2]
    for w in range(workers):
        rate, cost = arrivals_per_ms[w], interference_ms[w]
        if rate <= 0 or cost <= 0:
            continue
        for p in range(presets):
            tpot = times[2, p, w]
            n = poisson_quantile(rate * steps * tpot, quantile)
            if n:  # the stretched decode lasts longer and sees more arrivals: count them once more
                n = poisson_quantile(rate * steps * (tpot + n * cost / steps), quantile)
                times[2, p, w] = tpot + n * cost / steps
                times[3, p, w] = times[1, p, w] + steps * times[2, p, w]
