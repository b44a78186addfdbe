"""The one definition of how an image becomes model input, shared by training, evaluation and serving:
`to_uint8_tensor` (decode-side: colour mode and resize, as the shards are read) and `prepare_batch`
(device-side: normalise, and augment training batches).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image as uint8 [channels, image_size, image_size]: converted to L or RGB, resized bilinearly."""
    image = image.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def prepare_batch(images: torch.Tensor, *, augment: bool) -> torch.Tensor:
    """uint8 [B,C,H,W] (on the training device) -> normalised float, with a random affine per image
    (rotation +-10 deg, shift +-8%, scale 0.9-1.1) when `augment`. Done per batch on the device:
    cheaper than per-sample PIL transforms on CPU and free on a GPU."""
    x = images.float().div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1]
    if not augment:
        return x
    b = x.shape[0]
    angle = (torch.rand(b, device=x.device) * 2 - 1) * (10 * math.pi / 180)
    scale = 0.9 + torch.rand(b, device=x.device) * 0.2
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * 0.16  # grid units: 2 = full width
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


