"""Model factories for the tests of `model.names: [package.module:function]` (tests/ is on sys.path: setup.cfg's
pythonpath; subprocesses get it on PYTHONPATH). `tiny` keeps the keyword arguments it was called with."""

from torch import nn

NOT_CALLABLE = 3


class Tiny(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, width: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def tiny(num_classes, in_chans, width=8, **kwargs):
    model = Tiny(num_classes, in_chans, width)
    model.called_with = {"num_classes": num_classes, "in_chans": in_chans, "width": width, **kwargs}
    return model


def not_a_module(num_classes, in_chans, **kwargs):
    return {"num_classes": num_classes}


def boom(num_classes, in_chans, **kwargs):
    raise RuntimeError("no such layer")


def pyramid(num_classes, in_chans, features_only=False, **kwargs):
    """Your own backbone for a dense task: with `features_only`, a module giving stride 4..32 feature maps and a
    timm-style `feature_info` (here timm's own extractor of `test_resnet`)."""
    import timm

    if not features_only:
        return tiny(num_classes, in_chans)
    return timm.create_model("test_resnet", features_only=True, in_chans=in_chans, **kwargs)
