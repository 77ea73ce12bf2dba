"""Default prompts. Strategies take these as config defaults; every one can be overridden."""

MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_SYSTEM = (
    "Please reason step by step, and put the letter of the correct option within \\boxed{} "
    "(for example \\boxed{A})."
)
FREE_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def system_prompt_for(kind: str) -> str:
    """The default system prompt for a problem kind (math | choice | free)."""
    return {"math": MATH_SYSTEM, "choice": CHOICE_SYSTEM}.get(kind, FREE_SYSTEM)
