"""Rewards and verifiers for recipe tests on toy models, passed by ``module:function`` (e.g.
``--reward_funcs tests.recipes.rewards:distinct_characters``)."""


def distinct_characters(completions, **kwargs) -> list[float]:
    """Number of distinct characters: varies across a random model's samples, so GRPO advantages are nonzero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(set(text))) for text in texts]


def even_length(completion, answer) -> bool:
    """A REDI trace verifier for tests: the trace has an even number of characters (about half of them do)."""
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    return len(text) % 2 == 0


def never_correct(completion, answer) -> bool:
    """A REDI trace verifier that accepts nothing: a teacher with no correct trace."""
    return False


def always_correct(completion, answer) -> bool:
    """A REDI trace verifier that accepts everything: no incorrect trace, so no pair."""
    return True


def first_int_equals_answer(completion, answer) -> bool:
    """A verifier for the toy arithmetic task: the first integer in the completion is the answer."""
    import re

    text = completion if isinstance(completion, str) else completion[-1]["content"]
    match = re.search(r"-?\d+", text)
    return match is not None and int(match.group()) == int(answer)
