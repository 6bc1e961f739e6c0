"""Saving and safely loading DiT weights: calicache safetensors, original `.pt` files, bad files."""

import argparse
import os
import shlex

import pytest
import torch
from safetensors.torch import save_file

from calicache.models import io
from calicache.models.dit import DIT_MODELS, create_model
from calicache.models.io import infer_config, load_model, read_metadata, save_model, weight_hash
from conftest import tiny_model

# What the shapes of the tiny model cannot tell: its head count.
TINY_HEADS = {"num_heads": 2}


def _same_outputs(a, b) -> bool:
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        return torch.equal(a(x, t, y), b(x, t, y))


def test_safetensors_round_trip_keeps_config_weights_and_recommended_settings(tmp_path):
    model = tiny_model(num_classes=5, learn_sigma=False)
    path = tmp_path / "m.safetensors"
    save_model(model, path, recommended={"cfg_scale": 3.0, "steps": 12}, dataset="unit-test")
    meta = read_metadata(path)
    assert meta["format"] == "calicache-dit"
    assert meta["config"] == model.config.to_dict()
    assert meta["dataset"] == "unit-test"
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    assert loaded.calicache_defaults == {"cfg_scale": 3.0, "steps": 12}
    assert weight_hash(loaded) == weight_hash(model)
    assert _same_outputs(model, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_plain_state_dict_pt_infers_the_architecture_and_takes_heads_from_arch(tmp_path):
    model = tiny_model()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch=TINY_HEADS)
    assert loaded.config == model.config
    assert _same_outputs(model, loaded)
    # Without arch no registry architecture has this width and depth: the heads are not guessed.
    with pytest.raises(ValueError, match=r"plain\.pt: the attention head count cannot be read.*--arch"):
        load_model(path)


def _registry_tiny(seed: int = 0):
    from conftest import randomize

    torch.manual_seed(seed)
    return randomize(create_model("DiT-Tiny/2"), seed)


def test_original_train_py_checkpoint_takes_the_architecture_from_its_args(tmp_path):
    """facebookresearch/DiT's train.py saves {model, ema, opt, args}; args.model names the architecture
    (issue 18 item 1: the heads were guessed as 1 and the outputs silently differed)."""
    ema = _registry_tiny()
    ckpt = {"model": ema.state_dict(), "ema": ema.state_dict(), "opt": {},
            "args": argparse.Namespace(model="DiT-Tiny/2", image_size=224, num_classes=10, epochs=1400)}
    path = tmp_path / "0004353.pt"
    torch.save(ckpt, path)
    loaded = load_model(path)
    assert loaded.config == ema.config and loaded.config.num_heads == 3
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 700]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), ema(x, t, y))
    # Args naming an architecture the weights do not fit: an error naming both, not a guess.
    ckpt["args"] = argparse.Namespace(model="DiT-S/2", image_size=256, num_classes=10)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"do not match architecture DiT-S/2: hidden_size is 192"):
        load_model(path)
    ckpt["args"] = argparse.Namespace(model="MyDiT", image_size=256, num_classes=10)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"args name the model 'MyDiT'.*--arch"):
        load_model(path)


def test_plain_state_dict_of_a_registry_size_takes_the_registry_heads(tmp_path):
    model = _registry_tiny(seed=3)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert load_model(tmp_path / "plain.pt").config.num_heads == 3


@pytest.mark.parametrize("arch, message", [
    ({"bogus": 1}, r"--arch \(arch=\) has fields that are not DiT config fields \['bogus'\]"),
    ({"num_heads": 5}, r"num_heads|heads"),
])
def test_bad_arch_overrides_are_clear_errors(tmp_path, arch, message):
    torch.save(tiny_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "plain.pt", arch=arch)


@pytest.mark.parametrize("content", [os.urandom(2000), b"\x80\x04K\x01.", b"not a pickle at all"])
def test_files_that_are_not_checkpoints_get_no_unsafe_advice(tmp_path, content):
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"random\.pt: (not a|cannot read)") as e:
        load_model(path)
    assert "weights_only" not in str(e.value) and "pickled objects other than tensors" not in str(e.value)


@pytest.mark.parametrize("name", sorted(n for n in DIT_MODELS if not n.startswith("DiT-Tiny")))
def test_infer_config_recovers_every_registry_size_from_shapes(name):
    with torch.device("meta"):  # shapes only: no memory, no time
        state = create_model(name).state_dict()
    assert infer_config(state) == DIT_MODELS[name]
    assert infer_config(state, arch=name) == DIT_MODELS[name]


