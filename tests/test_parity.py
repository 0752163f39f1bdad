"""Training parity (fastres/parity.py): fused model vs its plain-PyTorch twin, loss at every step, final
parameters and running statistics. CPU tests are short (no saturated check, see parity's docstring);
GPU tests train the sizes the project promises."""
import json
import os

import pytest
import torch

from fastres import backend, parity

CPU = dict(arch="resnet20", steps=6, batch_size=8, image_size=16, dtype="fp32", device="cpu", lr=0.05)


def _failed(result):
    return [c["name"] for c in result["checks"] if not c["ok"]]


def test_cifar_reference_is_the_same_network():
    """The twin has fastres' state_dict keys and computes the same function (eval and train mode)."""
    fused, ref = parity.build_pair("resnet20")
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert not any(isinstance(m, type(fused)) for m in ref.modules())
    x = torch.randn(4, 3, 16, 16)
    for mode in (False, True):
        fused.train(mode), ref.train(mode)
        with torch.no_grad(), backend.use_backend("torch"):
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_parity_torch_backend_cpu():
    result = parity.run(backend="torch", **CPU)
    assert result["passed"], parity.report(result)
    assert result["saturated"] == 0, parity.report(result)
    assert result["calls"].get("conv_bn_act/forward/torch", 0) == 6 * 19  # every conv-BN fused, every step
    assert len(result["losses"]["fused"]) == 6
    assert result["losses"]["fused"][0] != result["losses"]["fused"][-1]


@pytest.mark.parametrize("bug", ["gradient", "momentum"])
def test_parity_catches_a_planted_bug(bug):
    """A 1% error in one BN weight's gradient, or a BN momentum of 0.11 instead of 0.1, must fail."""
    def perturb(model):
        if bug == "gradient":
            model.layer2[0].bn1.weight.register_hook(lambda g: g * 1.01)
        else:
            model.layer2[0].bn1.momentum = 0.11

    result = parity.run(backend="torch", perturb=perturb, **{**CPU, "arch": "resnet8"})
    assert not result["passed"]
    failed = _failed(result)
    assert any(name.startswith("layer2.0.bn1.") for name in failed), failed


def test_parity_cli_writes_json(tmp_path):
    out = tmp_path / "parity.json"
    rc = parity.main(["--arch", "resnet8", "--steps", "2", "--batch-size", "4", "--image-size", "8",
                      "--backend", "torch", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["losses"]["fused"]) == 2 and data["environment"]["torch"] == torch.__version__


def test_parity_triton_interpreter():
    ok, why = backend.available("triton")
    if not ok:
        pytest.skip(f"triton backend not available: {why}")
    if not backend.interpreter_active():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    result = parity.run(arch="resnet8", steps=5, batch_size=4, image_size=8, dtype="fp32", backend="triton",
                        device="cpu", lr=0.05)
    assert result["passed"], parity.report(result)
    assert result["calls"].get("conv_bn_act/forward/triton", 0) > 0, result["calls"]


def _gpu_backends():
    return [b for b in ("triton", "cuda", "torch") if backend.available(b)[0]]


def _record(result):
    """scripts/gpu_check.sh sets FASTRES_PARITY_DIR: each GPU parity run is kept there as JSON."""
    folder = os.environ.get("FASTRES_PARITY_DIR")
    if folder:
        c = result["config"]
        name = f"parity-{c['arch']}-{c['dtype']}-{c['backend']}.json"
        with open(os.path.join(folder, name), "w") as f:
            json.dump(result, f, indent=1)
        print(parity.report(result))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", ["triton", "cuda", "torch"])
def test_parity_resnet50_gpu(name, dtype):
    if name not in _gpu_backends():
        pytest.skip(f"{name} backend not available: {backend.available(name)[1]}")
    result = parity.run(arch="resnet50", steps=50, batch_size=32, image_size=224, dtype=dtype, backend=name,
                        device="cuda", lr=0.02, num_classes=100)
    _record(result)
    assert result["passed"], parity.report(result)
    assert result["calls"].get(f"conv_bn_act/forward/{name}", 0) > 0, result["calls"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["triton", "cuda", "torch"])
def test_parity_resnet20_gpu(name):
    if name not in _gpu_backends():
        pytest.skip(f"{name} backend not available: {backend.available(name)[1]}")
    result = parity.run(arch="resnet20", steps=200, batch_size=128, image_size=32, dtype="fp32", backend=name,
                        device="cuda", lr=0.02)
    _record(result)
    assert result["passed"], parity.report(result)
    assert result["calls"].get(f"conv_bn_act/forward/{name}", 0) > 0, result["calls"]
