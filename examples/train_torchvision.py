"""A plain torchvision training script - and the one line that puts it on fastres's fused layers.

    python examples/train_torchvision.py                      # torchvision's ResNet-50, as is
    python examples/train_torchvision.py --fastres convert    # the same model, fastres.convert(model)
    python examples/train_torchvision.py --fastres model      # fastres.FusedResNet50, the drop-in class

Everything else (data, optimizer, loop, checkpoints) stays as it was: fastres models have
torchvision's state_dict keys and its constructor arguments. Without --data-dir it trains on
torchvision's FakeData (random images), so it runs anywhere; with --data-dir it reads an ImageFolder
tree (DIR/<class>/<image>). It prints one line per step, "step N loss L", and with fastres how many
fused conv-BN calls ran. --dtype float64 runs the same steps in double precision (the oracle the
project's tests compare float32 runs against).

On a CPU the default (ResNet-50, 224 px, batch 32) is slow: about 10 s a step on a 2-core machine;
`--arch resnet18 --image-size 64` is about 25x fewer FLOPs per image (0.15 vs 4.1 GFLOPs). FakeData's labels are
random, so nothing is learnable and the loss stays near ln(num_classes) at best; the default learning
rate follows the linear scaling rule (0.1 per 256 images, He et al. / Goyal et al.), and a much larger
one makes the loss climb on such data at any model, fastres or not.
"""
import argparse
import time

import torch
import torch.nn as nn
import torchvision
from torchvision import datasets, transforms


def build_model(arch: str, num_classes: int, fastres_mode: str) -> nn.Module:
    if fastres_mode == "model":
        import fastres

        # torchvision.models.resnet50(...) -> fastres.FusedResNet50(...): same arguments, same weights.
        return getattr(fastres, "FusedResNet" + arch[len("resnet"):])(num_classes=num_classes)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if fastres_mode == "convert":
        import fastres

        model = fastres.convert(model)  # <- the one-line change: conv + BN (+ add) (+ ReLU) now run fused
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    p.add_argument("--fastres", default="off", choices=["off", "convert", "model"],
                   help="off: torchvision as is; convert: fastres.convert(model); model: fastres.FusedResNetXX")
    p.add_argument("--data-dir", default=None, help="an ImageFolder tree; default: FakeData")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10, help="classes of FakeData")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 * batch size / 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="parameters and images in this dtype (float64: a reference run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    lr = 0.1 * args.batch_size / 256 if args.lr is None else args.lr

    tf = transforms.Compose([transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    if args.data_dir:
        dataset = datasets.ImageFolder(args.data_dir, transform=tf)
        num_classes = len(dataset.classes)
    else:
        dataset = datasets.FakeData(size=args.steps * args.batch_size, image_size=(3, args.image_size, args.image_size),
                                    num_classes=args.num_classes, transform=tf)
        num_classes = args.num_classes
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))

    model = build_model(args.arch, num_classes, args.fastres).to(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()

    model.train()
    step, t0 = 0, time.time()
    while step < args.steps:
        for images, targets in loader:
            images, targets = images.to(device, dtype), targets.to(device)
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            print(f"step {step} loss {loss.item():.8f}", flush=True)
            if step == args.steps:
                break
    if args.fastres != "off":
        from fastres.backend import calls

        fused = sum(n for (op, phase, impl), n in calls.items() if phase == "forward" and impl != "unfused")
        print(f"fastres: {fused} fused conv-BN forward calls")
    print(f"{args.arch} (fastres: {args.fastres}): {step} steps, "
          f"{step * args.batch_size / (time.time() - t0):.1f} images/s")


if __name__ == "__main__":
    main()
