"""A reward for recipe tests on random toy models, passed as ``--reward_funcs tests.recipes.rewards:distinct_characters``."""


def distinct_characters(completions, **kwargs) -> list[float]:
    """Number of distinct characters: varies across a random model's samples, so GRPO advantages are nonzero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(set(text))) for text in texts]
