import os

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from hf_sparsemoe_vlm import SparseMoEVLMImageProcessor

from tiny_models import make_config


@pytest.fixture
def processor():
    return SparseMoEVLMImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.0] * 3, image_std=[1.0] * 3)


def pixels(processor, images):
    return processor(images, return_tensors="pt")["pixel_values"]


def solid(processor, rgb):
    """The pixel values of a solid image of colour `rgb` (0-255)."""
    return pixels(processor, PIL.Image.new("RGB", (8, 8), tuple(rgb)))[0]


def _palette_image(rgb):
    image = PIL.Image.new("P", (12, 9), 5)
    image.putpalette([0, 0, 0] * 5 + list(rgb) + [0, 0, 0] * 250)
    return image


@pytest.mark.parametrize("make_image,expected_rgb", [
    (lambda: PIL.Image.new("RGB", (12, 9), (255, 0, 10)), (255, 0, 10)),
    (lambda: PIL.Image.new("L", (12, 9), 128), (128, 128, 128)),
    (lambda: PIL.Image.new("LA", (12, 9), (0, 0)), (255, 255, 255)),  # fully transparent: white
    (lambda: PIL.Image.new("LA", (12, 9), (0, 255)), (0, 0, 0)),
    (lambda: PIL.Image.new("RGBA", (12, 9), (0, 0, 255, 0)), (255, 255, 255)),
    (lambda: PIL.Image.new("RGBA", (12, 9), (0, 0, 255, 255)), (0, 0, 255)),
    (lambda: PIL.Image.new("RGBA", (12, 9), (0, 0, 0, 128)), (127, 127, 127)),  # half transparent black on white
    (lambda: _palette_image((0, 200, 0)), (0, 200, 0)),
    (lambda: PIL.Image.new("CMYK", (12, 9), (0, 0, 0, 0)), (255, 255, 255)),
    (lambda: PIL.Image.new("CMYK", (12, 9), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: PIL.Image.fromarray(np.full((9, 12), 65535, dtype=np.uint16)), (255, 255, 255)),  # I;16
    (lambda: PIL.Image.fromarray(np.full((9, 12), 32896, dtype=np.uint16)), (128, 128, 128)),
])
def test_pil_modes_become_rgb_correctly(processor, make_image, expected_rgb):
    image = make_image()
    out = pixels(processor, image)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out[0], solid(processor, expected_rgb), rtol=0, atol=1.5 / 255)


def test_palette_image_with_transparency_is_composited_on_white(processor):
    image = PIL.Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = 0
    torch.testing.assert_close(pixels(processor, image)[0], solid(processor, (255, 255, 255)))


def test_arrays_and_tensors_in_every_layout_match_the_pil_image(processor):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    expected = pixels(processor, PIL.Image.fromarray(hwc))
    variants = [hwc, hwc.transpose(2, 0, 1).copy(), hwc.astype(np.float32) / 255.0,
                (hwc.astype(np.float64) / 255.0).transpose(2, 0, 1), torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
                torch.from_numpy(hwc.astype(np.float32) / 255.0)]
    for variant in variants:
        torch.testing.assert_close(pixels(processor, variant), expected, rtol=0, atol=0)
    gray = hwc[..., 0]
    torch.testing.assert_close(pixels(processor, gray), pixels(processor, PIL.Image.fromarray(gray)), rtol=0, atol=0)


def test_rgba_array_is_composited_like_pil(processor):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 2] = 255
    rgba[..., 3] = 0
    torch.testing.assert_close(pixels(processor, rgba)[0], solid(processor, (255, 255, 255)))


def test_paths_lists_and_nested_batches(processor, tmp_path):
    red, blue = PIL.Image.new("RGB", (8, 8), (255, 0, 0)), PIL.Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(tmp_path / "red.png")
    blue.save(tmp_path / "blue.jpg", quality=100)
    out = pixels(processor, [[str(tmp_path / "red.png"), tmp_path / "blue.jpg"], [red]])
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out[0], solid(processor, (255, 0, 0)))
    torch.testing.assert_close(out[2], solid(processor, (255, 0, 0)))
    torch.testing.assert_close(out[1], solid(processor, (0, 0, 255)), rtol=0, atol=3 / 255)


def test_resize_rescale_normalise_with_the_tower_statistics():
    config = make_config("clip")
    processor = SparseMoEVLMImageProcessor.from_model_config(config)
    assert processor.size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    out = pixels(processor, PIL.Image.new("RGB", (100, 60), (255, 255, 255)))
    assert out.shape == (1, 3, 32, 32)
    expected = (1.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    torch.testing.assert_close(out[0, :, 0, 0], expected.float())


def test_save_and_load_through_auto_image_processor(tmp_path):
    processor = SparseMoEVLMImageProcessor.from_model_config(make_config("dinov2"))
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SparseMoEVLMImageProcessor
    assert loaded.to_dict() == processor.to_dict()


def test_missing_file_is_named(processor, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pixels(processor, [PIL.Image.new("RGB", (8, 8)), str(missing)])


def test_truncated_or_unreadable_file_is_named_and_left_intact(processor, tmp_path):
    PIL.Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.png", "text.png"):
        before = (tmp_path / name).read_bytes()
        with pytest.raises(ValueError, match=f"Cannot read image file .*{name}"):
            pixels(processor, [str(tmp_path / "full.png"), str(tmp_path / name)])
        assert (tmp_path / name).read_bytes() == before


@pytest.mark.parametrize("bad,message", [
    (PIL.Image.new("RGB", (0, 5)), "zero size"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "zero size"),
    (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN"),
    (torch.full((3, 4, 4), float("inf")), "NaN or infinite"),
    (np.full((4, 4, 3), 2.5, dtype=np.float32), r"\[0, 1\]"),
    (np.zeros((5, 6, 7), dtype=np.uint8), "channel axis"),
])
def test_bad_image_in_a_batch_raises_naming_its_index(processor, bad, message):
    good = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=f"Image 1 .*{message}"):
        pixels(processor, [good, bad, good])


@pytest.mark.parametrize("bad", [42, {"image": 1}, b"bytes", None])
def test_wrong_type_raises_type_error(processor, bad):
    with pytest.raises(TypeError, match="must be PIL.Image.Image, numpy.ndarray, torch.Tensor or a path"):
        pixels(processor, [PIL.Image.new("RGB", (8, 8)), bad])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
