"""HF <-> imitax conversion: transformers' logits, lossless round trips, clear errors.

Tiny random transformers models of every supported model_type, and of the
architecture options no family default exercises (linear RoPE scaling, LLaMA's
attention and MLP biases, Qwen2's per-layer sliding window), are saved as
safetensors (one sharded, one bfloat16, two with a locally trained tokenizer)
and taken through import, Orbax checkpoints, export and transformers' loader.
Every parameter is random (``hf_models.randomize``), biases and norms included:
transformers' initialization (biases 0, norm scales 1) would hide a bias joined
in the wrong order or a norm exported to the wrong tensor.
"""

import json
import os
import pathlib
import pickle
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers
from flax import nnx
from hf_models import randomize, randomize_imitax, tiny_hf_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imitax import convert, models, sharding
from imitax.convert import core
from imitax.convert.mappings import ALIASES

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 128
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 11))
TOL = 1e-4

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "llama": lambda: transformers.LlamaConfig(
        **_TINY,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "mistral": lambda: transformers.MistralConfig(**_TINY, num_key_value_heads=2, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**_TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_TINY, rotary_pct=0.5),
    # The options, as tests/hf_models.py defines them (Qwen2's window of 5 is shorter than TOKENS).
    "llama_linear": lambda: tiny_hf_config("llama_linear"),
    "llama_bias": lambda: tiny_hf_config("llama_bias"),
    "qwen2_sliding": lambda: tiny_hf_config("qwen2_sliding"),
}
SHARDED = "llama"  # saved (and exported) in several safetensors shards
BF16 = "qwen2"  # saved in bfloat16
WITH_TOKENIZER = ("gpt2", "llama")
SMALL_SHARDS = "20KB"


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def _logits(model, mesh=None) -> np.ndarray:
    if mesh is None:
        return np.asarray(model(jnp.asarray(TOKENS)))
    with jax.set_mesh(mesh):
        return np.asarray(model(jnp.asarray(TOKENS)))


def _params(model) -> dict:
    return core.flatten(jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict()))


def _tensors(hf_dir) -> dict[str, np.ndarray]:
    reader = convert.SafetensorsReader(hf_dir)
    return {name: reader.read(name) for name in reader.names}


