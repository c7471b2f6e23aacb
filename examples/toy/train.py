"""Train a toy preset on the shapes world (scr_export/toyworld.py), end to end on the CPU, and ship it.

    python examples/toy/train.py toy-llava [--steps 1500] [--batch 24] [--minutes 40] [--out DIR]

The architecture is the preset's builder (scr_export/presets.py, fixed seed); the data are drawn on the fly from
training seeds (below ``toyworld.EVAL_SEED``: the held-out POPE files never appear). Each picture gives a yes/no
question (its negative from a random POPE split) and its caption; the loss is the answer's tokens only. AdamW with a
linear warm-up and cosine decay. Every ``--eval-every`` steps the greedy first answer is scored on a fixed held-out
set of pictures (the random split's recipe, seeds beside the shipped files'). At the end the directory is written
the way ``save_pretrained`` writes a checkpoint, with ``training.json`` beside it: the seed, the data recipe, the
curve and the final accuracy. ``scr-export`` loads it through the same code path as any checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scr_export import toyworld  # noqa: E402
from scr_export.presets import PRESETS, SEED, TOY_MODELS  # noqa: E402

VALIDATION_SEED = toyworld.EVAL_SEED + 900_000  # a held-out set of its own (not the shipped POPE files)
VISION_SEED = 2_000_000  # the vision stage's pictures: a training range of their own (below CALIB_SEED)


def build(name: str):
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model, tok, ip, pc = PRESETS[name].build()
    return model, tok, ip, pc


def family_for(model, tok, ip, pc, path: Path):
    """The family adapter over the in-training model (save once to a directory, as any checkpoint)."""
    from scr_export.loading import load_vlm

    model.save_pretrained(path)
    tok.save_pretrained(path)
    ip.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(pc, indent=2, sort_keys=True))
    fam = load_vlm(str(path))
    fam.model = model  # train this very model
    return fam


def image_size(fam) -> int:
    """The side of the pictures drawn for this family: what its processor feeds the vision tower."""
    vision = getattr(fam.config, "vision_config", None)
    side = getattr(vision, "image_size", None)
    if isinstance(side, (list, tuple)):
        side = side[0]
    if side:
        return int(side)
    if fam.name == "qwen2_vl":
        return 112  # 8x8 patches of 14 -> 4x4 merged tokens... sized by the processor's pixel limits
    vq = getattr(fam.config, "vq_config", None)
    return int(getattr(vq, "resolution", 0) or 224)


def batch_of(fam, seeds, size: int, answer_space: str, per_image: int = 1, caption: bool = True, hard: bool = False):
    """Teacher-forced batch: prompt (family format, image tokens expanded) + answer + EOS; labels on the answer."""
    from scr_export.processing import encode

    tok = fam.tokenizer
    rows, images, extras = [], [], []
    for seed in seeds:
        pic, pairs = toyworld.training_pairs(seed, size, per_image=per_image, caption=caption, hard=hard)
        for prompt, answer in pairs:
            enc = encode(fam, [[pic]], [prompt])
            ids = enc.tensors["input_ids"][0].tolist()
            ans = tok(answer_space + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((ids, ans))
            extras.append({k: v for k, v in enc.tensors.items() if k not in ("input_ids", "attention_mask")})
    width = max(len(i) + len(a) for i, a in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (i, a) in enumerate(rows):
        seq = i + a
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        labels[b, len(i):len(seq)] = torch.tensor(a)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in extras[0]:
        batch[key] = torch.cat([e[key] for e in extras], 0)
    return batch


def vision_tower(model):
    """The family's vision encoder module (what LLaVA-1.5 freezes after its CLIP pre-training)."""
    inner = getattr(model, "model", model)
    for name in ("vision_tower", "visual"):
        if getattr(inner, name, None) is not None:
            return getattr(inner, name)
    raise SystemExit(f"{type(model).__name__} has no trainable vision tower (a VQ tokenizer?): drop --vision-steps")


def image_features(fam, pics) -> torch.Tensor:
    """The projected image features the decoder reads, [pictures, tokens, hidden]."""
    feats = fam.model.get_image_features(**fam.process_images(pics)).pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats.reshape(len(pics), -1, feats.shape[-1])


def presence_batch(seeds, size: int):
    """Pictures of the training distribution and their 36-object presence labels."""
    index = {o: i for i, o in enumerate(toyworld.all_objects())}
    pics, labels = [], torch.zeros(len(seeds), len(index))
    for b, seed in enumerate(seeds):
        pic, scene = toyworld.make_scene(seed, size)
        pics.append(pic)
        for obj in scene.objects:
            labels[b, index[obj]] = 1
    return pics, labels


