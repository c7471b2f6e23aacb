"""The shapes world (scr_export/toyworld.py) and the held-out POPE files built from it (examples/shapes-pope)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scr_export import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
POPE = ROOT / "examples" / "shapes-pope"


def test_same_seed_same_picture_other_seed_other_picture():
    a, sa = tw.make_scene(5, 96)
    b, sb = tw.make_scene(5, 96)
    c, _ = tw.make_scene(6, 96)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and sa == sb
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _inside(shape: str, box) -> tuple[int, int]:
    """A pixel every drawing of ``shape`` in ``box`` covers (a triangle's centroid, the others' centre)."""
    x0, y0, x1, y1 = box
    cx = (x0 + x1) // 2
    return (cx, y0 + 2 * (y1 - y0) // 3) if shape == "triangle" else (cx, (y0 + y1) // 2)


@pytest.mark.parametrize("seed", range(40))
def test_objects_are_drawn_where_the_scene_says_in_their_colour(seed):
    pic, scene = tw.make_scene(seed, 160)
    assert 1 <= len(scene.objects) <= 4 and len(set(scene.objects)) == len(scene.objects)
    boxes = scene.boxes
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)  # no overlap
    img = np.asarray(pic).astype(int)
    for (colour, shape), box in zip(scene.objects, boxes):
        x, y = _inside(shape, box)
        assert np.abs(img[y, x] - np.array(tw.COLORS[colour])).max() <= 40, (colour, shape, img[y, x])
    # left to right, and the caption names them in that order
    centres = [(b[0] + b[2]) / 2 for b in boxes]
    assert centres == sorted(centres)
    caption = scene.caption().lower()
    positions = [caption.index(tw.name(o)) for o in scene.objects]
    assert positions == sorted(positions)


def test_the_co_occurrence_bias_is_what_the_recipe_says():
    rng = np.random.default_rng(1)
    with_anchor = {a: [0, 0] for a in tw.PARTNERS}
    without = {a: [0, 0] for a in tw.PARTNERS}
    for _ in range(20000):
        objs = tw.sample_objects(rng, 0.85)
        for anchor, partner in tw.PARTNERS.items():
            d = with_anchor if anchor in objs else without
            d[anchor][0] += partner in objs
            d[anchor][1] += 1
    for anchor in tw.PARTNERS:
        p_with = with_anchor[anchor][0] / with_anchor[anchor][1]
        p_without = without[anchor][0] / without[anchor][1]
        assert 0.81 <= p_with <= 0.91 and p_without < 0.15, (anchor, p_with, p_without)
    rng = np.random.default_rng(2)
    assert all(1 <= len(tw.sample_objects(rng, 0.0)) <= 4 for _ in range(500))
    freq = tw.frequencies()
    partners = set(tw.PARTNERS.values())
    assert set(tw.popular_order()[:3]) == partners  # the partners come with their anchors: the most frequent
    assert min(freq[p] for p in partners) > max(f for o, f in freq.items() if o not in partners)


def _rows(split):
    return [json.loads(line) for line in (POPE / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("split", tw.SPLITS)
def test_shipped_pope_files_are_balanced_true_and_held_out(split):
    rows = _rows(split)
    assert len(rows) == 100 and sum(r["label"] == "yes" for r in rows) == 50
    popular = tw.popular_order()
    for r in rows:
        assert r["seed"] >= tw.EVAL_SEED  # training draws seeds below EVAL_SEED
        assert (POPE / r["image"]).is_file()
        assert (r["object"] in r["objects"]) == (r["label"] == "yes")
        assert r["question"].startswith("Is there a") and r["object"] in r["question"]
        if r["label"] == "no" and split == "popular":
            present = {tuple(o.split()) for o in r["objects"]}
            assert tuple(r["object"].split()) == next(o for o in popular if o not in present)
    if split == "adversarial":
        partner_negatives = sum(
            r["label"] == "no" and any(tw.name(tw.PARTNERS[a]) == r["object"] or tw.name(a) == r["object"]
                                       for a in tw.PARTNERS if tw.name(a) in r["objects"]
                                       or tw.name(tw.PARTNERS[a]) in r["objects"]) for r in rows)
        assert partner_negatives >= 10  # the co-occurring partner asked about when it is absent


def test_shipped_pope_files_regenerate_identically(tmp_path):
    """The files are the generator's output (seeds recorded): regenerating gives the same questions and pixels."""
    from PIL import Image

    tw.write_pope(tmp_path, 96, per_split=100)
    for split in tw.SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_text() == (POPE / f"{split}.jsonl").read_text()
    for row in _rows("adversarial")[:10]:
        a = np.asarray(Image.open(tmp_path / row["image"]))
        b = np.asarray(Image.open(POPE / row["image"]))
        assert np.array_equal(a, b)


