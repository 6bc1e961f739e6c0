"""NaN and inf never become black images (issue 18 item 2): float options are validated up front, and
non-finite samples are an error (non-zero exit, nothing written) that names the likely source."""

import math

import pytest
import torch

from calicache import sample
from calicache.cache.factors import Factors
from calicache.cli import main
from calicache.models.io import save_model
from calicache.sampling import NonFiniteSamplesError
from conftest import tiny_model


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), path)
    return path


def _sample(model_file, out, *extra) -> int:
    return main(["sample", "--model", str(model_file), "--num", "2", "--steps", "4", "--threads", "1",
                 "--out", str(out), *map(str, extra)])


@pytest.mark.parametrize("flag, value", [("--forecast-weight", "nan"), ("--cfg-scale", "inf"), ("--eta", "nan"),
                                         ("--goc-weight", "-inf")])
def test_non_finite_float_options_are_refused_up_front(model_file, tmp_path, capsys, flag, value):
    extra = {"--forecast-weight": ["--method", "forecast"], "--goc-weight": ["--method", "goc"]}.get(flag, [])
    assert _sample(model_file, tmp_path / "out", f"{flag}={value}", *extra) == 2
    err = capsys.readouterr().err
    assert flag in err and "finite" in err
    assert not (tmp_path / "out").exists()


def test_api_validates_cfg_scale_eta_and_classes():
    model = tiny_model()
    with pytest.raises(ValueError, match="cfg_scale must be >= 1 and finite"):
        sample(model, 2, 3, cfg_scale=math.nan)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample(model, 2, 3, eta=-1.0)
    with pytest.raises(ValueError, match="class labels must be integers"):
        sample(model, 1, 3, classes=[1.7])


def test_huge_noise_is_an_error_naming_the_noise():
    model = tiny_model()
    noise = torch.randn(2, 1, 8, 8) * 1e30
    with pytest.raises(NonFiniteSamplesError, match=r"noise reaches \|x\| = \d\.\d+e\+30; x_T should be"):
        sample(model, 2, 3, noise=noise)


def test_non_finite_weights_are_named(tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteSamplesError, match=r"model's weights contain NaN or inf \(blocks\.0\.mlp\.fc2"):
        sample(model, 2, 3)
    save_model(model, tmp_path / "broken.safetensors")
    assert _sample(tmp_path / "broken.safetensors", tmp_path / "out") == 2
    assert "weights contain NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_finite_factors_are_named_and_nothing_is_written(model_file, tmp_path, capsys):
    from calicache.adapters import get_adapter

    model = tiny_model()
    specs = [spec for branch in get_adapter(model).branches(model) for spec in branch.linears]
    tensors = {s.name: (torch.full((s.out_features, 2), math.nan), torch.zeros(2, s.in_features)) for s in specs}
    Factors(tensors, {"svd": "cd"}).save(tmp_path / "nan.safetensors")
    assert _sample(model_file, tmp_path / "out", "--method", "icc", "--svd", "cd", "--factors",
                   tmp_path / "nan.safetensors", "--period", "2") == 2
    err = capsys.readouterr().err
    assert "sampling produced NaN or infinite values" in err and "factors" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("part, source", [("transformer", r"model's weights contain NaN or inf \(proj_out_2\.weight"),
                                          ("vae", r"the pipeline's vae weights contain NaN or inf")])
def test_pipeline_samples_that_are_not_finite_exit_2_naming_the_source(tmp_path, capsys, part, source):
    """`sample --pipeline` as `sample`: non-finite samples are an error naming the likely source, nothing written."""
    import re

    pytest.importorskip("diffusers")
    from conftest import dit_pipe

    pipe = dit_pipe()
    weight = pipe.transformer.proj_out_2.weight if part == "transformer" else pipe.vae.decoder.conv_out.weight
    with torch.no_grad():
        weight[0] = math.nan
    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--classes", "1", "--num", "2", "--steps", "2",
                 "--method", "fora", "--threads", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sampling produced NaN or infinite values (batch starting at sample 0)" in err and re.search(source, err)
    assert not (tmp_path / "out").exists()
