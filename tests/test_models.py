"""Model registry: every architecture trains, names are checked, the runtime (smp 0.2.1) table is right."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from cloudseg import runtime_compat as rc
from cloudseg.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from cloudseg.models import (
    ARCHITECTURES,
    build_model,
    canonical_arch,
    check_encoder,
    count_parameters,
    model_args,
    runtime_support,
)
from tests.needs import runtime_python

ROOT = Path(__file__).resolve().parents[1]

# Light settings per architecture so the whole parametrised test stays within seconds on 2 cores.
_FORWARD_CASES = {
    # PAN's feature pyramid attention pools 3 times below stride 16: it needs >= 128 px.
    "PAN": ("resnet18", 128, {}),
    # DPT takes only tu- encoders; small decoder widths keep it fast.
    "DPT": ("tu-resnet18", 64, {"decoder_intermediate_channels": (16, 32, 64, 64),
                                "decoder_fusion_channels": 16, "decoder_readout": "ignore"}),
}


@pytest.fixture(autouse=True)
def _offline_seeded_one_thread(monkeypatch):
    # One intra-op thread: on a shared 2-core machine, more threads make tiny convolutions ~10x slower.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_registry_holds_the_smp_architectures():
    expected = {"Unet", "UnetPlusPlus", "FPN", "DeepLabV3", "DeepLabV3Plus", "MAnet", "Linknet", "PSPNet",
                "PAN"}
    assert expected <= set(ARCHITECTURES)
    assert canonical_arch("unetplusplus") == "UnetPlusPlus"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_runs_forward_and_backward(arch):
    encoder, size, kwargs = _FORWARD_CASES.get(arch, ("resnet18", 64, {}))
    model = build_model(arch, encoder, **kwargs)
    x = torch.rand(2, 4, size, size)
    y = model(x)
    assert y.shape == (2, 1, size, size)
    assert torch.isfinite(y).all()
    y.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5]), "the encoder's first parameters got no gradient"
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 4


def test_wrong_architecture_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("Unett", "resnet18")
    msg = str(err.value)
    assert "'Unett'" in msg and "Unet" in msg and "DeepLabV3Plus" in msg and "Did you mean Unet" in msg


def test_wrong_encoder_lists_valid_names_and_the_tu_rule():
    with pytest.raises(ValueError) as err:
        build_model("Unet", "resnet19")
    msg = str(err.value)
    assert "'resnet19'" in msg and "resnet18" in msg and "mobilenet_v2" in msg
    assert "tu-<timm model name>" in msg
    with pytest.raises(ValueError, match="unknown timm model 'resnet19'"):
        check_encoder("tu-resnet19")
    assert check_encoder("tu-resnet18") == "tu-resnet18"
    assert check_encoder("timm-regnetx_002") == "timm-regnetx_002"  # legacy name smp maps to tu-regnetx_002


def test_pair_smp_refuses_is_a_value_error_naming_the_pair():
    with pytest.raises(ValueError, match="cannot build DPT with encoder 'resnet18'"):
        build_model("DPT", "resnet18")


def test_model_args_and_checkpoint_round_trip(tmp_path):
    args = model_args("unet", "resnet18", decoder_attention_type="scse")
    assert args == {"arch": "Unet", "encoder_name": "resnet18", "in_channels": 4, "classes": 1,
                    "kwargs": {"decoder_attention_type": "scse"}}
    model = build_model(args["arch"], args["encoder_name"], **args["kwargs"]).eval()
    ckpt = make_checkpoint(model, args, normalization={"kind": "none"}, threshold=0.5, config={}, epoch=0)
    rebuilt = model_from_checkpoint(load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt")))
    x = torch.rand(1, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_count_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))  # (3*2 + 2) + (2*1 + 1) = 11
    assert count_parameters(net) == 11
    net[0].requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 3
    assert count_parameters(build_model("Unet", "resnet18")) > 14_000_000  # resnet18 alone has 11.2 M


# -------------------------------------------------------------------------------- competition runtime table
def test_runtime_table_is_consistent_and_parses_as_python39():
    path = Path(rc.__file__)
    assert path.stat().st_size < 60_000
    ast.parse(path.read_text(), feature_version=(3, 9))
    assert rc.RUNTIME_SMP_VERSION == "0.2.1" and rc.RUNTIME_TIMM_VERSION == "0.4.12"
    assert rc.RUNTIME_ARCHS == {"Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3",
                                "DeepLabV3Plus", "PAN"}
    assert len(rc.RUNTIME_ENCODERS) == 113
    assert {"resnet34", "efficientnet-b0", "mobilenet_v2"} <= rc.RUNTIME_ENCODERS
    assert rc.RUNTIME_ENCODERS <= set(rc.RUNTIME_LAYOUTS)
    assert all(len(v) == len(rc.RUNTIME_ARCH_ORDER) for v in rc.RUNTIME_LAYOUTS.values())
    assert {"mobilenetv3_large_100", "efficientnet_b0", "resnet18"} <= rc.RUNTIME_TIMM_ENCODERS
    # ConvNeXt came to timm after 0.4.12.
    assert "convnext_tiny" not in rc.RUNTIME_TIMM_ENCODERS | rc.RUNTIME_TIMM_OTHER_MODELS


def test_layout_signature_ignores_order_and_pins_the_format():
    layout = [("b.weight", (2, 3)), ("a.bias", (4,))]
    # sha256 of the sorted "key:shape" lines, first 10 hex digits
    expected = hashlib.sha256(b"a.bias:4\nb.weight:2,3").hexdigest()[:10]
    assert rc.layout_signature(layout) == rc.layout_signature(layout[::-1]) == expected
    assert rc.state_dict_signature({"b.weight": torch.zeros(2, 3), "a.bias": torch.zeros(4)}) == expected


@pytest.mark.parametrize("arch,encoder", [
    ("Unet", "resnet18"), ("Unet", "resnet34"), ("Unet", "efficientnet-b0"), ("Unet", "timm-efficientnet-b0"),
    ("Unet", "mobilenet_v2"), ("Unet", "tu-mobilenetv3_large_100"), ("FPN", "resnet34"),
    ("UnetPlusPlus", "resnet18"), ("DeepLabV3Plus", "resnet18"),
])
def test_runtime_support_accepts_pairs_with_identical_layouts(arch, encoder):
    ok, reason = runtime_support(arch, encoder)
    assert ok, reason
    assert "same state_dict keys and shapes" in reason


@pytest.mark.parametrize("arch,encoder,fragment", [
    ("Segformer", "resnet18", "Segformer does not exist in smp 0.2.1"),
    ("UPerNet", "resnet34", "UPerNet does not exist in smp 0.2.1"),
    ("Unet", "mit_b0", "encoder 'mit_b0' does not exist in smp 0.2.1"),
    ("Unet", "tu-convnext_tiny", "timm 0.4.12 (the competition runtime) has no model 'convnext_tiny'"),
    ("Unet", "tu-vit_tiny_patch16_224", "cannot use it as an encoder"),
    ("Unet", "tu-resnet18.a1_in1k", "use 'tu-resnet18'"),
    ("PAN", "vgg16", "cannot dilate this encoder"),
    # smp >= 0.3 renamed DeepLabV3's decoder modules, and maps timm-regnet* to tu- encoders (encoder.model.*)
    ("DeepLabV3", "resnet18", "state_dict layout differs"),
    ("Unet", "timm-regnetx_002", "state_dict layout differs"),
])
def test_runtime_support_refuses_with_a_reason(arch, encoder, fragment):
    ok, reason = runtime_support(arch, encoder)
    assert not ok
    assert fragment in reason


def test_runtime_support_checks_constructor_arguments():
    ok, reason = runtime_support("Unet", "resnet34", decoder_interpolation="bilinear")
    assert not ok and "has no argument(s) decoder_interpolation" in reason
    # An argument smp 0.2.1 has, but whose layout the table does not record: refused unless not strict.
    assert runtime_support("Unet", "resnet34", decoder_attention_type="scse")[0] is False
    ok, reason = runtime_support("Unet", "resnet34", strict=False, decoder_attention_type="scse")
    assert ok and "not recorded" in reason


def test_a_checkpoint_records_the_same_paddings_its_weights_were_trained_with(tmp_path, monkeypatch):
    from cloudseg import checkpoint

    args = model_args("Unet", "efficientnet-b4")
    model = build_model(args["arch"], args["encoder_name"]).eval()
    ckpt = make_checkpoint(model, args, {"kind": "none"}, 0.5, {}, epoch=0)
    assert ckpt["static_padding"]["encoder._blocks.6._depthwise_conv"] == [2, 2, 2, 2]
    assert "static_padding" not in make_checkpoint(build_model("Unet", "resnet18"), model_args("Unet", "resnet18"),
                                                   {"kind": "none"}, 0.5, {}, epoch=0)
    # a loader whose smp pads that convolution as smp 0.2.1 does gets the recorded padding back
    built = checkpoint.static_paddings
    real_build = build_model

    def build_as_smp_021(*a, **kw):
        m = real_build(*a, **kw)
        m.encoder._blocks[6]._depthwise_conv.static_padding = torch.nn.ZeroPad2d((1, 2, 1, 2))
        return m

    monkeypatch.setattr("cloudseg.models.build_model", build_as_smp_021)
    loaded = model_from_checkpoint(ckpt)
    assert built(loaded) == ckpt["static_padding"]
    x = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="'encoder.nope'"):
        checkpoint.apply_static_paddings(loaded, {"encoder.nope": [1, 1, 1, 1]})


# ------------------------------------------------------------------------- real load under smp 0.2.1
_LOAD_IN_RUNTIME = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch, segmentation_models_pytorch as smp
    sys.path.insert(0, sys.argv[3])
    import main  # the submission's loader, as it runs in the competition
    io = torch.load(sys.argv[2], map_location="cpu")
    members, _, _ = main.load_members({"models": [sys.argv[1]]}, torch.device("cpu"))
    with torch.no_grad():
        y = members[0].model(io["x"])
    print(json.dumps({"smp": smp.__version__, "max_abs_diff": (y - io["y"]).abs().max().item()}))
""")