def pretrain_vision(fam, size: int, steps: int, batch: int, lr: float, eval_every: int) -> dict:
    """Stage 0: the vision tower's own pre-training, as LLaVA-1.5 starts from a pre-trained CLIP. Multi-label presence
    of the world's 36 objects: a linear head over the projected image features (the decoder's own input), max over
    the image tokens, binary cross-entropy; the head is thrown away. Without it the end-to-end loss teaches colours
    within a few hundred steps and shapes never (the answers follow colour alone: runs 1-4 in the README)."""
    model = fam.model
    params = list(vision_tower(model).parameters())
    proj = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    if proj is not None:
        params += list(proj.parameters())
    hidden = image_features(fam, presence_batch([VISION_SEED], size)[0]).shape[-1]
    head = torch.nn.Linear(hidden, len(toyworld.all_objects()))
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    held_pics, held = presence_batch(range(VALIDATION_SEED + 500_000, VALIDATION_SEED + 500_300), size)

    def score() -> dict:
        with torch.no_grad():
            guess = head(image_features(fam, held_pics)).amax(1) > 0
        truth = held > 0
        same_colour_absent = []  # a present object's colour in each absent shape: does the tower say "absent"?
        objects = toyworld.all_objects()
        for b in range(len(truth)):
            for i in truth[b].nonzero().flatten().tolist():
                for j, other in enumerate(objects):
                    if other[0] == objects[i][0] and not truth[b, j]:
                        same_colour_absent.append(not guess[b, j].item())
        return {"exact_set": round((guess == truth).all(1).float().mean().item(), 4),
                "recall": round((guess & truth).sum().item() / truth.sum().item(), 4),
                "same_colour_absent": round(float(np.mean(same_colour_absent)), 4)}

    curve, t0, ema = [], time.time(), None
    model.train()
    for step in range(1, steps + 1):
        start = VISION_SEED + (step - 1) * batch
        pics, labels = presence_batch(range(start, start + batch), size)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(image_features(fam, pics)).amax(1), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % eval_every == 0 or step == steps:
            point = {"step": step, "loss": round(ema, 5), "seconds": round(time.time() - t0, 1), **score()}
            curve.append(point)
            print(f"vision step {step}  {point}", flush=True)
    for p in vision_tower(model).parameters():  # frozen from here on, as LLaVA-1.5's CLIP
        p.requires_grad_(False)
    return {"steps": steps, "batch_pictures": batch, "lr": lr,
            "objective": "36-object presence, linear head on the projected image features, max over tokens, BCE",
            "seeds": [VISION_SEED, VISION_SEED + steps * batch], "held_out": "300 pictures from "
            f"{VALIDATION_SEED + 500_000}", "curve": curve, "final": curve[-1] if curve else None,
            "then": "vision tower frozen; projector and decoder trained on the questions and captions"}


