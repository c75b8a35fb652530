"""The prefetch planner: one compiled call per layer step decides misses (cached or not), evictions and prefetches.

Shape key: G GPUs, S slots per GPU, X = L*E experts (flat id `layer * E + expert`), K experts needed now,
D lookahead layers, P most prefetches per step.

Every decision compares one number, the expected layer steps until an expert is next used:
    E[T] = dist + (1 - p) * L / q
where dist is the steps until the expert's layer comes round again, p the predicted chance it is chosen
there, and q the chance at each later visit. Evicting the largest E[T] approximates Belady's rule with
predictions in place of the future. Speculative prefetches only go into link time the step leaves idle,
and nothing the current layer needs is ever evicted, nor anything expected back not clearly later than the miss
that would take its slot. A prefetch that cannot land before its layer of this token runs is ranked by the visit
after. A step's misses most worth keeping take the slots first, and every miss the admission rule lets in is
cached (FETCH), as decode promotes every miss its policy prefers to a slot's holder: it is staged (copied into a
staging slot with the CPU computing a share) while its copy into the slot goes on behind the step, taking link time
from later steps and prefetches (`not_ready`). The rest (BYPASS) are staged, evicting nothing, or run whole on the
CPU, whichever ends the step sooner (`uncached`). Both choices may charge the link time a miss takes at a tuned
`link_value` step seconds a second: a miss run the slower way that leaves the link to prefetches can raise later
hits, and the step still lasts as long as the path it took.
"""

from __future__ import annotations

import numpy as np
from numba import njit

HIT, FETCH, CPU, BYPASS = 0, 1, 2, 3  # BYPASS: not cached, run by `uncached`; CPU: on the CPU whatever the link
FREE, NO_SLOT = -1, -2  # slot_expert entries: an empty slot; padding of a GPU with fewer than S slots (never chosen)
EPS = 1e-3


@njit(cache=True, inline="always")
def _staged_s(n_bytes, read_s, h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share):
    """(link seconds, CPU seconds) of a miss staged as moe_decode does it: copied into a staging slot (evicting
    nothing) while the CPU computes `stage_cpu_share` of its bytes from pinned memory (cpu_share.py)."""
    return (read_s + (1.0 - stage_cpu_share) * n_bytes / h2d_bytes_per_s,
            stage_cpu_share * n_bytes / cpu_bytes_per_s)


@njit(cache=True, inline="always")
def uncached(n_bytes, read_s, link_s, cpu_s, h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share, link_value=0.0):
    """How a miss that takes no slot runs: (staged, link seconds, CPU seconds) it adds to a step that already has
    `link_s` of link and `cpu_s` of CPU work. Staged (`_staged_s`), or computed whole on the CPU (the read-back
    path's choice for a miss it does not fetch), whichever ends the step sooner once each second of link staging
    takes is charged `link_value` seconds (what the link time would carry instead: the planner's prefetches; 0
    for a policy that has none); a tie stages, as the device path always does."""
    stage_link, stage_cpu = _staged_s(n_bytes, read_s, h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share)
    whole = read_s + n_bytes / cpu_bytes_per_s
    if max(link_s + stage_link, cpu_s + stage_cpu) + link_value * stage_link <= max(link_s, cpu_s + whole):
        return True, stage_link, stage_cpu
    return False, 0.0, whole


@njit(cache=True, inline="always")
def not_ready(n_bytes, remaining_bytes, read_s, link_s, cpu_s, h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share,
              link_value=0.0):
    """How an expert given a slot but not yet in it runs: (waits, link seconds, CPU seconds) it adds to the step.
    Either the step waits for the `remaining_bytes` of its copy (the read-back path fetches a miss so), or the miss
    is staged while its copy goes on behind the step (the device path: decode promotes a miss by a copy nothing
    waits for, moe_decode's account()), whichever ends the step sooner, each second of link (staging and promotion
    both) charged `link_value` seconds as in `uncached`; a tie waits. Never whole on the CPU: a miss the engine
    caches crosses the link either way."""
    wait_link = read_s + remaining_bytes / h2d_bytes_per_s
    stage_link, stage_cpu = _staged_s(n_bytes, read_s, h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share)
    promote_link = remaining_bytes / h2d_bytes_per_s
    if max(link_s + wait_link, cpu_s) + link_value * wait_link <= \
            max(link_s + stage_link, cpu_s + stage_cpu) + link_value * (stage_link + promote_link):
        return True, wait_link, 0.0
    return False, stage_link, stage_cpu


