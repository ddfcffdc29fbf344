"""``python -m vitkernels.train``: a tiny ViT (img 16, patch 4, depth 2) on a few digits learns; a resumed run
ends bit for bit where an uninterrupted one does; fine-tuning at another image size resamples the position
embedding; video models train on the moving-digits clips; impossible requests are refused by name; and a
two-process torchrun (gloo) run gives the one-process run with the same global batch. In-process
(``run(argv)`` / ``main(argv)``) wherever one process will do."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

from vitkernels import models  # noqa: E402
from vitkernels.train import build, cli, data, engine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--model-kwargs", "patch_size=4", "depth=2",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def equal_state(a, b):
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------------------- training

def test_a_few_steps_lower_the_loss():
    result = cli.run(TINY + ["--train-limit", "64", "--val-limit", "32", "--batch-size", "16", "--epochs", "15",
                             "--warmup-steps", "4", "--label-smoothing", "0", "--log-interval", "4"])
    losses = [loss for _, loss in result.loss_log]      # the mean loss of every 4 steps
    assert len(losses) == 15 and [step for step, _ in result.loss_log][-1] == 60
    assert losses[-1] < 0.7 * losses[0], losses         # measured: 2.55 -> 1.28
    s = result.summary
    assert s["steps"] == 60 and s["epochs_done"] == 15 and s["patched"] and not s["video"]
    assert 0 <= s["final_val_acc"] <= 100 and s["best_val_acc"] >= s["final_val_acc"]
    assert s["images_per_s"] > 0 and s["peak_memory_mib"] > 0 and s["memory"] == "process max RSS"


def test_resume_ends_bit_for_bit_where_the_uninterrupted_run_ends(tmp_path, capsys):
    # drop path and augmentation on: the RNG state and the per-(seed, epoch, sample) shifts must both resume
    base = TINY + ["--model-kwargs", "patch_size=4", "depth=2", "drop_path_rate=0.1", "--augment",
                   "--train-limit", "48", "--val-limit", "16", "--batch-size", "16", "--epochs", "2", "--seed", "3"]
    straight = cli.run(base + ["--output", str(tmp_path / "straight")]).model.state_dict()
    for stop in (3, 4):        # at the epoch boundary, and one step into epoch 2
        out = tmp_path / f"stop{stop}"
        first = cli.run(base + ["--output", str(out), "--max-steps", str(stop)])
        assert first.summary["steps"] == stop and first.summary["stopped_early"]
        saved = torch.load(out / "last.pt", weights_only=True)
        assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == ((1, 0, 3) if stop == 3 else (1, 1, 4))
        assert saved["format"] == engine.CHECKPOINT_FORMAT and {"optimizer", "scheduler", "rng", "args"} <= set(saved)
        # every other argument comes from the checkpoint
        resumed = cli.run(["--resume", str(out / "last.pt"), "--no-progress"])
        assert resumed.summary["steps"] == 6 and resumed.summary["epochs_done"] == 2
        assert equal_state(straight, resumed.model.state_dict()) == [], f"resumed after step {stop} differs"
        assert json.loads((out / "summary.json").read_text())["resumed_from"] == str(out / "last.pt")
    assert "resumed" in capsys.readouterr().out
    # the optimizer and schedule were restored too: after the straight run, the last LR is the minimum
    assert torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["scheduler"]["_last_lr"][0] == \
        pytest.approx(1e-6)


def test_the_run_does_not_depend_on_the_dataloader_workers():
    args = TINY + ["--augment", "--train-limit", "48", "--val-limit", "16", "--batch-size", "16", "--epochs", "2"]
    serial = cli.run(args + ["--workers", "0"]).model.state_dict()
    assert equal_state(serial, cli.run(args + ["--workers", "2"]).model.state_dict()) == []


def test_finetune_at_a_new_image_size_resamples_the_position_embedding(tmp_path, capsys):
    from timm.layers import resample_abs_pos_embed

    small = tmp_path / "small"
    cli.run(TINY + ["--train-limit", "32", "--val-limit", "16", "--batch-size", "16", "--epochs", "1",
                    "--output", str(small)])
    trained = torch.load(small / "last.pt", weights_only=True)["model"]
    capsys.readouterr()
    # 16 -> 24 pixels (4x4 -> 6x6 patches) and 10 -> 12 classes; --max-steps 0: load, evaluate, stop
    tuned = cli.run(TINY + ["--img-size", "24", "--num-classes", "12", "--finetune", str(small / "last.pt"),
                            "--val-limit", "16", "--max-steps", "0"])
    out = capsys.readouterr().out
    assert "classifier head not loaded" in out and "head.weight" in out and "pos_embed" in out
    state = tuned.model.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 36, 192) and state["head.weight"].shape == (12, 192)
    expected = resample_abs_pos_embed(trained["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(state["pos_embed"], expected)
    for key in ("cls_token", "blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "norm.bias"):
        assert torch.equal(state[key], trained[key]), key
    assert tuned.summary["finetuned_from"]["dropped"] == ["head.weight", "head.bias"]
    # a raw state_dict file loads as well, strictly when the head fits
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    again = cli.run(TINY + ["--img-size", "24", "--num-classes", "12", "--finetune", str(raw), "--val-limit", "8",
                            "--max-steps", "0"])
    assert equal_state(state, again.model.state_dict()) == []
    assert again.summary["finetuned_from"]["dropped"] == []


def test_grad_checkpointing_runs_on_a_model_that_has_it():
    result = cli.run(TINY + ["--grad-checkpointing", "--train-limit", "16", "--val-limit", "8", "--batch-size", "8",
                             "--max-steps", "1"])
    assert result.model.grad_checkpointing and result.summary["steps"] == 1


def test_an_image_folder_with_and_without_val(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label, color in (("cat", 40), ("dog", 200)):
            folder = tmp_path / "both" / split / label
            folder.mkdir(parents=True)
            for i in range(4 if split == "train" else 2):
                Image.new("RGB", (20, 18), (color, i * 10, 255 - color)).save(folder / f"{i}.png")
    result = cli.run(TINY + ["--data", str(tmp_path / "both"), "--batch-size", "4", "--epochs", "1"])
    assert result.summary["train_samples"] == 8 and result.summary["val_samples"] == 4
    assert result.summary["num_classes"] == 2 and "train/ and val/" in result.summary["data"]
    # no val/: a seeded 80/20 split of the folder
    splits = data.image_folder(str(tmp_path / "both" / "train"), 16)
    assert (len(splits.train), len(splits.val)) == (6, 2) and splits.classes == ["cat", "dog"]
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    data.set_epoch(splits.train, 0)
    assert torch.equal(splits.train[1][0], splits.train[1][0])   # augmentation: a function of (seed, epoch, index)


def test_limits_take_every_class_not_the_first_folder(tmp_path):
    from PIL import Image

    for label, color in (("a_cat", 40), ("b_dog", 120), ("c_eel", 200)):
        folder = tmp_path / "pets" / label
        folder.mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20, 18), (color, i * 10, 255 - color)).save(folder / f"{i}.png")
    splits = data.image_folder(str(tmp_path / "pets"), 16, train_limit=9, val_limit=3)
    train_labels = sorted(splits.train[i][1] for i in range(len(splits.train)))
    val_labels = sorted(splits.val[i][1] for i in range(len(splits.val)))
    assert train_labels == [0, 0, 0, 1, 1, 1, 2, 2, 2] and val_labels == [0, 1, 2]
    digits = data.digits_images(8, train_limit=20)
    assert sorted({int(digits.train[i][1]) for i in range(20)}) == list(range(10))


# ----------------------------------------------------------------------------------------- video

def test_a_video_swin_trains_on_moving_digit_clips():
    result = cli.run(["--model", "swin3d_t", "--img-size", "16", "--num-frames", "4", "--device", "cpu",
                      "--no-progress", "--train-limit", "8", "--val-limit", "4", "--batch-size", "4",
                      "--max-steps", "2"])
    s = result.summary
    assert s["video"] and s["num_frames"] == 4 and s["steps"] == 2 and s["clips_per_s"] > 0
    assert s["source"] == "vitkernels" and s["patched"]


@pytest.mark.skipif(not any(n.startswith("video_vit_") for n in models.list_models()),
                    reason="vitkernels.models has no video_vit_* model yet")
def test_a_video_vit_trains_on_moving_digit_clips():
    name = next(n for n in models.list_models() if n.startswith("video_vit_tiny"))
    result = cli.run(["--model", name, "--img-size", "16", "--num-frames", "4", "--model-kwargs", "patch_size=4",
                      "depth=2", "--device", "cpu", "--no-progress", "--train-limit", "8", "--val-limit", "4",
                      "--batch-size", "4", "--max-steps", "2"])
    assert result.summary["video"] and result.summary["steps"] == 2
    assert result.model.patch_embed.clip_size == (4, 16, 16)


def test_digit_clips_are_c_t_h_w_with_the_digit_moving():
    splits = data.digits_clips(img_size=24, num_frames=6)
    clip, label = splits.train[5]
    assert clip.shape == (3, 6, 24, 24) and 0 <= label <= 9 and torch.equal(clip[0], clip[2])
    assert torch.equal(clip, splits.train[5][0])                     # a fixed clip per sample
    raw = splits.train.raw_clip(5)
    mass = raw.sum(dim=(1, 2))
    torch.testing.assert_close(mass, mass[:1].expand(6))             # the whole digit in every frame
    ys, xs = torch.arange(24.0)[:, None], torch.arange(24.0)[None, :]
    centres = torch.stack([(raw * ys).sum((1, 2)) / mass, (raw * xs).sum((1, 2)) / mass], 1)
    assert (centres[1:] - centres[:-1]).abs().sum(1).gt(0.5).all()  # it moves every frame
    # it is the label's digit: the first frame's sprite is the digit image, scaled
    y, x = splits.train.positions(5)[0]
    images, labels = data.load_digits()
    train_ids, _ = data.split_indices(len(labels))
    assert label == int(labels[train_ids[5]])
    torch.testing.assert_close(raw[0, y:y + 12, x:x + 12], splits.train.sprites[5])
    # trajectories differ between samples and stay on the canvas
    starts = {splits.train.positions(i)[0] for i in range(32)}
    assert len(starts) > 16
    for i in range(32):
        assert all(0 <= p <= 12 for pos in splits.train.positions(i) for p in pos)
    # normalised: over many clips, mean about 0 and std about 1
    batch = torch.stack([splits.train[i][0] for i in range(32)])
    assert abs(float(batch.mean())) < 0.15 and abs(float(batch.std()) - 1) < 0.15
    with pytest.raises(ValueError, match="--img-size"):
        data.digits_clips(img_size=8, num_frames=4)


# ----------------------------------------------------------------------------------------- refusals

def test_fp16_on_cpu_is_refused_with_the_way_out(capsys):
    assert cli.main(TINY + ["--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--amp fp16" in err and "bf16" in err and "CUDA" in err


def test_grad_checkpointing_on_a_model_without_it_is_refused_by_name(capsys):
    assert cli.main(["--model", "resnet18", "--source", "torchvision", "--grad-checkpointing", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--grad-checkpointing" in err and "'resnet18'" in err and "set_grad_checkpointing" in err
    assert "patch_torchvision" in err
    # an unpatched model whose patched version has it: the message says to drop --no-patch
    assert cli.main(["--model", "swin3d_t", "--no-patch", "--grad-checkpointing", "--device", "cpu"]) == 2
    assert "drop --no-patch" in capsys.readouterr().err


def test_finetune_of_a_video_vit_resamples_from_the_recorded_clip_grid(tmp_path, capsys):
    video = ["--model", "video_vit_tiny_patch16_tubelet2_224", "--model-kwargs", "patch_size=8", "depth=1",
             "--device", "cpu", "--no-progress", "--val-limit", "8"]
    source = tmp_path / "clips"
    cli.run(video + ["--img-size", "32", "--num-frames", "8", "--train-limit", "8", "--batch-size", "8",
                     "--epochs", "1", "--output", str(source)])
    checkpoint = torch.load(source / "last.pt", weights_only=True)
    assert checkpoint["clip_grid"] == [4, 4, 4]
    # 4x4x4 -> 8x2x2: the same kind of grid guessed from the length alone would be 16x2x2
    tuned = cli.run(video + ["--img-size", "16", "--num-frames", "16", "--finetune", str(source / "last.pt"),
                             "--max-steps", "0"])
    expected = models.video_vit.resample_pos_embed(checkpoint["model"]["pos_embed"], (4, 4, 4), (8, 2, 2))
    torch.testing.assert_close(tuned.model.pos_embed.detach(), expected)
    capsys.readouterr()
    # a raw state_dict of a grid that differs in both frames and frame size cannot be told: exit 2, by name
    raw = tmp_path / "raw.pt"
    torch.save(checkpoint["model"], raw)
    assert cli.main(video + ["--img-size", "48", "--num-frames", "4", "--finetune", str(raw), "--max-steps", "0"]) == 2
    assert "clip_grid" in capsys.readouterr().err


def test_sizes_a_builder_cannot_take_exit_2_with_a_message(capsys):
    assert cli.main(["--model", "vit_b_16", "--source", "torchvision", "--img-size", "40", "--device", "cpu"]) == 2
    assert "indivisible by patch size" in capsys.readouterr().err
    assert cli.main(["--model", "mvit_v2_s", "--img-size", "32", "--num-frames", "8", "--device", "cpu"]) == 2
    assert "16 frames of 224x224" in capsys.readouterr().err


def test_other_bad_requests_exit_2_with_a_message(capsys, tmp_path):
    assert cli.main(["--model", "no_such_model_anywhere", "--device", "cpu"]) == 2
    assert "no_such_model_anywhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--epochs", "2"])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
    assert cli.main(TINY + ["--num-classes", "3"]) == 2
    assert "10 classes" in capsys.readouterr().err
    assert cli.main(TINY + ["--model-kwargs", "depth"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main(TINY + ["--finetune", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_a_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install vitkernels\[train\]"):
        data.load_digits()


# ----------------------------------------------------------------------------------------- pieces

def test_help_lists_the_contract(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--source", "--no-patch", "--img-size", "--num-frames", "--model-kwargs", "--data", "--lr",
                 "--weight-decay", "--warmup-epochs", "--grad-clip", "--amp", "--grad-checkpointing", "--output",
                 "--resume", "--finetune", "--max-steps", "--workers", "--device", "--threads", "torchrun",
                 "make train-demo", "exit status"):
        assert flag in text, flag


def test_model_kwargs_parse_as_json():
    assert build.parse_model_kwargs(["depth=6", "drop_path_rate=0.1", "qkv_bias=false", "patch_size=[2,4,4]",
                                     "global_pool=avg"]) == {
        "depth": 6, "drop_path_rate": 0.1, "qkv_bias": False, "patch_size": [2, 4, 4], "global_pool": "avg"}


def test_no_weight_decay_on_biases_norms_embeddings_and_tables():
    model = models.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(1, 1, 1, 1),
                                embed_dim=24, num_heads=(1, 1, 1, 1), num_classes=3)
    decay, no_decay = engine.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any("relative_position_bias_table" in n for n in skipped)
    assert all(model.get_parameter(n).ndim <= 1 or "relative_position_bias_table" in n for n in skipped)
    assert all(p.ndim >= 2 for p in decay["params"])
    vit = models.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1)
    skipped = {n for n, p in vit.named_parameters() if any(p is q for q in engine.param_groups(vit, 0.1)[1]["params"])}
    assert {"pos_embed", "cls_token"} <= skipped and "blocks.0.attn.qkv.weight" not in skipped


def test_warmup_then_cosine():
    f = engine.warmup_cosine(total_steps=10, warmup_steps=4, min_ratio=0.01)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    values = [f(s) for s in range(4, 11)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(0.01)


def test_the_package_imports_without_the_training_extras():
    # None in sys.modules: importing them fails (torch itself imports tqdm if it can, so block, not check)
    code = ("import sys\n"
            "sys.modules.update(sklearn=None, tqdm=None)\n"
            "import vitkernels, vitkernels.train\n"
            "from vitkernels.train import build, cli, data, engine\n"
            "assert '--resume' in cli.build_parser().format_help()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------------------- torchrun

def test_two_gloo_processes_under_torchrun_match_one_process_with_the_global_batch(tmp_path):
    args = TINY + ["--train-limit", "64", "--val-limit", "30", "--epochs", "1", "--max-steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "vitkernels.train", *args, "--batch-size", "8", "--output", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("done: final val acc") == 1          # rank 0 alone prints
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["val_samples"] == 30
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert len(ddp["rng"]) == 2 and ddp["args"]["world_size"] == 2
    # the same global batch (2 x 8) in one process: the same samples per step, the same updates
    one = cli.run(args + ["--batch-size", "16"])
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert summary["final_val_acc"] == pytest.approx(one.summary["final_val_acc"])
