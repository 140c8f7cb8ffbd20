"""cudcn inside HF transformers' Deformable DETR: the documented one-line class
patch with cudcn.torch.hf_ms_deform_attn_forward.

A small DeformableDetrModel from a config (random weights, no download) runs
on the CPU with transformers' own pure-torch MSDA and then with cudcn's:
outputs and the gradients of every parameter must be equal to rounding.
Each test restores the class (monkeypatch), so no patch leaks.
"""

from __future__ import annotations

import inspect

import pytest

from msda_reference import transformers_detr

torch = pytest.importorskip("torch")
detr, why_not = transformers_detr()
if detr is None:
    pytest.skip(why_not, allow_module_level=True)
import transformers  # noqa: E402

import cudcn.torch as ct  # noqa: E402

pytestmark = pytest.mark.torch


def small_model(seed: int = 0) -> torch.nn.Module:
    """Deformable DETR with an HF ResNet backbone, d_model 64, one encoder and
    one decoder layer, 10 queries, 4 levels, no dropout (so that two runs
    are comparable); float64.

    Deformable DETR's initialisation puts the encoder's sampling points
    exactly on pixel centres plus whole pixels (integer pixel coordinates,
    where the location gradient is one-sided and the side grid_sample takes
    depends on the rounding of 2*x - 1), so the offset and attention layers
    are moved off that grid first: a trained model is off it anyway.
    """
    torch.manual_seed(seed)
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = transformers.DeformableDetrConfig(
        backbone_config=backbone, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        num_queries=10, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    model = transformers.DeformableDetrModel(config).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, detr.DeformableDetrMultiscaleDeformableAttention):
                module.sampling_offsets.weight.normal_(0, 0.05)
                module.sampling_offsets.bias.add_(torch.rand_like(module.sampling_offsets.bias) * 0.6 + 0.2)
                module.attention_weights.weight.normal_(0, 0.05)
    return model


def outputs_and_gradients(model, pixel_values):
    model.zero_grad()
    out = model(pixel_values=pixel_values)
    loss = out.last_hidden_state.square().sum() + 0.3 * out.encoder_last_hidden_state.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return (out.last_hidden_state.detach(), out.encoder_last_hidden_state.detach()), grads


def test_the_forward_has_transformers_signature():
    ours = inspect.signature(ct.hf_ms_deform_attn_forward)
    theirs = inspect.signature(detr.MultiScaleDeformableAttention.forward)
    assert list(ours.parameters) == list(theirs.parameters)


def test_deformable_detr_with_cudcn_equals_transformers(monkeypatch):
    model = small_model().train()
    pixel_values = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    expected, expected_grads = outputs_and_gradients(model, pixel_values)

    calls = []

    def counted(self, *args):
        calls.append(args[1].shape)
        return ct.hf_ms_deform_attn_forward(self, *args)

    monkeypatch.setattr(detr.MultiScaleDeformableAttention, "forward", counted)
    got, grads = outputs_and_gradients(model, pixel_values)
    assert len(calls) == 2  # the encoder's and the decoder's layer ran cudcn
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads.keys() == expected_grads.keys()
    for layer in ("encoder.layers.0.self_attn", "decoder.layers.0.encoder_attn"):
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            assert f"{layer}.{name}.weight" in grads
    scale = max(g.abs().max() for g in expected_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-11, atol=1e-13 * scale, msg=name)


def test_the_class_patch_survives_from_pretrained_and_train_eval(monkeypatch, tmp_path):
    """from_pretrained kernelizes (use_kernels), and train()/eval() kernelize
    again: on the CPU that restores the class's forward, which is cudcn's."""
    calls = []

    def counted(self, *args):
        calls.append(1)
        return ct.hf_ms_deform_attn_forward(self, *args)

    monkeypatch.setattr(detr.MultiScaleDeformableAttention, "forward", counted)
    small_model().float().save_pretrained(tmp_path)
    model = transformers.DeformableDetrModel.from_pretrained(tmp_path)
    model.train()
    model.eval()
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 64, 64))
    assert len(calls) == 2