@njit(cache=True, inline="always")
def next_use_steps(x, layer, ahead, recent):
    """Expected layer steps until expert x is next used, seen from `layer` of the current token."""
    L, E, D = recent.shape[0], recent.shape[1], ahead.shape[0]
    m = x // E
    e = x - m * E
    dist = m - layer
    if dist <= 0:
        dist += L
    q = min(max(recent[m, e], EPS), 1.0)
    p = min(max(ahead[dist - 1, e], EPS), 1.0) if m > layer and dist <= D else q  # ahead: this token only
    return dist + (1.0 - p) * L / q


@njit(cache=True, inline="always")
def next_hit_steps(x, layer, ahead, recent, lands_s, step_s):
    """next_use_steps of a copy of x landing `lands_s` from now. One still under way when x's layer of this token
    runs (the steps before it as long as this one, `step_s`) is a miss there: its first hit is the next visit."""
    L, E = recent.shape
    m = x // E
    if m > layer and lands_s > (m - layer) * step_s:
        return m - layer + L / min(max(recent[m, x - m * E], EPS), 1.0)
    return next_use_steps(x, layer, ahead, recent)


@njit(cache=True)
def _slot_values(layer, needed, ahead, recent, slot_expert, value):
    """value (G*S,): E[T] of each slot's expert, +inf for a free slot, -1 for one the layer needs now or padding."""
    E = recent.shape[1]
    flat = slot_expert.ravel()
    for c in range(flat.shape[0]):
        x = flat[c]
        if x < 0:
            value[c] = np.inf if x == FREE else -1.0
            continue
        v = next_use_steps(x, layer, ahead, recent)
        if x // E == layer:
            for y in needed:
                if y == x:
                    v = -1.0
        value[c] = v


@njit(cache=True)
def _victim(value, S, link_free_s):
    """The slot with the largest E[T] on a GPU whose link has time left (link_free_s > 0), or -1."""
    best, best_v = -1, -1.0
    for g in range(link_free_s.shape[0]):
        if link_free_s[g] <= 0.0:
            continue
        for c in range(g * S, (g + 1) * S):
            if value[c] > best_v:
                best, best_v = c, value[c]
    return best


@njit(cache=True, inline="always")
def _read_s(x, on_disk, expert_bytes, disk_bytes_per_s):
    return expert_bytes[x] / disk_bytes_per_s if on_disk[x] else 0.0