def test_trained_toy_presets_load_like_checkpoints_or_say_how_to_train():
    """A trained toy preset is a shipped checkpoint directory with its training record (>= 0.9 held-out accuracy);
    where it is not shipped yet, asking for it names the command that trains it."""
    from scr_export.errors import ModelLoadError
    from scr_export.presets import PRESETS, TOY_MODELS, ensure_preset

    trained = [n for n, p in PRESETS.items() if p.trained]
    assert trained
    for name in trained:
        if (TOY_MODELS / name / "config.json").is_file():
            record = json.loads((TOY_MODELS / name / "training.json").read_text())
            assert record["final_questions"] >= 200
            assert record["final_heldout_random"]["accuracy"] >= 0.9, record["final_heldout_random"]
            assert ensure_preset(name) == TOY_MODELS / name
        else:
            with pytest.raises(ModelLoadError) as info:
                ensure_preset(name)
            assert f"examples/toy/train.py {name}" in info.value.fix


def test_the_trained_presets_bpe_makes_the_worlds_words_single_tokens_and_round_trips():
    """The toy presets' tokenizer: a byte-level BPE learned from the world's text (tokenizers' BpeTrainer), the
    same vocabulary every build; colours, shapes and answers are one token each; any text decodes back exactly."""
    from scr_export.presets import _toy_corpus
    from scr_export.tokenizer import build_byte_tokenizer

    corpus = _toy_corpus("USER: ", " ASSISTANT:", " Yes", " No")
    tok = build_byte_tokenizer(["<image>"], {"image_token": "<image>"}, add_bos=True, corpus=corpus, merges=160)
    again = build_byte_tokenizer(["<image>"], {"image_token": "<image>"}, add_bos=True, corpus=corpus, merges=160)
    assert tok.get_vocab() == again.get_vocab()
    assert 256 < len(tok) <= 256 + 160 + 8
    for word in [*tw.COLORS, *tw.SHAPES, "Yes", "No"]:
        ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    for text in ("Is there a purple diamond in the image?", "Café 日本 🚗 1234  x\n", "<image>\nhello"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    plain = build_byte_tokenizer(["<image>"], {"image_token": "<image>"}, add_bos=True)
    assert len(plain) < len(tok)  # the untrained presets keep their byte-only vocabulary


def test_the_trainer_runs_end_to_end_and_writes_a_loadable_checkpoint_with_its_record(tmp_path):
    """examples/toy/train.py for a few steps: a checkpoint directory that loads through the ordinary path, and
    training.json with the recipe, the curve and the final held-out numbers."""
    import subprocess
    import sys

    from scr_export.loading import load_vlm

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "toy"
    res = subprocess.run([sys.executable, str(root / "examples" / "toy" / "train.py"), "toy-llava", "--steps", "4",
                          "--batch", "2", "--eval-every", "1000", "--final-questions", "8", "--hard", "--stop-at", "3",
                          "--vision-steps", "2", "--vision-batch", "2", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["schedule_steps"] == 4 and record["batch_pictures"] == 2
    assert record["seed"] == 0
    assert record["data"]["training_seeds"] == [0, 6]  # 3 steps x 2 pictures, below the evaluation seeds
    assert "confusable" in record["data"]["per_picture"] and record["command"].endswith(str(out))
    final = record["final_heldout_random"]
    assert 0.0 <= final["accuracy"] <= 1.0 and 0.0 <= final["yes_ratio"] <= 1.0
    assert [p["step"] for p in record["curve"]] == []  # stopped before the first point of the curve
    vision = record["vision_stage"]
    assert vision["steps"] == 2 and vision["seeds"][1] - vision["seeds"][0] == 4
    assert [p["step"] for p in vision["curve"]] == [2] and 0 <= vision["final"]["exact_set"] <= 1
    vlm = load_vlm(str(out))
    assert vlm.name == "llava" and vlm.num_layers == 4
    assert not list(out.parent.glob(".toy-llava-out-*"))  # staged output renamed into place


def test_the_vision_stage_trains_the_tower_then_freezes_it():
    """Stage 0 (LLaVA-1.5 over a pre-trained CLIP): the presence objective moves the tower's and the projector's
    weights, and leaves the tower frozen for the end-to-end stage while the projector stays trainable."""
    import importlib.util
    import tempfile

    import torch

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("toy_train", root / "examples" / "toy" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    model, tok, ip, pc = train.build("toy-llava")
    with tempfile.TemporaryDirectory() as work:
        fam = train.family_for(model, tok, ip, pc, Path(work))
        tower = train.vision_tower(model)
        proj = model.model.multi_modal_projector
        before = {n: p.detach().clone() for n, p in (*tower.named_parameters(), *proj.named_parameters())}
        record = train.pretrain_vision(fam, train.image_size(fam), steps=2, batch=2, lr=1e-3, eval_every=2)
    after = dict((*tower.named_parameters(), *proj.named_parameters()))
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    last = f"encoder.layers.{model.config.vision_config.num_hidden_layers - 1}."
    read = {n for n in after if last not in n and "post_layernorm" not in n}  # vision_feature_layer -2
    assert moved == read, sorted(moved ^ read)  # what the decoder reads moved; the unread last layer did not
    assert not any(p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in proj.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert record["final"]["step"] == 2


def test_the_pope_benchmark_smoke(tmp_path):
    """benchmarks/toy_pope.py --smoke: converts a preset (the trained one where shipped) and validates it over the
    shapes POPE file; the table names the reference's and the deployed model's accuracy with SCR and without."""
    import subprocess
    import sys

    from scr_export.presets import TOY_MODELS

    root = Path(__file__).resolve().parents[1]
    preset = "toy-llava" if (TOY_MODELS / "toy-llava" / "config.json").is_file() else "tiny-llava"
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "toy_pope.py"), "--smoke", "--preset", preset,
                          "--work", str(tmp_path / "w"), "--json", str(out)], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "ref SCR" in res.stdout and "dep. off" in res.stdout
    r = json.loads(out.read_text())["results"]["fp32"]["adversarial"]
    assert r["samples"] == 6 and r["passed"] is True  # fp32 holds every gate
    for key in ("reference_scr", "reference_off", "deployed_scr", "deployed_off"):
        assert r["pope"][key]["n"] == 6
    bad = subprocess.run([sys.executable, str(root / "benchmarks" / "toy_pope.py"), "--precisions", "int3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown precision int3" in bad.stderr


def test_shipped_calibration_pictures_regenerate_identically_and_are_not_held_out(tmp_path):
    """examples/shapes-calibration: the toy presets' int8 / fp8 calibration data, from the training distribution
    (seeds below the evaluation range, above any training run's), regenerated bit for bit."""
    from PIL import Image

    shipped = Path(__file__).resolve().parents[1] / "examples" / "shapes-calibration"
    tw.write_calibration(tmp_path, 96)
    assert (tmp_path / "prompts.txt").read_text() == (shipped / "prompts.txt").read_text()
    names = sorted(p.name for p in shipped.glob("*.png"))
    assert names == sorted(p.name for p in tmp_path.glob("*.png")) and len(names) == 16
    for n in names[:4]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / n)), np.asarray(Image.open(shipped / n)))
    assert tw.CALIB_SEED + 16 <= tw.EVAL_SEED
    assert all(line.startswith("Is there ") for line in (shipped / "prompts.txt").read_text().splitlines())


def test_hard_negatives_are_absent_objects_that_share_a_colour_or_a_shape():
    """training_pairs(hard=True): every second no question asks about an absent object sharing a colour or a shape
    with a present one; yes questions, the caption and the picture are those of the default recipe."""
    shared = 0
    for seed in range(60):
        pic, plain = tw.training_pairs(seed, 96, per_image=2)
        pic2, hard = tw.training_pairs(seed, 96, per_image=2, hard=True)
        assert np.array_equal(np.asarray(pic), np.asarray(pic2))
        assert [p for p in plain if p[1] != "No"] == [p for p in hard if p[1] != "No"]
        rng = np.random.default_rng(seed)
        scene = tw.draw_scene(tw.sample_objects(rng, 0.85), 96, rng)[1]
        present = set(scene.objects)
        for q, a in hard:
            if a == "No":
                obj = next(o for o in tw.all_objects() if q == tw.QUESTION.format(tw.article(o)))
                assert obj not in present
                shared += any(obj[0] == p[0] or obj[1] == p[1] for p in present)
    assert shared >= 60  # at least one confusable no question per picture on average
    scene = tw.Scene([("red", "circle")], [(0, 0, 10, 10)], 96, "noise")
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = tw.confusable(scene, rng, "colour")
        assert c[0] == "red" and c != ("red", "circle")
        s = tw.confusable(scene, rng, "shape")
        assert s[1] == "circle" and s != ("red", "circle")
