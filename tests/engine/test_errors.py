"""Bad input gives clear errors naming the problem."""

import pytest

from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.loader import load_model, resolve_dtype, resolve_model_path
from ttscale.errors import ConfigError, ContextOverflow


def test_bad_paths_and_dtypes(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_model_path(tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", "cpu")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unsupported model type 'gpt2'"):
        load_model(tmp_path)


def test_bad_requests(tiny_llama):
    _, model = tiny_llama
    eng = Engine(model, num_blocks=32, block_size=4)
    with pytest.raises(ConfigError, match="out of the vocabulary"):
        eng.add_request("a", [1, 999], SamplingParams())
    with pytest.raises(ConfigError, match="at least one prompt token"):
        eng.add_request("b", [], SamplingParams())
    with pytest.raises(ContextOverflow, match="exceeds the model's context of 2048"):
        eng.add_request("c", [1] * 2000, SamplingParams(max_tokens=100))
    errors = []
    eng.fork("nobody", ["x"], [errors.append])
    eng.step()
    assert errors and errors[0].finish_reason == "error" and "cannot fork 'nobody'" in errors[0].error
    with pytest.raises(ConfigError, match="fork got 1 callbacks for 2 children"):
        eng.fork("nobody", ["y", "z"], [errors.append])
    with pytest.raises(ConfigError, match="generate got 1 sampling params for 2 prompts"):
        eng.generate([[1, 2], [3, 4]], [SamplingParams()])
    assert not eng.has_work()  # neither call queued anything
