"""pMF's perceptual terms with randomly initialised networks of the real architectures (no weights
can be downloaded here), weights loaded from files the tests write."""
import pytest
import torch
from safetensors.torch import save_file

from fastmf.objectives import Draws, objective_defaults, perceptual_term
from fastmf.perceptual import LPIPS, ConvNeXtV2, Perceptual, crop_boxes, paired_crop
from fastmf.weights import load_weights


def convnext_param_count(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
    """ConvNeXt-V2 without its classifier, counted by hand from timm's definition."""
    n = 3 * dims[0] * 16 + dims[0] + 2 * dims[0]                             # stem conv + LayerNorm
    for i, (depth, d) in enumerate(zip(depths, dims)):
        if i:
            n += 2 * dims[i - 1] + dims[i - 1] * d * 4 + d                   # downsample LN + 2x2 conv
        n += depth * (49 * d + d + 2 * d + 4 * d * d + 4 * d + 8 * d + 4 * d * d + d)   # dw, LN, fc1, GRN, fc2
    return n + 2 * dims[-1]                                                    # head LayerNorm


def test_architectures_have_the_reference_sizes():
    with torch.device("meta"):
        cnx, lp = ConvNeXtV2(), LPIPS()
    assert sum(p.numel() for p in cnx.parameters()) == convnext_param_count()  # 87.7M (timm: 88.7M with its head)
    vgg = sum(p.numel() for n, p in lp.named_parameters() if n.startswith("net."))
    assert vgg == 14_714_688  # torchvision's vgg16().features
    assert sum(p.numel() for n, p in lp.named_parameters() if n.startswith("lin")) == 64 + 128 + 256 + 512 + 512
    names = set(cnx.state_dict())
    assert {"stem.0.weight", "stages.2.blocks.26.mlp.grn.weight", "stages.3.downsample.1.weight", "head.norm.bias"} <= names
    assert {"net.slice1.0.weight", "net.slice5.28.bias", "lin4.model.1.weight"} <= set(lp.state_dict())


def random_weights(tmp_path):
    torch.manual_seed(0)
    lp, cnx = LPIPS(), ConvNeXtV2()
    for p in lp.parameters():  # lpips' heads are non-negative
        p.data.uniform_(0, 0.1) if p.dim() == 4 and p.shape[0] == 1 else None
    save_file(dict(lp.state_dict()), str(tmp_path / "lpips.safetensors"))
    torch.save(dict(cnx.state_dict()) | {"head.fc.weight": torch.zeros(3, 1024)}, str(tmp_path / "cnx.pth"))
    return tmp_path / "lpips.safetensors", tmp_path / "cnx.pth"


def test_weights_load_from_files_and_bad_files_are_one_line(tmp_path):
    lpips_file, cnx_file = random_weights(tmp_path)
    p = Perceptual(lpips_file, cnx_file, size=32)
    assert not p.training and all(not q.requires_grad for q in p.parameters())
    with pytest.raises(ValueError, match="--lpips-weights .*none.pth: no such file"):
        load_weights(LPIPS(), tmp_path / "none.pth", "--lpips-weights")
    with pytest.raises(ValueError, match="--convnext-weights .*lpips.safetensors does not fit ConvNeXtV2"):
        load_weights(ConvNeXtV2(), lpips_file, "--convnext-weights")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--lpips-weights .*bad.pth: unreadable"):
        load_weights(LPIPS(), tmp_path / "bad.pth", "--lpips-weights")


def test_the_crop_is_the_same_for_the_pair_and_in_range():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(64, 4, generator=g)
    for top, left, h, w in crop_boxes(u, 24, 40):
        assert 0 <= top <= 24 - h and 0 <= left <= 40 - w and 0.08 * 960 * 0.6 <= h * w <= 960
    a = torch.randn(4, 3, 24, 40, generator=g)
    ca, cb = paired_crop(a, a + 1.0, u[:4], 16)  # resizing is linear with weights summing to 1
    assert ca.shape == (4, 3, 16, 16)
    torch.testing.assert_close(cb, ca + 1.0, atol=1e-5, rtol=0)


def test_gradients_reach_the_generator_never_the_networks_and_the_time_gate(tmp_path):
    lpips_file, cnx_file = random_weights(tmp_path)
    p = Perceptual(lpips_file, cnx_file, size=32)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    pred = (x + 0.3 * torch.randn(x.shape, generator=g)).requires_grad_()
    t = torch.tensor([0.1, 0.5, 0.9, 0.95])
    d = Draws(t, t, t > 0, x, t, t, t, t < 0, 0, torch.rand(4, 4, generator=g))
    cfg = objective_defaults("pmf", lpips_lambda=0.4, convnext_lambda=0.1, perceptual_max_t=0.8)
    term, metrics = perceptual_term(p, pred, x, d, cfg)
    assert term.shape == (4,) and (term[:2] > 0).all() and (term[2:] == 0).all()  # gated off where t >= 0.8
    assert set(metrics) == {"loss_lpips", "loss_convnext"}
    term.sum().backward()
    assert pred.grad.abs().sum() > 0 and all(q.grad is None for q in p.parameters())
    # pMF H's ConvNeXt-only gate: LPIPS everywhere, ConvNeXt only where t < 0.6
    split = objective_defaults("pmf", lpips_lambda=0.4, convnext_lambda=0.1, convnext_max_t=0.6)
    only_lpips = objective_defaults("pmf", lpips_lambda=0.4, convnext_lambda=0.0)
    only_cnx = objective_defaults("pmf", lpips_lambda=0.0, convnext_lambda=0.1, convnext_max_t=0.6)
    with torch.no_grad():
        both, _ = perceptual_term(p, pred, x, d, split)
        a, _ = perceptual_term(p, pred, x, d, only_lpips)
        b, _ = perceptual_term(p, pred, x, d, only_cnx)
    assert (a > 0).all() and (b[:2] > 0).all() and (b[2:] == 0).all()
    torch.testing.assert_close(both, a + b)


def hf_name(k: str) -> str:
    """timm's ConvNeXt-V2 name -> Hugging Face's ConvNextV2ForImageClassification name, written out
    from transformers' module layout (embeddings, encoder.stages.i.layers.j, layernorm, classifier)."""
    parts = k.split(".")
    if parts[0] == "stem":
        return f"convnextv2.embeddings.{'patch_embeddings' if parts[1] == '0' else 'layernorm'}.{parts[2]}"
    if parts[0] == "head":
        return f"convnextv2.layernorm.{parts[2]}" if parts[1] == "norm" else f"classifier.{parts[2]}"
    stage = f"convnextv2.encoder.stages.{parts[1]}"
    if parts[2] == "downsample":
        return f"{stage}.downsampling_layer.{parts[3]}.{parts[4]}"
    block = f"{stage}.layers.{parts[3]}"
    sub = {"conv_dw": "dwconv", "norm": "layernorm", "fc1": "pwconv1", "grn": "grn", "fc2": "pwconv2"}
    leaf = parts[5] if parts[4] == "mlp" else parts[4]
    return f"{block}.{sub[leaf]}.{parts[-1]}"


def test_hugging_face_convnext_names_load(tmp_path):
    torch.manual_seed(3)
    net = ConvNeXtV2()
    for q in net.parameters():
        q.data.normal_()
    hf = {hf_name(k): (v.reshape(1, 1, 1, -1) if ".grn." in k else v).clone() for k, v in net.state_dict().items()}
    hf["classifier.weight"], hf["classifier.bias"] = torch.zeros(21841, 1024), torch.zeros(21841)
    save_file(hf, str(tmp_path / "model.safetensors"))
    p = Perceptual(None, tmp_path / "model.safetensors", size=32)
    loaded = p.nets["convnext"].state_dict()
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