def test_training_checkpoint_loads_the_ema_weights(tmp_path):
    raw, ema = tiny_model(seed=1), tiny_model(seed=2)
    opt = torch.optim.AdamW(raw.parameters())
    raw(torch.randn(1, 1, 8, 8), torch.tensor([5]), torch.tensor([1])).sum().backward()
    opt.step()
    # The layout of the original train.py: model, ema, optimizer state and the argparse Namespace.
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": argparse.Namespace(model="DiT-Tiny/2", global_batch_size=256)}
    path = tmp_path / "0001000.pt"
    torch.save(ckpt, path)
    loaded = load_model(path, arch=TINY_HEADS)
    assert weight_hash(loaded) == weight_hash(ema) != weight_hash(raw)
    torch.save({"model": raw.state_dict(), "steps": 3}, tmp_path / "model_only.pt")
    assert weight_hash(load_model(tmp_path / "model_only.pt", arch=TINY_HEADS)) == weight_hash(raw)


def test_weight_hash_is_format_independent_and_sees_one_changed_weight(tmp_path):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    save_model(model, tmp_path / "w.safetensors")
    h_pt = weight_hash(load_model(tmp_path / "w.pt", arch=TINY_HEADS))
    h_st = weight_hash(load_model(tmp_path / "w.safetensors"))
    assert h_pt == h_st == weight_hash(model) == weight_hash(model.state_dict())
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] += 1e-3
    assert weight_hash(model) != h_pt


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("keep", [0.0, 0.003, 0.5, 0.99])
def test_truncated_files_are_clear_errors(tmp_path, suffix, keep):
    model = tiny_model()
    good = tmp_path / f"good{suffix}"
    save_model(model, good) if suffix == ".safetensors" else torch.save(model.state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"{bad.name}: .*(truncated|re-create|re-download)"):
        load_model(bad, arch=TINY_HEADS if suffix == ".pt" else None)


def test_weights_for_another_architecture_name_the_file_and_the_difference(tmp_path):
    model = tiny_model()
    pt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(ValueError, match=r"tiny\.pt: weights do not match architecture DiT-S/2: .*"
                                         r"hidden_size is 32 in the file but 384 in DiT-S/2"):
        load_model(pt, arch="DiT-S/2")
    st = tmp_path / "tiny.safetensors"
    save_model(model, st)
    with pytest.raises(ValueError, match=r"tiny\.safetensors: weights do not match architecture DiT-S/2: "
                                         r".*depth is 2 in the file but 12"):
        load_model(st, arch="DiT-S/2")
    # A config saved with the file that disagrees with its tensors is a shape mismatch, not a silent load.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cfg = dict(model.config.to_dict(), hidden_size=64)
    liar = tmp_path / "liar.safetensors"
    save_file(state, str(liar), metadata={"format": "calicache-dit", "config": io.json.dumps(cfg)})
    with pytest.raises(ValueError, match=r"liar\.safetensors: does not fit .*shape mismatch"):
        load_model(liar)


def test_missing_keys_name_the_file_and_the_keys(tmp_path):
    state = tiny_model().state_dict()
    del state["blocks.1.attn.proj.bias"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing\.pt: .*missing keys \['blocks\.1\.attn\.proj\.bias'\]"):
        load_model(path, arch=TINY_HEADS)
    del state["pos_embed"]  # a key the shape inference needs
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing\.pt: not a DiT state dict: missing \['pos_embed'\]"):
        load_model(path, arch=TINY_HEADS)
    torch.save({"x": torch.zeros(1), "note": "hi"}, path)
    with pytest.raises(ValueError, match=r"missing\.pt: not a state dict of tensors"):
        load_model(path)


class _Payload:
    """Unpickling this runs a shell command (here: harmlessly creating a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    state = dict(tiny_model().state_dict())
    state["blocks.0.attn.qkv.weight"] = _Payload(marker)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load: .*GLOBAL \w+\.system.*weights only"):
        load_model(path, arch=TINY_HEADS)
    assert not marker.exists()
    # The control: an unsafe load of the same file does run the payload, so the check above is real.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_registry_name_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match=r"DiT-S/2 has no published weights; use create_model\('DiT-S/2'\)"):
        load_model("DiT-S/2")
    with pytest.raises(FileNotFoundError, match=r"no-such\.pt: no such file.*published"):
        load_model("no-such.pt")


def test_published_name_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("CALICACHE_HOME", str(tmp_path / "home"))
    # A file:// address that does not exist fails at once, the same way an unreachable host does.
    monkeypatch.setattr(io, "PUBLISHED_URL", (tmp_path / "offline" / "{}").as_uri().replace("%7B%7D", "{}"))
    with pytest.raises(RuntimeError, match=r"cannot download DiT-XL/2 weights .*pass its path: "
                                           r"load_model\('path/DiT-XL-2-256x256\.pt'\)"):
        load_model("DiT-XL/2")
    cache = tmp_path / "home" / "models"
    assert not any(cache.iterdir())  # no partial download left behind
