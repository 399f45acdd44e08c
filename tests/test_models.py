from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from adalog.errors import UnknownModelError, UnsupportedModelError, WeightsError
from adalog.models import create_model, load_weights, model_family, read_state_dict

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False).state_dict()


def test_safetensors_loads_strictly(tmp_path: Path, reference_state):
    path = tmp_path / "w.safetensors"
    save_file(reference_state, str(path))
    model = create_model(NAME, weights=path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    assert not model.training


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_torch_file_with_or_without_wrapper(tmp_path: Path, reference_state, wrapper):
    path = tmp_path / "w.pth"
    torch.save(reference_state if wrapper is None else {wrapper: reference_state}, path)
    model = create_model(NAME, weights=path)
    assert torch.equal(model.head.weight, reference_state["head.weight"])


def test_wrong_key_is_listed(tmp_path: Path, reference_state):
    state = dict(reference_state)
    state["blocks.0.attn.qkv.weight_renamed"] = state.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        create_model(NAME, weights=path)
    message = str(err.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in message
    assert "unexpected keys: blocks.0.attn.qkv.weight_renamed" in message


def test_mis_shaped_key_is_listed(reference_state):
    state = dict(reference_state)
    state["head.weight"] = torch.zeros(10, 192)
    model = timm.create_model(NAME, pretrained=False)
    with pytest.raises(WeightsError, match=r"mis-shaped keys: head.weight \(file \(10, 192\)"):
        load_weights(model, state)


def test_unreadable_and_missing_files(tmp_path: Path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="could not read"):
        read_state_dict(bad)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")


def test_unknown_model_suggests_names():
    with pytest.raises(UnknownModelError, match="vit_tiny_patch16_224"):
        create_model("vit_tiny_patch16_22", pretrained=False)


def test_hub_failure_says_pass_weights(monkeypatch):
    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="--weights"):
        create_model(NAME)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("vit_tiny_patch16_224", "vit"),
        ("deit_tiny_patch16_224", "deit"),
        ("deit_tiny_distilled_patch16_224", "deit"),
        ("swin_tiny_patch4_window7_224", "swin"),
    ],
)
def test_supported_families(name, family):
    assert model_family(timm.create_model(name, pretrained=False)) == family


def test_unsupported_family_names_supported_ones():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="vit, deit, swin"):
        model_family(model)


def test_unsupported_family_is_refused_before_download_or_loading(monkeypatch):
    """No hub download (that would fail offline with a WeightsError) and no weight file read."""
    import adalog.models.factory as factory
    import adalog.models.weights as weights

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for an unsupported model")

    monkeypatch.setattr(weights, "read_state_dict", no_loading)
    monkeypatch.setattr(factory.timm, "create_model", _meta_only(timm.create_model))
    with pytest.raises(UnsupportedModelError, match="'resnet18'"):
        factory.create_model("resnet18")
    with pytest.raises(UnsupportedModelError, match="'resnet18'"):
        factory.create_model("resnet18", weights="weights-never-read.safetensors")
    assert factory.check_family("vit_tiny_patch16_224", num_classes=10) == "vit"


def _meta_only(create):
    """timm.create_model that fails for a real (non-meta) build or a pretrained one."""

    def create_on_meta(name, pretrained=False, **kwargs):
        if pretrained or torch.empty(0).device.type != "meta":
            raise AssertionError(f"{name} built for real before its family was checked")
        return create(name, pretrained=False, **kwargs)

    return create_on_meta


def test_forward_hooks_see_every_batch_and_stop_forward_skips_the_rest():
    from adalog.models.hooks import StopForward, forward_batches, forward_hooks

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    seen: list[tuple[str, int]] = []

    def hook(name, module, inputs, output):
        seen.append((name, output.shape[0]))
        if name == "first":
            raise StopForward

    layers = {"first": model[0], "last": model[2]}
    with forward_hooks(layers, hook):
        forward_batches(model, torch.randn(5, 4), batch_size=2)
    assert seen == [("first", 2), ("first", 2), ("first", 1)]  # "last" never ran
    seen.clear()
    model(torch.randn(1, 4))  # the hooks are gone after the block
    assert seen == []
