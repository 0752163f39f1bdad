"""Drop-in: torch.jit.script works on fastres and converted models as on torchvision's, alone or inside
a user's own module (a detection model, IntermediateLayerGetter). Where TorchScript compiles a fused
class's method it compiles the plain module-by-module code (fastres.nn.scripting_aware), so the scripted
module holds the model's own tensors, as a scripted torchvision model does, and the model is untouched."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torchvision
from workflow_helpers import batch, make, torchvision_net

import fastres


def _fused_classes(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("kind", ["fused", "converted"])
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_script_matches_scripted_torchvision_and_shares_the_tensors(arch, kind):
    model = make(arch, kind).eval()
    tv = torchvision_net(arch).eval()
    tv.load_state_dict(model.state_dict())
    classes = _fused_classes(model)
    scripted, tv_scripted = torch.jit.script(model), torch.jit.script(tv)
    assert _fused_classes(model) == classes   # the model itself is not unfused
    x = batch(3)
    with torch.no_grad():
        assert torch.equal(scripted(x), tv_scripted(x))
        assert torch.equal(model(x), tv(x))
    # the same tensors, as torchvision's scripted module holds its module's
    assert scripted.conv1.weight is model.conv1.weight and tv_scripted.conv1.weight is tv.conv1.weight
    assert scripted.layer1[0].bn1.running_var is model.layer1[0].bn1.running_var
    # training through the scripted module moves the model's own parameters and statistics
    opt = torch.optim.SGD(scripted.parameters(), lr=0.1)
    scripted.train()
    scripted(x).sum().backward()
    opt.step()
    before = copy.deepcopy(tv.state_dict())
    tv.load_state_dict(model.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(before.values(), tv.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(scripted.eval()(x), model.eval()(x))


@pytest.mark.parametrize("make_model", [fastres.resnet20, fastres.plain20, fastres.FusedResNet18],
                         ids=["resnet20", "plain20", "resnet18"])
def test_script_save_load_of_fastres_models_and_blocks(make_model):
    torch.manual_seed(5)
    model = make_model(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buf)
        buf.seek(0)
        torch.testing.assert_close(torch.jit.load(buf)(x), want, rtol=0, atol=0)
        block = model.layer1[0]
        h = torch.randn(2, block.conv1.in_channels, 8, 8)
        torch.testing.assert_close(torch.jit.script(block)(h), block(h), rtol=0, atol=0)
    assert type(model).__module__.startswith("fastres") and type(block).__name__ == "BasicBlock"


def test_script_of_fused_layers_and_sequentials():
    torch.manual_seed(6)
    layer = fastres.FusedConvBNReLU2d(3, 8, 3, padding=1).eval()
    seq = fastres.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(layer)(x), layer(x), rtol=0, atol=0)
        torch.testing.assert_close(torch.jit.script(seq)(x), seq(x), rtol=0, atol=0)
    assert type(layer) is fastres.FusedConvBNReLU2d


def test_converted_timm_model_scripts_after_unfuse():
    """timm's classes are scripted through fastres.unfuse (README): the converted ones fail at once."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    torch.manual_seed(7)
    ref = timm.create_model("resnet18", num_classes=10).eval()
    model = fastres.convert(copy.deepcopy(ref)).eval()
    with pytest.raises(Exception):
        torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(fastres.unfuse(model))(x), torch.jit.script(ref)(x))


def test_torchvision_scripts_the_same_way():
    """The reference behaviour the tests above hold fastres to (guards against a torchvision change)."""
    tv = torchvision.models.resnet18(num_classes=10)
    assert torch.jit.script(tv).fc.weight is tv.fc.weight


def test_script_inside_a_users_module_leaves_the_model_fused():
    """A converted backbone inside modules fastres does not own: scripting must neither rewire nor
    unfuse the user's model (each block's scripted code is its own: a user probe found ids reused)."""
    from torchvision.models._utils import IntermediateLayerGetter
    tv = torchvision_net("bottleneck").eval()
    model = make("bottleneck", "converted").eval()
    tv.load_state_dict(model.state_dict())
    want_body = IntermediateLayerGetter(tv, {"layer2": "a", "layer4": "b"})
    body = IntermediateLayerGetter(model, {"layer2": "a", "layer4": "b"})
    del model   # (only the getter holds the converted modules now)
    classes = _fused_classes(body)
    x = batch(4)
    with torch.no_grad():
        got, want = torch.jit.script(body)(x), torch.jit.script(want_body)(x)
        assert all(torch.equal(got[k], want[k]) for k in ("a", "b"))
        assert _fused_classes(body) == classes
        eager = body(x)
        assert all(torch.equal(eager[k], want[k]) for k in ("a", "b"))


def test_script_of_a_detection_model_with_a_converted_backbone():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(8)
    ref = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64,
                                  max_size=64, box_score_thresh=0.0).eval()
    det = copy.deepcopy(ref)
    fastres.convert(det.backbone.body)
    classes = _fused_classes(det)
    img = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(9))]
    with torch.no_grad():
        _, got = torch.jit.script(det)(img)
        _, want = torch.jit.script(ref)(img)
    assert _fused_classes(det) == classes
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(got[0][key], want[0][key]), key
