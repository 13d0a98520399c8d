"""dLoRA's merged / unmerged switching inside one replica (Wu et al., OSDI 2024).

Merged mode folds one adapter slot ``m`` into the base weights (``CausalLM.merge_lora``), so a
token whose plan is ``m`` alone at weight 1 needs no LoRA work: a step whose every token is on
``m`` runs as the base model does, without the LoRA kernels (and, decoding, replays the base
model's CUDA graph). Every other token carries ``m`` at weight -1, so its output is unchanged:

    effective(plan) = plan with m's weight lowered by 1 ((m, -1) added where m is absent),
                      entries of weight 0 dropped
    x (W + d_m) + sum_k w_k d_k - d_m = x W + sum_k w_k d_k

Running example, m = slot 2::

    [(2, 1.0)]              -> ()                       no LoRA work
    []                      -> ((2, -1.0),)             a base request subtracts m
    [(0, 1.0)]              -> ((0, 1.0), (2, -1.0))
    [(2, 0.5), (0, 0.5)]    -> ((2, -0.5), (0, 0.5))

Policy (:class:`MergePolicy`), decided before each step on the plans of the sequences it runs:

- unmerged: merge ``m`` once at least ``merge_at`` of the sequences of ``patience`` consecutive
  steps ran ``[(m, 1)]``. By default all of them: in a step with any other plan the LoRA
  kernels launch anyway (at decode sizes their time hardly depends on how many tokens they
  cover) and the other tokens would carry one adapter more (docs/benchmarks.md measures 7/8).
- merged on ``m``: other plans are served with the compensation while at least
  ``unmerge_below`` of the step's sequences are on ``m`` alone (a switch rewrites every base
  projection, so a stray request should not cause two); the adapter is unmerged once the share
  stayed below that for ``patience`` steps, and at once when a plan has no room for the extra
  adapter (``MAX_K`` adapters without ``m``) or merging is switched off.

Numerics: the merged weights are rounded once to the model's dtype, as PEFT's
``merge_and_unload`` rounds them; unmerging restores them (see executor_svc.model.lora_merge).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kernels.metadata import MAX_K

Plan = tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class MergePolicy:
    enabled: bool = True
    patience: int = 8  # steps a switch condition must hold
    # Shares of a step's sequences that run the (candidate) merged adapter alone.
    merge_at: float = 1.0
    unmerge_below: float = 0.5

    def __post_init__(self):
        if self.patience < 1 or not 0.0 <= self.unmerge_below <= self.merge_at <= 1.0:
            raise ValueError(f"bad merge policy {self}: need 0 <= unmerge_below <= merge_at <= 1")


def effective_plan(plan: Sequence[tuple[int, float]], merged: int) -> Plan:
    """``plan`` as the kernels must run it while slot ``merged`` is folded into the base."""
    out, found = [], False
    for slot, w in plan:
        if slot == merged and not found:  # once, should the plan name the slot twice
            found, w = True, w - 1.0
        if w != 0.0:
            out.append((slot, w))
    if not found:
        out.append((merged, -1.0))
    return tuple(out)


def _room_for(merged: int, plans: Sequence[Sequence[tuple[int, float]]]) -> bool:
    """Whether every plan can carry ``merged`` too (only plans of MAX_K adapters may not)."""
    return all(len(p) < MAX_K or len(effective_plan(p, merged)) <= MAX_K for p in plans)


def _alone_on(plan: Sequence[tuple[int, float]]) -> int | None:
    """The slot of a plan that is one adapter at weight 1, else None."""
    if len(plan) == 1 and plan[0][1] == 1.0:
        return plan[0][0]
    return None


class MergeController:
    """Applies :class:`MergePolicy` to a model with ``merged_slot``, ``merge_lora`` and
    ``unmerge_lora`` (``CausalLM``); the runner calls :meth:`plans_for_step` once per step,
    under the model's step lock, so a switch is queued between two steps' kernels."""

    def __init__(self, model, policy: MergePolicy | None = None):
        self.model = model
        self.policy = policy or MergePolicy()
        self._streak = 0  # consecutive steps the pending switch's condition held
        self._candidate: int | None = None  # the slot those steps ran alone (unmerged)
        self._state: int | None = None  # merged slot when the streak was counted
        self.merged_steps = 0  # steps run merged ...
        self.compensated_steps = 0  # ... of which some plan subtracted the merged adapter

    def plans_for_step(self, plans: Sequence[Sequence[tuple[int, float]]]) -> list[Plan]:
        """Switch mode if the policy says so now, then return each plan as the kernels see it."""
        if getattr(self.model, "lora_store", None) is None:
            return [tuple(p) for p in plans]
        if plans:
            self._decide(plans)
        merged = self.model.merged_slot
        if merged is None:
            return [tuple(p) for p in plans]
        out = [effective_plan(p, merged) for p in plans]
        self.merged_steps += 1
        self.compensated_steps += any(out)
        return out

    def _decide(self, plans: Sequence[Sequence[tuple[int, float]]]) -> None:
        merged = self.model.merged_slot
        if merged != self._state:  # switched elsewhere (a slot write unmerges its slot)
            self._state, self._streak, self._candidate = merged, 0, None
        if merged is not None:
            if not self.policy.enabled or not _room_for(merged, plans):
                return self._switch(None)
            alone = sum(1 for p in plans if _alone_on(p) == merged)
            self._streak = self._streak + 1 if alone < self.policy.unmerge_below * len(plans) else 0
            if self._streak >= self.policy.patience:
                self._switch(None)
            return
        if not self.policy.enabled:
            return
        if self.policy.merge_at >= 1.0:  # every plan alone on one slot: stop at the first not
            slot = _alone_on(plans[0])
            everyone = slot is not None and all(_alone_on(p) == slot for p in plans[1:])
            alone = len(plans) if everyone else 0
        else:
            counts = Counter(_alone_on(p) for p in plans)
            counts.pop(None, None)
            slot, alone = counts.most_common(1)[0] if counts else (None, 0)
        if slot is None or alone < self.policy.merge_at * len(plans) or not _room_for(slot, plans):
            self._streak, self._candidate = 0, None
            return
        self._streak = self._streak + 1 if slot == self._candidate else 1
        self._candidate = slot
        if self._streak >= self.policy.patience:
            self._switch(slot)

    def _switch(self, slot: int | None) -> None:
        if slot is None:
            self.model.unmerge_lora()
        else:
            self.model.merge_lora(slot)
        self._state, self._streak, self._candidate = self.model.merged_slot, 0, None
