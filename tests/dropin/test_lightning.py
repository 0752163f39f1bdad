"""Drop-in: a Lightning Trainer trains a fastres model and its checkpoint restores it exactly."""
import pytest
import torch

import fastres

L = pytest.importorskip("lightning")


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = fastres.resnet20(num_classes=4)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_lightning_trainer_fits_and_checkpoint_restores(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,)))
    model = Classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert int(model.net.bn1.num_batches_tracked) == 3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(str(path))
    restored = Classifier.load_from_checkpoint(str(path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[k], v, rtol=0, atol=0)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.net(x), model.net(x))
