"""Torch-free pre-processing (scr_export.hostproc) against transformers' own processors, per family: pixel values
on an image zoo (grey, RGBA, palette with transparency, 16-bit, 32-bit int and float, CMYK, EXIF-rotated, very wide,
very tall, tiny, large) to <= 1e-6, and token ids identical for the prompts `encode` builds."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_PRESETS, load, make_image
from scr_export.hostproc import HostTokenizer, process
from scr_export.processing import encode


def _zoo() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    base = make_image(200, 140, seed=1)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 130, 4), dtype=np.uint8), "RGBA")
    palette = base.convert("P")
    palette.info["transparency"] = 5
    exif = io.BytesIO()
    e = Image.Exif()
    e[0x0112] = 6  # rotated 90°: transformers ignores the tag for PIL inputs, and so must we
    make_image(160, 90, seed=2).save(exif, "JPEG", exif=e)
    exif.seek(0)
    return {
        "rgb": base, "grey": base.convert("L"), "grey+alpha": rgba.convert("LA"), "rgba": rgba, "palette": palette,
        "16-bit": Image.fromarray(rng.integers(0, 65535, (60, 70), dtype=np.uint16)),
        "int32": Image.fromarray(rng.integers(0, 1000, (60, 70), dtype=np.int32)),
        "float": Image.fromarray((rng.random((60, 70), dtype=np.float32) * 300)),
        "cmyk": make_image(150, 110, seed=3).convert("CMYK"), "exif-rotated": Image.open(exif),
        "very wide": make_image(1200, 30, seed=4), "very tall": make_image(30, 700, seed=5),
        "tiny": make_image(5, 4, seed=6), "large": make_image(1500, 1100, seed=8),
    }


ZOO = _zoo()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_pixels_equal_the_transformers_processor(family_name, name):
    fam = load(TINY_PRESETS[family_name])
    cfg = fam.image_processor.to_dict()
    image = ZOO[name]
    try:
        want = fam.image_processor(images=[image], return_tensors="np")
    except Exception as exc:  # transformers refuses it: so must we, with an InputError
        from scr_export.errors import InputError

        with pytest.raises(InputError):
            process([image], cfg)
        pytest.skip(f"transformers refuses {name} for {family_name} ({str(exc)[:60]}); ours refuses it too")
    got = process([image], cfg)
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= 1e-6
    for key in ("image_grid_thw", "num_patches"):
        if key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_a_batch_of_different_images_in_one_call(family_name):
    fam = load(TINY_PRESETS[family_name])
    images = [ZOO["rgb"], ZOO["very wide"], ZOO["rgba"]]
    want = fam.image_processor(images=images, return_tensors="np")
    got = process(images, fam.image_processor.to_dict())
    assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= 1e-6


def test_token_ids_equal_the_transformers_tokenizer(family_name, tmp_path):
    """The tokenizer files a converted directory holds (save_pretrained) give the same ids and the same left
    padding as the transformers tokenizer encode() uses, for one and several images and a padded batch."""
    fam = load(TINY_PRESETS[family_name])
    encode(fam, [[make_image()], [make_image()]], ["a", "a longer prompt"])  # transformers pads: a saved
    fam.tokenizer.save_pretrained(tmp_path)                                 # tokenizer.json then says so
    tok = HostTokenizer(tmp_path)
    inputs = encode(fam, [[make_image()], [make_image(seed=2), make_image(120, 200, seed=3)]],
                    ["Is there a red block in this picture?", "Compare."])
    got = tok(inputs.texts)
    np.testing.assert_array_equal(got["input_ids"], inputs.input_ids.numpy())
    np.testing.assert_array_equal(got["attention_mask"], inputs.attention_mask.numpy())
    ids = inputs.input_ids[0, -8:].tolist()
    assert tok.decode(ids) == fam.tokenizer.decode(ids)
    assert tok.eos_token_id == fam.tokenizer.eos_token_id


def test_unsupported_processors_are_refused_with_the_fix():
    from scr_export.errors import InputError

    with pytest.raises(InputError, match="no torch-free pre-processing") as exc:
        process([ZOO["rgb"]], {"image_processor_type": "SiglipImageProcessor"})
    assert "supported:" in exc.value.fix
    cfg = json.loads(json.dumps(load(TINY_PRESETS["llava"]).image_processor.to_dict()))
    cfg["do_pad"] = True
    with pytest.raises(InputError, match="do_pad"):
        process([ZOO["rgb"]], cfg)


def test_image_token_expansion_equals_the_family_processors(family_name):
    from scr_export.hostproc.prompts import expand

    fam = load(TINY_PRESETS[family_name])
    images = [ZOO["rgb"], ZOO["very wide"], ZOO["large"]]
    image_inputs = process(images, fam.image_processor.to_dict())
    for n, first in ((1, 0), (2, 1)):
        text = fam.format_prompt("Describe the pictures.", n)
        want = fam.expand_placeholders(text, fam.process_images(images), first)
        got = expand(text, fam.placeholder, image_inputs, first, fam.name, **fam.host_expansion())
        assert got == want


def _host_settings(fam):
    """What the converter records in the manifest ("host")."""
    from scr_export.hostproc import HostSettings

    return HostSettings(**fam.host_settings())


@pytest.mark.parametrize("case", ["one image", "padded batch, several images", "placeholder in the prompt"])
def test_torch_free_encode_equals_encode(family_name, case, tmp_path):
    """The whole torch-free encode (images, prompt format, expansion, tokens, padding) against encode()."""
    from scr_export.hostproc import encode as host_encode

    fam = load(TINY_PRESETS[family_name])
    fam.tokenizer.save_pretrained(tmp_path)
    images, prompts = {
        "one image": ([[ZOO["rgb"]]], ["Describe."]),
        "padded batch, several images": ([[ZOO["large"], ZOO["rgba"]], [ZOO["very wide"]]],
                                         ["Compare the two pictures.", "Is there a red block?"]),
        "placeholder in the prompt": ([[ZOO["cmyk"]]], [f"What is {fam.placeholder} showing?"]),
    }[case]
    want = encode(fam, images, prompts)
    got = host_encode(images, prompts, _host_settings(fam), HostTokenizer(tmp_path))
    assert got["texts"] == want.texts
    np.testing.assert_array_equal(got["input_ids"], want.input_ids.numpy())
    np.testing.assert_array_equal(got["attention_mask"], want.attention_mask.numpy())
    assert np.abs(got["pixel_values"] - want.tensors["pixel_values"].numpy()).max() <= 1e-6
    for key in ("image_grid_thw", "num_patches"):
        if key in want.tensors:
            np.testing.assert_array_equal(got[key], np.asarray(want.tensors[key]))


def test_torch_free_encode_refuses_what_encode_refuses(tmp_path):
    from scr_export.errors import InputError
    from scr_export.hostproc import encode as host_encode

    fam = load(TINY_PRESETS["llava"])
    fam.tokenizer.save_pretrained(tmp_path)
    s, tok = _host_settings(fam), HostTokenizer(tmp_path)
    for images, prompts, message in (([[ZOO["rgb"]]], ["a", "b"], "2 prompts but 1 image lists"),
                                     ([[]], ["a"], "no image was given"),
                                     ([[ZOO["rgb"]]], [f"{fam.placeholder}{fam.placeholder}"], "2 <image> placeholders"),
                                     ([[make_image(1, 1)]], ["a"], "too small")):
        with pytest.raises(InputError, match=message):
            host_encode(images, prompts, s, tok)


def test_hostproc_runs_where_torch_and_transformers_cannot_be_imported(tmp_path):
    """The torch-free pre-processing in a process where importing torch or transformers raises: same ids."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fam = load(TINY_PRESETS["qwen2_vl"])
    fam.tokenizer.save_pretrained(tmp_path)
    ZOO["rgb"].save(tmp_path / "i.png")
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(_host_settings(fam))))
    want = encode(fam, [[ZOO["rgb"]]], ["Describe."]).input_ids.numpy().tolist()
    child = f"""
import sys, json, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"blocked {{name}}", name=name)
sys.meta_path.insert(0, Block())
from PIL import Image
from scr_export.hostproc import HostSettings, HostTokenizer, encode
d = {str(tmp_path)!r}
s = HostSettings(**json.load(open(d + "/settings.json")))
out = encode([[Image.open(d + "/i.png")]], ["Describe."], s, HostTokenizer(d))
print(json.dumps(out["input_ids"].tolist()))
"""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == want

