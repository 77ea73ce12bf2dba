"""The in-process vLLM backend's chat template takes `chat_template_kwargs` as template variables only:
`apply_chat_template`'s own arguments are a ConfigError naming them (issue 15 review). The template is rendered
by the real SmolLM2 tokenizer; the vLLM engine is never started (rendering comes before it)."""

from __future__ import annotations

import inspect

import pytest

from ttscale.backends.vllm import RESERVED_CHAT_TEMPLATE_ARGS, VLLMBackend, check_chat_template_kwargs
from ttscale.errors import ConfigError

MSG = [{"role": "user", "content": "2 + 3?"}]
GREETING_TEMPLATE = "{{ greeting }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def backend(smollm2_dir) -> VLLMBackend:
    return VLLMBackend(smollm2_dir)


@pytest.mark.parametrize("key", sorted(RESERVED_CHAT_TEMPLATE_ARGS))
def test_every_reserved_argument_is_refused_by_name_before_the_template_runs(backend, key):
    with pytest.raises(ConfigError, match=f"may not set '{key}'"):
        backend.render_chat(MSG, chat_template_kwargs={"enable_thinking": True, key: "{{ 'pwned' }}"})
    with pytest.raises(ConfigError, match=f"'{key}'"):
        backend.prompt_ids(messages=MSG, chat_template_kwargs={key: False})


def test_all_reserved_keys_are_named_in_one_error():
    with pytest.raises(ConfigError, match="'chat_template', 'tokenize'"):
        check_chat_template_kwargs({"chat_template": "x", "enable_thinking": False, "tokenize": True})
    check_chat_template_kwargs({"enable_thinking": False})
    check_chat_template_kwargs(None)


def test_template_variables_reach_the_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok.chat_template = GREETING_TEMPLATE
    own = VLLMBackend(smollm2_dir)
    own._tokenizer = tok
    assert own.render_chat(MSG, chat_template_kwargs={"greeting": "hello"}) == "hello|2 + 3?"
    assert own.render_chat(MSG) == "|2 + 3?"


def test_the_reserved_names_cover_apply_chat_templates_arguments():
    """A transformers release that adds an argument to `apply_chat_template` (or binds a new name in the
    template) fails here until the name is reserved."""
    from transformers import PreTrainedTokenizerBase
    from transformers.utils.chat_template_utils import render_jinja_template

    named = {p.name for fn in (PreTrainedTokenizerBase.apply_chat_template, render_jinja_template)
             for p in inspect.signature(fn).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    assert named | {"messages"} <= RESERVED_CHAT_TEMPLATE_ARGS


async def test_generate_refuses_before_starting_vllm(smollm2_dir):
    from ttscale.types import GenerationRequest

    backend = VLLMBackend(smollm2_dir)
    request = GenerationRequest(request_id="r", messages=MSG, chat_template_kwargs={"chat_template": "{{ 1 }}"})
    with pytest.raises(ConfigError, match="'chat_template'"):
        async for _ in backend.generate(request):
            pass
    assert backend.num_unfinished_requests() == 0 and backend._engine is None, "vLLM was never started"
