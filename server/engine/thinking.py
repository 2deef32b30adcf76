"""A thinking budget (vLLM's `thinking_token_budget`): a reasoning model writes at most N tokens inside its
thinking; then its closing tag is forced, token by token, and the answer follows.

The thinking is found in the output's token ids, as vLLM's ThinkingTokenBudgetLogitsProcessor finds it: the opening
and closing tags' token sequences (`ThinkingBudget.start` / `end`, the tokenizer's encoding of the reasoning parser's
tags). An output starts inside a thinking when its prompt or template opened one (`ThinkingBudget.opened`); every
later opening tag starts a new count. The closing tag is forced from where the output already is in it (a model that
began the tag itself is not made to write it twice). The engine takes a forced token whatever the logits say; its
log-probability is still the model's."""

from __future__ import annotations

from server.engine.types import ThinkingBudget


def _ends_with(tokens: list[int], tag: tuple[int, ...]) -> bool:
    n = len(tag)
    return len(tokens) >= n and tuple(tokens[-n:]) == tag


class ThinkingState:
    """One output's place against its budget: whether it is inside a thinking, and how many tokens it wrote there."""

    __slots__ = ("budget", "count", "inside", "recent")

    def __init__(self, budget: ThinkingBudget) -> None:
        self.budget = budget
        self.inside = budget.opened
        self.count = budget.spent if budget.opened else 0  # tokens written inside the current thinking
        self.recent: list[int] = []  # the output's last tokens, as many as the longer tag has

    def feed(self, token: int) -> None:
        """The output's next token."""
        b = self.budget
        self.recent.append(token)
        del self.recent[: -max(len(b.start), len(b.end))]
        if self.inside:
            self.count += 1
            if _ends_with(self.recent, b.end):
                self.inside, self.count = False, 0
        elif _ends_with(self.recent, b.start):
            self.inside, self.count = True, 0

    def forced(self) -> int | None:
        """The token the output must take next (the closing tag's next one once the budget is spent), or None."""
        b = self.budget
        if not self.inside or self.count < b.tokens:
            return None
        # the longest end of the output that is a start of the closing tag (shorter than the whole tag)
        for k in range(min(len(b.end) - 1, len(self.recent)), 0, -1):
            if tuple(self.recent[-k:]) == b.end[:k]:
                return b.end[k]
        return b.end[0]
