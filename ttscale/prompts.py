"""Default prompts, and how a strategy's `system_prompt` setting turns into the system message it sends.

A `system_prompt` setting is one of three things:

- `"default"` (`DEFAULT_SYSTEM_PROMPT`): the dataset's declared prompt when it has one, else the
  step-by-step `\\boxed{}` prompt of the problem's kind;
- `None`: no system prompt at all (what reasoning models such as DeepSeek-R1 are evaluated with);
- any other text: that text.
"""

from __future__ import annotations

from typing import Final

MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_SYSTEM = (
    "Please reason step by step, and put the letter of the correct option within \\boxed{} "
    "(for example \\boxed{A})."
)
FREE_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

DEFAULT_SYSTEM_PROMPT: Final = "default"

# Datasets that declare their own default system prompt (the prompt their reference evaluations use).
DATASET_SYSTEM_PROMPTS: dict[str, str | None] = {
    "aime24": MATH_SYSTEM,
    "aime25": MATH_SYSTEM,
    "math500": MATH_SYSTEM,
    "gsm8k": MATH_SYSTEM,
    "gpqa-diamond": CHOICE_SYSTEM,
}


def system_prompt_for(kind: str) -> str:
    """The default system prompt for a problem kind (math | choice | free)."""
    return {"math": MATH_SYSTEM, "choice": CHOICE_SYSTEM}.get(kind, FREE_SYSTEM)


def resolve_system_prompt(choice: str | None, kind: str) -> str | None:
    """The system message text a `system_prompt` setting stands for (None: send no system message)."""
    if choice == DEFAULT_SYSTEM_PROMPT:
        return system_prompt_for(kind)
    return choice or None


def explicit_system_prompt(choice: str | None) -> str | None:
    """The setting's text only when the user gave one: for prompts built by a paper's own template
    (Hogwild's collaboration prompt, ParaThinker's summary), where "default" adds nothing."""
    return None if choice == DEFAULT_SYSTEM_PROMPT else (choice or None)


def dataset_system_prompt(name: str, declared: str | None = DEFAULT_SYSTEM_PROMPT) -> str | None:
    """A dataset's default: what it declares itself, else the table above, else "default" (per kind)."""
    if declared != DEFAULT_SYSTEM_PROMPT:
        return declared
    return DATASET_SYSTEM_PROMPTS.get(name, DEFAULT_SYSTEM_PROMPT)


def system_prompt_choice(text: str | None, no_system_prompt: bool) -> str | None:
    """The setting from the CLI's `--system-prompt TEXT` / `--no-system-prompt` (neither: "default")."""
    if no_system_prompt and text is not None:
        from ttscale.errors import ConfigError

        raise ConfigError("give --system-prompt TEXT or --no-system-prompt, not both")
    if no_system_prompt:
        return None
    return DEFAULT_SYSTEM_PROMPT if text is None else text
