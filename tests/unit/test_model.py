"""Building the tiny CLIP offline, and saving/loading our checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helip.trainer.tools.model import (
    ModelConfig,
    build_model,
    check_model,
    load_checkpoint,
    resolve_model,
    resolve_pretrained,
    save_checkpoint,
)

REPO_TINY = Path(__file__).resolve().parents[2] / "configs" / "models" / "helip-tiny.json"
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> ModelConfig:
    """The repo's tiny model config, or the same architecture written to a temporary file."""
    if REPO_TINY.is_file():
        return ModelConfig(name=str(REPO_TINY))
    path = tmp_path_factory.mktemp("models") / "helip-tiny.json"
    path.write_text(json.dumps(TINY))
    return ModelConfig(name=str(path))


def build_seeded(config: ModelConfig, seed: int):
    torch.manual_seed(seed)
    model, _, preprocess_val, tokenizer = build_model(config)
    return model.eval(), preprocess_val, tokenizer


@pytest.fixture(scope="module")
def batch(tiny_config):
    _, _, tokenizer = build_seeded(tiny_config, 0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = tokenizer(["a photo of a cat", "a dog", "two birds on a wire", "an empty street"])
    return images, texts


def encode(model, batch):
    with torch.no_grad():
        return model(*batch)


def test_tiny_model_encodes_a_batch_to_unit_vectors(tiny_config, batch):
    model, preprocess_val, tokenizer = build_seeded(tiny_config, 0)
    images, texts = batch
    assert texts.shape == (4, 32) and texts.dtype == torch.long  # the config's context_length, not CLIP's 77
    out = encode(model, batch)
    for name in ("image_features", "text_features"):
        assert out[name].shape == (4, 64)
        torch.testing.assert_close(out[name].norm(dim=1), torch.ones(4))
    assert out["logit_scale"].dim() == 0
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))  # open_clip's init, exponentiated


def test_resolve_model_registers_json_configs_and_accepts_open_clip_names(tiny_config):
    name, model_config = resolve_model(tiny_config)
    assert name == Path(tiny_config.name).stem
    assert model_config == json.loads(Path(tiny_config.name).read_text())
    assert resolve_model(ModelConfig(name="ViT-B-32")) == ("ViT-B-32", None)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (ModelConfig(name="no-such-model"), ValueError, "neither"),
        (ModelConfig(name="configs/models/absent.json"), FileNotFoundError, "absent.json"),
        (ModelConfig(name="ViT-B-32", pretrained="no_such_tag"), ValueError, "model.pretrained.*laion2b_s34b_b79k"),
        (ModelConfig(name="ViT-B-32", pretrained="weights/absent.pt"), FileNotFoundError, "model.pretrained"),
        (ModelConfig(name="ViT-B-32", pretrained="hf-hub:no-org"), ValueError, "hf-hub:org/name"),
    ],
)
def test_build_model_refuses_unknown_models_and_weights_before_any_download(config, error, message):
    with pytest.raises(error, match=message):
        build_model(config)


def test_json_that_is_not_a_model_config_is_refused(tmp_path):
    path = tmp_path / "not-a-model.json"
    path.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg"):
        resolve_model(ModelConfig(name=str(path)))


def test_save_load_round_trip_reproduces_outputs(tiny_config, batch, tmp_path):
    source, _, _ = build_seeded(tiny_config, 0)
    target, _, _ = build_seeded(tiny_config, 1)
    assert not torch.equal(encode(source, batch)["image_features"], encode(target, batch)["image_features"])

    path = tmp_path / "ckpt" / "step-10.pt"
    save_checkpoint(source, path, {"step": 10, "note": "test"}, config=tiny_config)
    meta = load_checkpoint(target, path)

    expected, actual = encode(source, batch), encode(target, batch)
    for name in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(actual[name], expected[name])
    assert meta == {
        "model_name": Path(tiny_config.name).stem,
        "model_config": json.loads(Path(tiny_config.name).read_text()),
        "step": 10,
        "note": "test",
    }
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"state_dict", "model_name", "model_config", "step", "note"}
    assert not any(name.startswith("module.") for name in saved["state_dict"])