@pytest.mark.runtime
@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet-b4"])
def test_checkpoint_trained_here_loads_and_predicts_the_same_in_smp_021(tmp_path, encoder):
    """efficientnet-b4: smp 0.2.1 computes one "same" padding differently; the checkpoint's record fixes it."""
    python = runtime_python()
    args = model_args("Unet", encoder)
    model = build_model(args["arch"], args["encoder_name"]).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval-mode arithmetic is really compared
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        y = model(x)
    ckpt = save_checkpoint(make_checkpoint(model, args, {"kind": "none"}, 0.5, {}, epoch=0),
                           tmp_path / "m.pt")
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    (tmp_path / "load.py").write_text(_LOAD_IN_RUNTIME)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([str(python), str(tmp_path / "load.py"), str(ckpt), str(tmp_path / "io.pt"),
                          str(ROOT / "cloudseg" / "submission")],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["smp"] == "0.2.1"
    assert result["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("encoder, head", [
    ("efficientnet-b1", ["encoder._conv_head.weight", "encoder._bn1.weight", "encoder._bn1.bias"]),
    ("efficientnet-b4", ["encoder._conv_head.weight", "encoder._bn1.weight", "encoder._bn1.bias"]),
    ("timm-efficientnet-b0", ["encoder.conv_head.weight", "encoder.bn2.weight", "encoder.bn2.bias"]),
    ("resnet18", []),
])
def test_parameters_the_forward_never_reaches_are_frozen_and_kept(encoder, head):
    """smp's EfficientNet encoders keep the ImageNet classifier's last conv and BatchNorm, which a segmentation
    forward never reaches: DDP fails on them unless they take no gradient. They stay in the state dict."""
    from cloudseg.models import freeze_unused

    torch.manual_seed(0)
    model = build_model("Unet", encoder)
    keys = list(model.state_dict())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert freeze_unused(model) == head
    assert model.training and list(model.state_dict()) == keys  # checkpoints keep their layout
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # the probe moved no statistic
    model(torch.randn(2, 4, 64, 64)).mean().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for n, p in model.named_parameters() if n in head)
