"""``ldm sample`` input handling that needs no trained run: the inpainting mask."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from PIL import Image

from ldm.tools.sample import read_mask


def _image(path, size):
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return str(path)


def _mask(path, size, box):
    """White (regenerate) inside ``box`` = (left, top, right, bottom) in the mask's pixels."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    mask.save(path)
    return str(path)


def _columns(mask: torch.Tensor) -> list[int]:
    """The masked columns of a (1, size, size) mask whose masked region spans whole columns."""
    cols = mask[0].bool().all(dim=0)
    assert torch.equal(mask[0].bool(), cols.expand_as(mask[0])), "the mask should span whole columns"
    return cols.nonzero().flatten().tolist()


def test_the_mask_of_a_wide_image_is_centre_cropped_like_the_image(tmp_path):
    """A 64x32 image becomes its centre 32x32 square (x 16..47): a mask over x 8..23 regenerates x 16..23 of the
    image, i.e. columns 0..7 of the square, never columns the user did not mask."""
    image = _image(tmp_path / "wide.png", (64, 32))
    same = _mask(tmp_path / "same.png", (64, 32), (8, 0, 24, 32))
    scaled = _mask(tmp_path / "scaled.png", (128, 64), (16, 0, 48, 64))  # the same mask drawn at twice the size
    for mask_file in (same, scaled):
        masks = read_mask(Namespace(mask=mask_file, mask_box=None), [image], 32)
        assert masks.shape == (1, 1, 32, 32)
        assert _columns(masks[0]) == list(range(8)), mask_file


def test_a_tall_image_and_one_mask_for_several_images(tmp_path):
    tall = _image(tmp_path / "tall.png", (30, 60))  # resized to 32x64, centre rows 16..47 kept
    tall2 = _image(tmp_path / "tall2.png", (60, 120))
    mask = Image.new("L", (30, 60), 0)
    mask.paste(255, (0, 0, 30, 15))  # the top quarter: rows 0..15 of 64 after resizing, all cropped away but 0
    mask.paste(255, (0, 45, 30, 60))  # the bottom quarter: rows 48..63, cropped away
    mask.paste(255, (0, 20, 30, 30))  # rows 21.3..32 of 64 -> rows 5..15 of the square
    mask.save(tmp_path / "m.png")
    masks = read_mask(Namespace(mask=str(tmp_path / "m.png"), mask_box=None), [tall, tall2], 32)
    assert masks.shape == (2, 1, 32, 32) and torch.equal(masks[0], masks[1])
    rows = masks[0, 0].bool().all(dim=1).nonzero().flatten().tolist()
    assert masks[0, 0].bool().any(dim=1).nonzero().flatten().tolist() == rows  # whole rows
    assert rows == list(range(5, 16)) or rows == list(range(6, 16)), rows  # nearest resampling: 21.3 -> 21 or 22


def test_a_mask_of_another_aspect_ratio_is_refused_naming_both_sizes(tmp_path):
    image = _image(tmp_path / "wide.png", (64, 32))
    square = _mask(tmp_path / "square.png", (32, 32), (0, 0, 16, 32))
    with pytest.raises(ValueError, match=r"--mask .*square.png is 32x32 but --image .*wide.png is 64x32"):
        read_mask(Namespace(mask=square, mask_box=None), [image], 32)


def test_a_mask_box_is_a_box_of_the_generated_square(tmp_path):
    image = _image(tmp_path / "wide.png", (64, 32))
    masks = read_mask(Namespace(mask=None, mask_box="0.5,0,1,1"), [image, image], 32)
    assert masks.shape == (2, 1, 32, 32) and _columns(masks[1]) == list(range(16, 32))