class Wrapper(torch.nn.Module):
    """Stands for DDP / a DeepSpeed engine: the real model under `.module`, names prefixed "module."."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_plain_state_dict_with_module_prefix_loads(tiny_config, batch, tmp_path):
    source, _, _ = build_seeded(tiny_config, 0)
    target, _, _ = build_seeded(tiny_config, 1)
    prefixed = Wrapper(source).state_dict()
    assert all(name.startswith("module.") for name in prefixed)
    path = tmp_path / "open_clip.pt"
    torch.save(prefixed, path)

    assert load_checkpoint(Wrapper(target), path) == {}
    assert torch.equal(encode(target, batch)["text_features"], encode(source, batch)["text_features"])


def test_saving_a_wrapped_model_drops_the_prefix(tiny_config, tmp_path):
    model, _, _ = build_seeded(tiny_config, 0)
    path = tmp_path / "wrapped.pt"
    save_checkpoint(Wrapper(model), path, config=tiny_config)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == set(model.state_dict())


def test_checkpoint_of_another_architecture_is_refused_with_the_keys(tiny_config, tmp_path):
    model, _, _ = build_seeded(tiny_config, 0)
    state = model.state_dict()
    state["text_projection"] = torch.zeros(128, 32)  # another embed_dim
    del state["positional_embedding"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "other.pt"
    torch.save({"state_dict": state, "model_name": "other"}, path)
    with pytest.raises(ValueError) as raised:
        load_checkpoint(model, path)
    message = str(raised.value)
    assert "missing keys 1 ['positional_embedding']" in message
    assert "unexpected keys 1 ['visual.extra_head.weight']" in message
    assert "text_projection (128, 32) vs model (128, 64)" in message
    assert "other" in message


def test_checkpoint_that_is_not_a_state_dict_is_refused(tiny_config, tmp_path):
    model, _, _ = build_seeded(tiny_config, 0)
    path = tmp_path / "junk.pt"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match="neither a state dict"):
        load_checkpoint(model, path)


def test_extra_must_not_overwrite_checkpoint_keys(tiny_config, tmp_path):
    model, _, _ = build_seeded(tiny_config, 0)
    with pytest.raises(ValueError, match="state_dict"):
        save_checkpoint(model, tmp_path / "x.pt", {"state_dict": {}}, config=tiny_config)


def test_pretrained_names_a_file_a_tag_or_a_hub_repo_without_downloading(tiny_config, tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    assert resolve_pretrained(ModelConfig(pretrained=str(weights)), "helip-tiny") == ("file", str(weights))
    for tag in ("openai", "laion2b_s34b_b79k", "LAION2B-S34B-B79K"):  # open_clip normalises a tag's case and dashes
        assert resolve_pretrained(ModelConfig(name="ViT-B-32", pretrained=tag), "ViT-B-32") == ("tag", tag)
    hub = ModelConfig(name="ViT-B-32", pretrained="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert resolve_pretrained(hub, "ViT-B-32") == ("hf-hub", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert resolve_pretrained(ModelConfig(pretrained=None), "ViT-B-32") is None
    assert ModelConfig(pretrained="").pretrained is None  # an empty flag or YAML value means none
    # A JSON model config has no tags of open_clip's: the error says so instead of listing another model's.
    with pytest.raises(ValueError, match="model.pretrained: 'openai' .* helip-tiny \\(its tags: none"):
        check_model(dataclasses.replace(tiny_config, pretrained="openai"))


@pytest.mark.parametrize("weights_format", ["ours", "open_clip"])
def test_pretrained_local_file_gives_its_weights(tiny_config, batch, tmp_path, weights_format):
    source, _, _ = build_seeded(tiny_config, 0)
    path = tmp_path / "start.pt"
    if weights_format == "ours":
        save_checkpoint(source, path, config=tiny_config)
    else:
        torch.save(source.state_dict(), path)

    torch.manual_seed(1)  # a different random init, which the weights file must overwrite
    started, _, _, _ = build_model(dataclasses.replace(tiny_config, pretrained=str(path)))
    expected = source.state_dict()
    for name, tensor in started.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_siglip_model_has_open_clip_trains_logit_scale_and_bias(tiny_config, batch):
    model, _, _, _ = build_model(tiny_config, siglip=True)
    out = encode(model.eval(), batch)
    # open_clip_train --siglip: temperature 10 (exponentiated log 10) and a learned bias of -10
    torch.testing.assert_close(out["logit_scale"], torch.tensor(10.0))
    assert out["logit_bias"].item() == -10.0 and model.logit_bias.requires_grad
    assert "logit_bias" not in encode(build_seeded(tiny_config, 0)[0], batch)  # a CLIP model has none


@pytest.mark.parametrize("weights_format", ["ours", "open_clip"])
def test_a_siglip_checkpoint_rebuilds_its_logit_bias_without_being_told(tiny_config, tmp_path, weights_format):
    source, _, _, _ = build_model(tiny_config, siglip=True)
    with torch.no_grad():
        source.logit_bias.fill_(-3.5)  # as a run would have learned it
    path = tmp_path / "siglip.pt"
    if weights_format == "ours":
        save_checkpoint(source, path, config=tiny_config)
    else:
        torch.save(source.state_dict(), path)
    # helip-eval's path (a checkpoint), and a continuation's (model.pretrained), both without siglip=True
    from_checkpoint, _, _, _ = build_model(tiny_config, checkpoint=path)
    from_pretrained, _, _, _ = build_model(dataclasses.replace(tiny_config, pretrained=str(path)))
    for model in (from_checkpoint, from_pretrained):
        assert model.logit_bias.item() == -3.5
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, source.state_dict()[name]), name


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"precision": "amp"}, "model.precision"),
        ({"lock_image_unlocked_groups": -1}, "model.lock_image_unlocked_groups"),
        ({"lock_image_unlocked_groups": 1}, "model.lock_image_unlocked_groups is set but model.lock_image"),
        ({"lock_text_unlocked_layers": 2}, "model.lock_text_unlocked_layers is set but model.lock_text"),
    ],
)
def test_model_config_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**changes)


def trainable(model, prefix: str = "") -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters() if name.startswith(prefix)}


def test_lock_image_freezes_the_image_tower_only(tiny_config):
    torch.manual_seed(0)
    model, _, _, _ = build_model(dataclasses.replace(tiny_config, lock_image=True))
    assert not any(trainable(model, "visual.").values())
    others = {name: grad for name, grad in trainable(model).items() if not name.startswith("visual.")}
    assert others and all(others.values())  # the text tower and logit_scale still train


def test_lock_image_unlocked_groups_leave_the_last_groups_trainable(tiny_config):
    torch.manual_seed(0)
    model, _, _, _ = build_model(dataclasses.replace(tiny_config, lock_image=True, lock_image_unlocked_groups=1))
    visual = trainable(model, "visual.")
    assert visual["visual.proj"] and not visual["visual.conv1.weight"]  # the projection is the last group


def test_lock_text_freezes_the_text_tower_only(tiny_config):
    torch.manual_seed(0)
    model, _, _, _ = build_model(dataclasses.replace(tiny_config, lock_text=True))
    flags = trainable(model)
    text = {name: grad for name, grad in flags.items() if not name.startswith("visual.") and name != "logit_scale"}
    assert "text_projection" in text and "ln_final.weight" in text and not any(text.values())
    assert all(trainable(model, "visual.").values()) and flags["logit_scale"]


def test_unfrozen_layer_norms_need_a_hugging_face_text_tower(tiny_config):
    config = dataclasses.replace(tiny_config, lock_text=True, lock_text_freeze_layer_norm=False)
    with pytest.raises(ValueError, match="model.lock_text_freeze_layer_norm"):
        build_model(config)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_config, batch):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _, _, _ = build_model(dataclasses.replace(tiny_config, grad_checkpointing=checkpointing))
        assert model.transformer.grad_checkpointing is checkpointing
        out = model.train()(*batch)
        loss = (out["image_features"] @ out["text_features"].T * out["logit_scale"]).logsumexp(1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_cli_refuses_an_unknown_tag_with_exit_2_before_training(capsys):
    from helip.trainer.app import cli

    argv = ["--train-data", "absent.csv", "--model", "ViT-B-32", "--pretrained", "no_such_tag"]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "model.pretrained: 'no_such_tag'" in capsys.readouterr().err


def test_lock_and_checkpointing_flags_are_switches():
    from helip.trainer.app.cli import build_parser

    args = vars(build_parser().parse_args(["--lock-image", "--lock-text", "false", "--grad-checkpointing"]))
    assert args["model.lock_image"] == "true" and args["model.lock_text"] == "false"
    assert args["model.grad_checkpointing"] == "true" and args["model.lock_image_freeze_bn_stats"] is None


def test_hf_hub_weights_load_into_the_named_architecture_from_the_hub_cache(tiny_config, tmp_path, monkeypatch):
    """hf-hub:org/name through open_clip's own download, answered by a Hugging Face cache with the hub offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source, _, _ = build_seeded(tiny_config, 0)
    snapshot = tmp_path / "models--helip--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    torch.save(source.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    (tmp_path / "models--helip--tiny" / "refs").mkdir()
    (tmp_path / "models--helip--tiny" / "refs" / "main").write_text("0" * 40)

    config = dataclasses.replace(tiny_config, pretrained="hf-hub:helip/tiny", cache_dir=str(tmp_path))
    torch.manual_seed(1)
    started, _, _, _ = build_model(config)
    expected = source.state_dict()
    for name, tensor in started.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    with pytest.raises(FileNotFoundError, match="helip/absent"):
        build_model(dataclasses.replace(config, pretrained="hf-hub:helip/absent"))
