"""Plain-PyTorch reference models with torchvision's exact parameter names and forward passes.

torchvision itself is a multi-GB install with CUDA; these modules reproduce
``torchvision.models.vgg16`` and ``torchvision.models.resnet18`` (state-dict keys, shapes and
forward) and the study's modifications, so the converter is tested against the real layout:

    vgg16.classifier = nn.Sequential(nn.Linear(25088, 110), nn.ReLU(), nn.Linear(110, n))
    resnet18.fc = nn.Sequential(nn.Linear(512, 110), nn.ReLU(), nn.Linear(110, n))
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16(nn.Module):
    """torchvision's VGG16 (no batch norm); ``classifier`` defaults to the ImageNet one."""

    def __init__(self, classifier: nn.Module | None = None):
        super().__init__()
        layers, channels = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = classifier or nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 1000))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet18; ``fc`` defaults to the ImageNet Linear(512, 1000)."""

    def __init__(self, fc: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride, downsample),
                                                     BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = fc or nn.Linear(512, 1000)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def study_head(in_features: int, num_outputs: int, units: int = 110) -> nn.Sequential:
    """The study's replacement head: Linear -> ReLU -> Linear (keys .0.* and .2.*)."""
    return nn.Sequential(nn.Linear(in_features, units), nn.ReLU(), nn.Linear(units, num_outputs))


def study_model(backbone: str, num_outputs: int, seed: int = 0) -> nn.Module:
    """The study's fine-tuned model with random weights and random BatchNorm statistics, in eval()."""
    torch.manual_seed(seed)
    if backbone == "vgg16":
        model = VGG16(classifier=study_head(512 * 7 * 7, num_outputs))
    else:
        model = ResNet18(fc=study_head(512, num_outputs))
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """torchvision-like init plus non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(123)
        elif isinstance(m, nn.Linear):
            bound = (6.0 / m.in_features) ** 0.5
            m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """The study's ToTensor + Normalize(ImageNet mean/std): uint8 NHWC -> float NCHW."""
    x = torch.from_numpy(np.asarray(pixels, np.float32) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def logits(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """The model's eval-mode output for raw uint8 NHWC images."""
    return model.eval()(normalise(pixels)).numpy()


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The state dict as contiguous NumPy arrays (what safetensors.numpy.save_file takes)."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in model.state_dict().items()}