def answer_accuracy(fam, size: int, n: int = 96) -> dict:
    """Greedy first word of the answer on ``n`` held-out random-split questions (half yes): accuracy, yes-ratio."""
    from scr_export import pope
    from scr_export.processing import encode
    from scr_export.reference import generate

    popular = toyworld.popular_order()
    answers, labels = [], []
    k = 0
    fam.model.eval()
    with torch.no_grad():
        while len(labels) < n:
            s = VALIDATION_SEED + k
            k += 1
            pic, scene = toyworld.make_scene(s, size)
            rng = np.random.default_rng(s + 7)
            for q, label, _ in toyworld.questions(scene, "random", rng, popular, per_image=1):
                res = generate(fam, encode(fam, [[pic]], [q]), scr=False, max_new_tokens=6)
                answers.append(pope.read_answer(res.texts[0]))
                labels.append(label)
    fam.model.train()
    m = pope.PopeMetrics.of(answers, labels)
    return {"accuracy": round(m.accuracy, 4), "yes_ratio": round(m.yes_ratio, 4), "other": m.other}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=[n for n, p in PRESETS.items() if p.trained])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="pictures per step (each gives 2 sequences)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--questions", type=int, default=1,
                    help="yes questions per picture (and as many no questions)")
    ap.add_argument("--no-caption", action="store_true", help="questions only (no caption sequence)")
    ap.add_argument("--hard", action="store_true",
                    help="every second no question about a confusable object (a present colour in another shape, "
                         "or a present shape in another colour)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint directory's weights (a previous run's output; its record is "
                         "kept in the new one) instead of the builder's initialisation")
    ap.add_argument("--start-seed", type=int, default=0, help="first training picture's seed")
    ap.add_argument("--patch", type=int, default=None,
                    help="vision patch size in place of the preset's (a finer grid: more image tokens)")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="stage 0: pre-train the vision tower (and projector) on the objects' presence for this many "
                         "steps, then freeze the tower (LLaVA-1.5's recipe over a pre-trained CLIP)")
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--final-questions", type=int, default=200, help="held-out questions of the final score")
    ap.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop (and save) after this many steps, the schedule still that of --steps (what a run "
                         "stopped by --minutes did, repeated exactly)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {TOY_MODELS}/<preset>")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or TOY_MODELS / args.preset
    work = Path(tempfile.mkdtemp(prefix=f"{args.preset}-train-"))  # the system's temp dir: never the package
    model, tok, ip, pc = build(args.preset)
    if args.patch:
        cfg = model.config
        cfg.vision_config.patch_size = args.patch
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = type(model)(cfg)
        pc = {**pc, "patch_size": args.patch}
    init_record = None
    if args.init:
        from transformers import AutoTokenizer

        # transformers' own loader (it maps the saved layout back onto the model's); the builder's architecture
        model = type(model).from_pretrained(args.init, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.init)  # the vocabulary the weights were trained with
        if (args.init / "training.json").is_file():
            init_record = json.loads((args.init / "training.json").read_text())
    fam = family_for(model, tok, ip, pc, work)
    size = image_size(fam)
    space = " " if fam.name == "llava" else ""  # llava-hf answers after "ASSISTANT:" with a space
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.2f} M parameters, pictures {size} px, {args.steps} steps x {args.batch}",
          flush=True)
    torch.manual_seed(SEED)
    vision_record = None
    if args.vision_steps:
        vision_record = pretrain_vision(fam, size, args.vision_steps, args.vision_batch, args.vision_lr,
                                        max(1, min(args.eval_every, args.vision_steps)))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    curve, t0, seed, step, ema = [], time.time(), args.start_seed, 0, None
    for step in range(1, args.steps + 1):
        seeds = list(range(seed, seed + args.batch))
        seed += args.batch
        batch = batch_of(fam, seeds, size, space, args.questions, not args.no_caption, args.hard)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0:
            print(f"step {step}  loss {ema:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s",
                  flush=True)
        point = {"step": step, "loss": round(ema, 5), "seconds": round(time.time() - t0, 1)}
        if step % args.eval_every == 0 or step == args.steps:
            point.update(answer_accuracy(fam, size))
            print(f"  held-out: {point}", flush=True)
        if step % 25 == 0 or "accuracy" in point:
            curve.append(point)
        if args.stop_at and step >= args.stop_at:
            print(f"stopping at step {step}: --stop-at {args.stop_at}", flush=True)
            break
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            print(f"stopping at step {step}: --minutes {args.minutes}", flush=True)
            break
    final = answer_accuracy(fam, size, n=args.final_questions)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{args.preset}-out-", dir=out.parent))  # renamed into place at the end
    model.save_pretrained(staged)
    tok.save_pretrained(staged)
    ip.save_pretrained(staged)
    (staged / "processor_config.json").write_text(json.dumps(pc, indent=2, sort_keys=True))
    record = {"preset": args.preset, "seed": SEED, "parameters": params, "steps": step, "schedule_steps": args.steps,
              "batch_pictures": args.batch,
              "lr": args.lr, "schedule": "AdamW (0.9, 0.98), wd 0.01, linear warm-up 5 %, cosine decay, clip 1.0",
              "data": {"world": "scr_export/toyworld.py", "training_seeds": [args.start_seed, seed],
                       "per_picture": f"{args.questions} yes + {args.questions} no questions (negatives from "
                                      "one random POPE split)" + ("" if args.no_caption else " + the caption")
                                      + ("; every second no question a confusable object" if args.hard else ""),
                       "bias": 0.85, "partners": {toyworld.name(a): toyworld.name(p)
                                                  for a, p in toyworld.PARTNERS.items()},
                       "image_px": size},
              "torch": torch.__version__, "minutes": round((time.time() - t0) / 60, 1),
              "final_heldout_random": final, "final_questions": args.final_questions, "curve": curve,
              "vision_stage": vision_record, "init": init_record, "patch_override": args.patch,
              "command": " ".join(["python examples/toy/train.py", *sys.argv[1:]])}
    (staged / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}: held-out accuracy {final['accuracy']:.3f}, yes-ratio {final['yes_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