def _tokenizer(directory: pathlib.Path) -> None:
    """Trains a tiny BPE tokenizer locally and saves it the way transformers does."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"])
    text = ["the student copies the teacher's style", "but not its capabilities", "imitation is cheap"] * 20
    tok.train_from_iterator(text, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """model_type -> (HF directory, transformers' float32 logits)."""
    out = {}
    for i, (name, make_config) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(i)
        model = randomize(transformers.AutoModelForCausalLM.from_config(make_config()).eval(), seed=i)
        directory = tmp_path_factory.mktemp(f"hf_{name}")
        if name == BF16:
            model.to(torch.bfloat16).save_pretrained(directory)
            # The reference is the float32 model holding the (exactly upcast) bfloat16 weights.
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        else:
            model.save_pretrained(directory, max_shard_size=SMALL_SHARDS if name == SHARDED else "5GB")
        if name in WITH_TOKENIZER:
            _tokenizer(directory)
        out[name] = directory, _torch_logits(model)
    assert (out[SHARDED][0] / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    """model_type -> imitax checkpoint converted in float32."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: convert.convert_hf_to_checkpoint(d, root / name, dtype="float32") for name, (d, _) in hf.items()}


# -- numerics ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_checkpoint_logits_match_transformers(hf, ckpt, name):
    model = convert.load_checkpoint(ckpt[name])
    assert model.cfg.model_type == HF_CONFIGS[name]().model_type
    np.testing.assert_allclose(_logits(model), hf[name][1], atol=TOL, rtol=0)
    has_tokenizer = (
        convert.tokenizer_dir(ckpt[name]) is not None
        and (convert.tokenizer_dir(ckpt[name]) / "tokenizer.json").is_file()
    )
    assert has_tokenizer == (name in WITH_TOKENIZER)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_loads_in_transformers(hf, ckpt, tmp_path, name):
    out = convert.export_hf(ckpt[name], tmp_path / "out", max_shard_size=SMALL_SHARDS if name == SHARDED else "5GB")
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(reference), hf[name][1], atol=TOL, rtol=0)
    if name in WITH_TOKENIZER:
        text = "the teacher's style is cheap"
        original = transformers.AutoTokenizer.from_pretrained(hf[name][0])
        assert transformers.AutoTokenizer.from_pretrained(out)(text) == original(text)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_imitax_model_exports_to_transformers(tmp_path, name):
    """A model made on the imitax side, every parameter random, -> transformers.

    The tests above export what was imported, so an export mapping that undid a
    matching import mistake would pass them; here nothing came from transformers.
    Norm scales and biases are random too: init_model's are 1 and 0, which any
    mapping exports correctly. (The abstract model is filled directly: init_model's
    jitted initializer took 6 s per config to compile, for values replaced anyway.)
    """
    cfg = models.config_from_hf(HF_CONFIGS[name]())
    model = randomize_imitax(models.abstract_model(cfg), seed=7)
    out = convert.export_hf(model, tmp_path / "out")
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(reference), _logits(model), atol=TOL, rtol=0)
    assert models.config_from_hf(reference.config) == cfg


def test_qwen2_sliding_layers_survive_readers_without_layer_types(ckpt, tmp_path):
    # Older readers derive the sliding layers from max_window_layers (slide iff i >= it).
    out = convert.export_hf(ckpt["qwen2_sliding"], tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    del config["layer_types"]
    assert transformers.Qwen2Config.from_dict(config).layer_types == ["full_attention", "sliding_attention"]


def test_v4_rope_scaling_spelling_reads_the_same(hf, tmp_path):
    """transformers 4's ``rope_theta`` + ``rope_scaling: {type: linear}`` (as hub config.json files have it)."""
    directory = _copy(hf, "llama_linear", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (directory / "config.json").write_text(json.dumps(config))
    model = convert.load_hf(directory)
    assert dict(model.cfg.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    np.testing.assert_allclose(_logits(model), hf["llama_linear"][1], atol=TOL, rtol=0)


def test_sharded_export_writes_an_index(ckpt, tmp_path):
    out = convert.export_hf(ckpt[SHARDED], tmp_path / "out", max_shard_size=SMALL_SHARDS)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    tensors = _tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    single = convert.export_hf(ckpt["gpt2"], tmp_path / "single")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_import_export_import_is_bitwise(hf, tmp_path, name):
    hf_dir = hf[name][0]
    model = convert.load_hf(hf_dir)  # the checkpoint's own dtype
    assert model.cfg.param_dtype == ("bfloat16" if name == BF16 else "float32")
    out = convert.export_hf(model, tmp_path / "out", tokenizer_dir=hf_dir)
    original, exported = _tensors(hf_dir), _tensors(out)
    for hf_name, array in exported.items():
        source = next(n for n in (hf_name, *ALIASES.get(hf_name, ())) if n in original)
        assert array.dtype == original[source].dtype and np.array_equal(array, original[source]), hf_name
    tied_head = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    renamed = {alias for n in exported for alias in ALIASES.get(n, ())}
    assert set(original) - set(exported) <= tied_head | renamed
    again, first = _params(convert.load_hf(out)), _params(model)
    assert again.keys() == first.keys()
    for path in first:
        assert again[path].dtype == first[path].dtype and np.array_equal(again[path], first[path]), path


def test_checkpoint_keeps_params_bitwise(hf, ckpt):
    direct, restored = _params(convert.load_hf(hf["llama"][0])), _params(convert.load_checkpoint(ckpt["llama"]))
    assert all(np.array_equal(direct[p], restored[p]) for p in direct)


def test_load_onto_a_mesh(hf, ckpt, tmp_path):
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    name = SHARDED
    for model in (convert.load_hf(hf[name][0], mesh=mesh), convert.load_checkpoint(ckpt[name], mesh=mesh)):
        np.testing.assert_allclose(_logits(model, mesh), hf[name][1], atol=TOL, rtol=0)
        assert model.layers.attn.q_proj.kernel[...].sharding == NamedSharding(mesh, P(None, "fsdp", "tensor", None))
        assert model.layers.mlp.down_proj.kernel[...].sharding == NamedSharding(mesh, P(None, "tensor", "fsdp"))
        assert model.embed[...].sharding == NamedSharding(mesh, P("tensor", "fsdp"))
        expected = sharding.state_shardings(nnx.state(models.abstract_model(model.cfg)), mesh).to_pure_dict()
        actual = jax.tree.map(lambda a: a.sharding, nnx.state(model).to_pure_dict())
        assert actual == expected
    # Saving and exporting gather the shards back: bitwise the original tensors.
    unsharded = convert.load_checkpoint(convert.save_checkpoint(tmp_path / "ckpt", model))
    assert all(np.array_equal(a, b) for a, b in zip(_params(unsharded).values(), _params(model).values(), strict=True))
    out = convert.export_hf(model, tmp_path / "out")
    original = _tensors(hf[name][0])
    assert all(np.array_equal(t, original[n]) for n, t in _tensors(out).items())


def test_dtype_casts(hf, ckpt, tmp_path):
    bf16 = convert.convert_hf_to_checkpoint(hf["llama"][0], tmp_path / "bf16", dtype="bfloat16")
    model = convert.load_checkpoint(bf16)
    assert model.cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    cast = convert.load_checkpoint(ckpt["llama"], dtype="bfloat16")
    assert all(np.array_equal(a, b) for a, b in zip(_params(cast).values(), _params(model).values(), strict=True))
    assert convert.load_hf(hf[BF16][0], dtype="float32").embed[...].dtype == jnp.float32


# -- bad input --------------------------------------------------------------------------------


def _copy(hf, name, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(hf[name][0], tmp_path / name))


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_unknown_model_type(hf, tmp_path):
    directory = _copy(hf, "gpt2", tmp_path)
    _edit_config(directory, model_type="bert")
    with pytest.raises(convert.ConversionError) as e:
        convert.load_hf(directory)
    assert "'bert'" in str(e.value) and "config.json" in str(e.value)
    assert all(t in str(e.value) for t in models.SUPPORTED_MODEL_TYPES)


# RoPE variants imitax does not implement, with the fields transformers' validation wants.
UNSUPPORTED_ROPE = {
    "yarn": dict(factor=4.0, original_max_position_embeddings=32),
    "dynamic": dict(factor=2.0),
    "longrope": dict(short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=32),
}


@pytest.mark.parametrize("rope_type", list(UNSUPPORTED_ROPE))
def test_unsupported_rope_types_are_refused(hf, tmp_path, rope_type):
    """Running such a model with plain RoPE would give wrong logits silently: it must be refused."""
    rope = dict(rope_type=rope_type, rope_theta=10000.0, **UNSUPPORTED_ROPE[rope_type])
    message = f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
    for name in ("llama", "qwen2", "gpt_neox"):
        config = HF_CONFIGS[name]().to_dict()
        v5 = {**config, "rope_parameters": rope}
        v4 = {k: v for k, v in config.items() if k != "rope_parameters"}
        v4.update(rope_theta=rope["rope_theta"], rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"})
        for spelling in (v5, v4):
            with pytest.raises(ValueError, match=re.escape(message)):
                models.config_from_hf(spelling)
    directory = _copy(hf, "llama", tmp_path)
    _edit_config(directory, rope_parameters=rope)
    with pytest.raises(convert.ConversionError) as e:
        convert.load_hf(directory)
    assert str(e.value) == f"{directory / 'config.json'}: {message}"


def test_per_layer_overrides_are_refused(hf, tmp_path):
    """transformers 5's ``per_layer_config`` (layers of different widths): a clear error, not a RuntimeError."""
    directory = _copy(hf, "llama", tmp_path)
    _edit_config(directory, per_layer_config={"1": {"intermediate_size": 96}})
    with pytest.raises(convert.ConversionError, match=r"config\.json: per-layer config overrides \(per_layer_config\)"):
        convert.load_hf(directory)


def test_missing_or_malformed_config(hf, tmp_path):
    directory = _copy(hf, "gpt2", tmp_path)
    (directory / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(convert.ConversionError, match=r"config\.json is not valid JSON"):
        convert.load_hf(directory)
    (directory / "config.json").unlink()
    with pytest.raises(convert.ConversionError, match=r"config\.json is missing"):
        convert.load_hf(directory)
    with pytest.raises(FileNotFoundError, match="no such"):
        convert.load_hf(tmp_path / "nowhere")


class _Tripwire:
    """Unpickling this creates the file ``path``: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_weights_are_refused_unopened(hf, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(hf["gpt2"][0] / "config.json", directory)
    tripwire = tmp_path / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    with pytest.raises(convert.ConversionError) as e:
        convert.load_hf(directory)
    message = str(e.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "save_pretrained" in message
    assert not tripwire.exists()


def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp.up_proj.weight"),
        (
            lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}),
            "unexpected tensors: model.layers.0.self_attn.extra.weight",
        ),
        (
            lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((64, 31), np.float32)}),
            "model.layers.1.mlp.up_proj.weight has shape (64, 31)",
        ),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_tensors_not_matching_the_config(hf, tmp_path, edit, named):
    directory = _copy(hf, "mistral", tmp_path)
    _rewrite_weights(directory, edit)
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_hf_to_checkpoint(directory, tmp_path / "out")
    assert named in str(e.value)
    assert list(tmp_path.iterdir()) == [directory]  # no partial output, staged or final


def test_truncated_safetensors(hf, tmp_path):
    directory = _copy(hf, "mistral", tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConversionError, match=r"model\.safetensors is not a readable safetensors file"):
        convert.load_hf(directory)


def test_existing_output_is_refused_unless_overwrite(hf, ckpt, tmp_path):
    for write in (
        lambda out, **kw: convert.convert_hf_to_checkpoint(hf["gpt2"][0], out, **kw),
        lambda out, **kw: convert.export_hf(ckpt["gpt2"], out, **kw),
    ):
        out = tmp_path / "out"
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        with pytest.raises(FileExistsError, match="already exists"):
            write(out)
        assert (out / "precious.txt").read_text() == "keep me"
        write(out, overwrite=True)
        assert not (out / "precious.txt").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        shutil.rmtree(out)


def test_missing_tokenizer_is_only_a_warning(hf, tmp_path, caplog):
    out = convert.convert_hf_to_checkpoint(hf["mistral"][0], tmp_path / "ckpt")
    assert convert.load_config(out).model_type == "mistral"
    model = convert.load_checkpoint(out)
    caplog.clear()
    convert.export_hf(model, tmp_path / "hf")  # a model, and no tokenizer_dir
    assert any("tokenizer" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert (tmp_path / "hf" / "config.json").is_file()


# -- several processes ------------------------------------------------------------------------------

_PROCESS = """
import sys
sys.modules["torch"] = None
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from imitax import convert, sharding
mesh = sharding.make_mesh("fsdp=4,tensor=2")  # 4 devices per process
model = convert.load_hf(sys.argv[3], mesh=mesh)
assert not model.layers.attn.q_proj.kernel[...].is_fully_addressable
convert.save_checkpoint(sys.argv[4] + "/ckpt", model, tokenizer_dir=sys.argv[3])
convert.export_hf(sys.argv[4] + "/ckpt", sys.argv[4] + "/hf", mesh=mesh)
"""


def test_two_processes_load_save_and_export(hf, tmp_path):
    """Multi-controller JAX on CPU: each process supplies its own shards; process 0 writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    hf_dir = hf[SHARDED][0]
    argv = [sys.executable, "-c", _PROCESS, address]
    procs = [
        subprocess.Popen(
            [*argv, str(k), str(hf_dir), str(tmp_path)],
            env=env,
            stdout=subprocess.DEVNULL,  # gloo's connection chatter
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    original = _tensors(hf_dir)
    exported = _tensors(tmp_path / "hf")
    assert exported.keys() == original.keys()
    assert all(np.array_equal(exported[n], original[n]) for n in original)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


# -- the script ----------------------------------------------------------------------------------


def _script(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_script_both_directions_and_an_error(hf, tmp_path):
    # The script makes torch unimportable, so these runs also prove conversion needs no torch.
    hf_dir, reference = hf["gpt2"]
    run = _script(f"--hf_dir={hf_dir}", f"--out={tmp_path / 'ckpt'}", "--dtype=float32")
    assert run.returncode == 0, run.stderr
    run = _script("--export", f"--ckpt={tmp_path / 'ckpt'}", f"--out={tmp_path / 'hf'}", "--max_shard_size=30KB")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(_torch_logits(exported), reference, atol=TOL, rtol=0)

    run = _script(f"--hf_dir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'bad'}")
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert f"error: {tmp_path / 'nowhere'}: no such Hugging Face model directory" in run.stderr
    assert not (tmp_path / "bad").exists()