@njit(cache=True)
def _place(x, c, slot_expert, expert_slot, remaining_bytes, expert_bytes):
    S = slot_expert.shape[1]
    old = slot_expert[c // S, c % S]
    if old >= 0:
        expert_slot[old] = -1
        remaining_bytes[old] = 0
    slot_expert[c // S, c % S] = x
    expert_slot[x] = c
    remaining_bytes[x] = expert_bytes[x]


@njit(cache=True, inline="always")
def _run_not_ready(x, g, on_disk, expert_bytes, remaining_bytes, disk_bytes_per_s, h2d_bytes_per_s, cpu_bytes_per_s,
                   stage_cpu_share, link_value, link_s, cpu_s, promote_s):
    """`not_ready` for expert x in a slot of GPU g: adds its link time to link_s[g] or, where the step does not wait
    for it, its copy to promote_s[g]; returns the CPU seconds it adds."""
    waits, add_link_s, add_cpu_s = not_ready(expert_bytes[x], remaining_bytes[x],
                                             _read_s(x, on_disk, expert_bytes, disk_bytes_per_s), link_s[g], cpu_s,
                                             h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share, link_value)
    link_s[g] += add_link_s
    if not waits:
        promote_s[g] += remaining_bytes[x] / h2d_bytes_per_s
    return add_cpu_s


@njit(cache=True)
def plan_step(layer, needed, ahead, recent, slot_expert, expert_slot, remaining_bytes, on_disk, expert_bytes,
              h2d_bytes_per_s, cpu_bytes_per_s, disk_bytes_per_s, stage_cpu_share, gpu_step_s, backlog_s, queue_steps,
              admit_margin, link_value, actions, prefetch):
    """Decide one layer step in place; returns how many prefetches were written to `prefetch`.

    layer: current MoE layer position; needed (K,) flat ids routed now; ahead (D, E) predicted use of
    layers layer+1..layer+D; recent (L, E) predicted use of each layer's next visit (this layer's row
    already from the current token); slot_expert (G, S) / expert_slot (X,) / remaining_bytes (X,) the slot
    table, updated here (slot_expert FREE or NO_SLOT where no expert is); on_disk (X,) experts in the cold tier;
    backlog_s (G,) prefetch work already queued per link; queue_steps: how many steps of idle link time the prefetch queue may hold;
    stage_cpu_share: the share of a staged miss's bytes the CPU computes (`uncached`);
    admit_margin: how many times later than a miss its victim must be expected back for the miss to take the slot;
    link_value: step seconds each second of link a miss takes is charged (`uncached`, `not_ready`);
    actions (K,) out: HIT / FETCH / BYPASS; prefetch (P,) out: flat ids newly in flight.
    All times in seconds, rates in bytes per second; nothing here knows the machine.
    """
    G, S = slot_expert.shape
    L, E = recent.shape
    value = np.empty(G * S)
    _slot_values(layer, needed, ahead, recent, slot_expert, value)
    link_s = np.zeros(G)
    always = np.ones(G)
    cpu_s = 0.0
    promote_s = np.zeros(G)  # copies into slots this step leaves running behind it
    for i in range(needed.shape[0]):  # hits and transfers already under way
        x = needed[i]
        c = expert_slot[x]
        if c >= 0 and remaining_bytes[x] == 0:
            actions[i] = HIT
        elif c >= 0:
            actions[i] = FETCH
            cpu_s += _run_not_ready(x, c // S, on_disk, expert_bytes, remaining_bytes, disk_bytes_per_s,
                                    h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share, link_value, link_s, cpu_s,
                                    promote_s)
        else:
            actions[i] = -1
    worth = np.zeros(needed.shape[0])  # misses most worth keeping take the slots first
    for i in range(needed.shape[0]):
        x = needed[i]
        worth[i] = -recent[x // E, x % E] if actions[i] < 0 else 0.0
    for i in np.argsort(worth):
        if actions[i] >= 0:
            continue
        x = needed[i]
        c = _victim(value, S, always)
        # a miss (next use L / q steps away) displaces only a copy expected back clearly later: a weak guess that
        # wins the slot would evict a better one
        q = min(max(recent[x // E, x % E], EPS), 1.0)
        if c >= 0 and value[c] > admit_margin * L / q:
            _place(x, c, slot_expert, expert_slot, remaining_bytes, expert_bytes)
            value[c] = -1.0
            actions[i] = FETCH
            cpu_s += _run_not_ready(x, c // S, on_disk, expert_bytes, remaining_bytes, disk_bytes_per_s,
                                    h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share, link_value, link_s, cpu_s,
                                    promote_s)
        else:
            g = np.argmin(link_s)
            _, by_link_s, by_cpu_s = uncached(expert_bytes[x], _read_s(x, on_disk, expert_bytes, disk_bytes_per_s),
                                              link_s[g], cpu_s, h2d_bytes_per_s, cpu_bytes_per_s, stage_cpu_share,
                                              link_value)
            link_s[g] += by_link_s
            cpu_s += by_cpu_s
            actions[i] = BYPASS
    step_s = max(gpu_step_s, cpu_s)
    for g in range(G):
        step_s = max(step_s, link_s[g])
    free_s = np.empty(G)
    for g in range(G):
        free_s[g] = queue_steps * step_s - link_s[g] - backlog_s[g] - promote_s[g]
    if free_s.max() <= 0.0:
        return 0  # the link is busy with demand copies: no room for speculation
    D = ahead.shape[0]
    P = prefetch.shape[0]
    lead_s = np.inf  # link time queued ahead of a new prefetch on the least busy link
    for g in range(G):
        lead_s = min(lead_s, link_s[g] + backlog_s[g] + promote_s[g])
    best_x = np.empty(P, np.int64)  # the P candidates of smallest E[T], ascending
    best_v = np.full(P, np.inf)
    n_ahead = min(D, L - 1) * E
    for j in range(n_ahead + needed.shape[0]):  # the next D layers (wrapping to the next token), then the
        # experts this step left uncached: routing that repeats from token to token wants them next time
        x = ((layer + 1 + j // E) % L) * E + j % E if j < n_ahead else needed[j - n_ahead]
        if expert_slot[x] >= 0 or on_disk[x]:
            continue
        v = next_hit_steps(x, layer, ahead, recent, lead_s + expert_bytes[x] / h2d_bytes_per_s, step_s)
        if v >= best_v[P - 1]:
            continue
        i = P - 1
        while i > 0 and best_v[i - 1] > v:
            best_v[i], best_x[i] = best_v[i - 1], best_x[i - 1]
            i -= 1
        best_v[i], best_x[i] = v, x
    n = 0
    for i in range(P):
        if best_v[i] == np.inf:
            break
        c = _victim(value, S, free_s)
        if c < 0 or value[c] <= best_v[i]:
            break
        x = best_x[i]
        _place(x, c, slot_expert, expert_slot, remaining_bytes, expert_bytes)
        value[c] = best_v[i]
        free_s[c // S] -= expert_bytes[x] / h2d_bytes_per_s
        prefetch[n] = x
        n += 1
    return n
