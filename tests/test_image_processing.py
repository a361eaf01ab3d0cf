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


RGBA_MEAN, RGBA_STD = [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.2, 0.1]


def _rgba_image():
    rng = np.random.default_rng(1)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8), mode="RGBA")


def test_do_convert_rgb_false_keeps_rgba_channels_with_four_value_mean_and_std():
    image = _rgba_image()
    processor = SparseMoEVLMImageProcessor(size={"height": 8, "width": 8}, do_convert_rgb=False,
                                           image_mean=RGBA_MEAN, image_std=RGBA_STD)
    out = pixels(processor, image)
    assert out.shape == (1, 4, 8, 8)
    pixel = np.asarray(image)[2, 5]  # (R, G, B, A) at row 2, column 5
    expected = (torch.tensor(pixel / 255.0) - torch.tensor(RGBA_MEAN)) / torch.tensor(RGBA_STD)
    torch.testing.assert_close(out[0, :, 2, 5], expected.float(), rtol=0, atol=1e-6)
    # The same as a call-time option, for a numpy array, and after a save / load round trip.
    default = SparseMoEVLMImageProcessor(size={"height": 8, "width": 8})
    as_kwargs = default(np.asarray(image), do_convert_rgb=False, image_mean=RGBA_MEAN, image_std=RGBA_STD,
                        return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(as_kwargs, out, rtol=0, atol=0)


def test_do_convert_rgb_false_survives_save_and_load(tmp_path):
    processor = SparseMoEVLMImageProcessor(size={"height": 8, "width": 8}, do_convert_rgb=False,
                                           image_mean=RGBA_MEAN, image_std=RGBA_STD)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded.do_convert_rgb is False
    torch.testing.assert_close(pixels(loaded, _rgba_image()), pixels(processor, _rgba_image()), rtol=0, atol=0)


@pytest.mark.parametrize("make_image,channels", [
    (lambda: PIL.Image.new("L", (8, 8), 7), [7]),
    (lambda: PIL.Image.new("LA", (8, 8), (7, 9)), [7, 9]),
    (lambda: PIL.Image.new("RGB", (8, 8), (1, 2, 3)), [1, 2, 3]),
    (lambda: PIL.Image.new("CMYK", (8, 8), (1, 2, 3, 4)), [1, 2, 3, 4]),
    (lambda: PIL.Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), [255]),  # I;16, scaled to 8 bits
    (lambda: np.full((8, 8, 2), 9, dtype=np.uint8), [9, 9]),
    (lambda: torch.full((4, 8, 8), 1.0), [255, 255, 255, 255]),
])
def test_do_convert_rgb_false_keeps_the_image_channels(make_image, channels):
    processor = SparseMoEVLMImageProcessor(size={"height": 8, "width": 8}, do_convert_rgb=False, do_normalize=False)
    out = pixels(processor, make_image())
    assert out.shape == (1, len(channels), 8, 8)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(channels) / 255.0, rtol=0, atol=1e-6)


def test_default_converts_rgba_to_the_rgb_composite_on_white(processor):
    image = _rgba_image()
    white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = PIL.Image.alpha_composite(white, image).convert("RGB")
    out = pixels(processor, image)
    assert processor.do_convert_rgb is True and out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, pixels(processor, rgb), rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, np.asarray(image)), out, rtol=0, atol=0)


@pytest.mark.parametrize("do_convert_rgb,mean,std,message", [
    (False, [0.5] * 3, [0.5] * 3, r"`image_mean` has 3 values but image 1 has 4 channels: `do_convert_rgb=False` "
                                  r"keeps each image's own channels: give one value per channel, or set "
                                  r"`do_convert_rgb=True` to convert images to RGB \(3 channels\)\.$"),
    (False, [0.5] * 3, [0.5] * 2, r"`image_std` has 2 values but image 0 has 3 channels"),
    (True, RGBA_MEAN, RGBA_STD, r"`image_mean` has 4 values but image 0 has 3 channels: `do_convert_rgb=True` makes "
                                r"every image RGB: give 3 values, or set `do_convert_rgb=False` to keep each image's "
                                r"own channels\.$"),
])
def test_mean_std_not_matching_the_channels_raise_naming_the_fix(do_convert_rgb, mean, std, message):
    processor = SparseMoEVLMImageProcessor(size={"height": 8, "width": 8}, do_convert_rgb=do_convert_rgb,
                                           image_mean=mean, image_std=std)
    images = [_rgba_image().convert("RGB"), _rgba_image()]  # 3 then 4 channels unless converted to RGB
    with pytest.raises(ValueError, match=message):
        pixels(processor, images)
