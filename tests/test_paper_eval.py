"""`dpo-tutorial evaluate --pretrained ...`: the paper's measurements on local stand-ins of the real formats.

Tiny SD / SDXL pipelines stand in for SD 1.5 / SDXL, a tiny PickScore for PickScore, a Pick-a-Pic parquet for
Pick-a-Pic v2, a perturbed UNet saved in a ``unet/`` subfolder for a released DPO UNet. Every number is
checked against an independent computation: images sampled directly with diffusers, PNGs scored again,
win-rates counted by hand, the implicit-reward accuracy of the same pairs through the package's own function,
and the analytic values of a "tuned" model identical to the base (implicit accuracy and win-rate exactly 1/2).
"""
import fcntl
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import dpo_tutorial.paper_eval as paper_eval
from dpo_tutorial.cli import main
from dpo_tutorial.data import DataError, load_pickapic
from dpo_tutorial.evaluate import win_rate
from dpo_tutorial.paper_eval import (PaperEvalSettings, accuracy_interval, load_captions, prepare_out_dir, read_log,
                                     run_paper_eval)
from dpo_tutorial.run_dir import release_output_dir

CAPTIONS = ["a red circle", "a photo of a cat", "a blue square"]


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from dpo_tutorial.testing.fixtures import build_tiny_pickscore

    return build_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def sd_lora(sd_dir, pairs_parquet, tmp_path_factory):
    """A LoRA trained 3 steps on the tiny SD (a `dpo-tutorial train` output folder)."""
    from dpo_tutorial.config import TrainConfig
    from dpo_tutorial.train import train

    out = tmp_path_factory.mktemp("sd-lora")
    train(TrainConfig(pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(out), resolution=32,
                      batch_size=4, max_steps=3, lr=5e-2, rank=4, sample_grid=False))
    return out


def tuned_unet_folder(pipeline_dir, out, scale: float, subfolder: bool = True):
    """The pipeline's UNet with every weight shifted by ``scale`` x N(0, 1) noise, saved as a released DPO UNet
    is (``out/unet/``), or at the folder's top when ``subfolder`` is False."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    unet.save_pretrained(str(out / "unet" if subfolder else out))
    return out


def prompt_file(tmp_path, captions=CAPTIONS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(captions) + "\n")
    return path


def flags(pipeline, out, pickscore, **extra):
    args = ["evaluate", "--pretrained", str(pipeline), "--out", str(out), "--pickscore-model", str(pickscore),
            "--pickscore-processor", str(pickscore), "--steps", "2", "--num-draws", "2"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args + ["--json"]


def saved_images(out, records, which):
    return np.stack([np.asarray(Image.open(out / r[f"{which}_image"])) for r in records])  # (N, H, W, 3)


def hand_win_rate(base, tuned):
    return sum(1.0 if t > b + 1e-6 else 0.0 if t < b - 1e-6 else 0.5 for b, t in zip(base, tuned)) / len(base)


@pytest.mark.slow
def test_lora_evaluation_matches_independent_computations(sd_dir, sd_lora, pairs_parquet, pickscore_dir, tmp_path,
                                                          capsys):
    from dpo_tutorial.evaluate import implicit_reward_accuracy, load_with_lora
    from dpo_tutorial.pickscore import PickScore
    from dpo_tutorial.sample import generate, load_pipeline

    out = tmp_path / "eval"
    assert main(flags(sd_dir, out, pickscore_dir, lora=sd_lora, captions=prompt_file(tmp_path), pairs=pairs_parquet,
                      pairs_split="train", streaming=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    records = read_log(out / "prompts.jsonl")
    assert [r["caption"] for r in records] == CAPTIONS and [r["seed"] for r in records] == [0, 1, 2]
    base, tuned = saved_images(out, records, "base"), saved_images(out, records, "tuned")
    # base: the pipeline without any LoRA; tuned: the pipeline with it; the same seeds for both
    np.testing.assert_array_equal(base, generate(load_pipeline(sd_dir), CAPTIONS, [0, 1, 2], 2, 7.5))
    pipe, parts = load_with_lora(str(sd_dir), sd_lora)
    np.testing.assert_array_equal(tuned, generate(pipe, CAPTIONS, [0, 1, 2], 2, 7.5))
    assert not np.array_equal(base, tuned)
    judge = PickScore(pickscore_dir, pickscore_dir)
    base_scores, tuned_scores = judge(base, CAPTIONS), judge(tuned, CAPTIONS)  # the saved PNGs, scored again
    np.testing.assert_allclose([r["base_score"] for r in records], base_scores, rtol=1e-5)
    np.testing.assert_allclose([r["tuned_score"] for r in records], tuned_scores, rtol=1e-5)
    p = report["pickscore"]
    assert p["prompts"] == 3 and p["win_rate"] == pytest.approx(hand_win_rate(base_scores, tuned_scores))
    assert (p["base_mean"], p["tuned_median"]) == (pytest.approx(base_scores.mean(), rel=1e-5),
                                                   pytest.approx(np.median(tuned_scores), rel=1e-5))
    assert p["win_rate_ci_low"] <= p["win_rate"] <= p["win_rate_ci_high"]
    # one chunk of 64 rows holds all 17: the package's own measurement on the same pairs with seed 0
    acc, scored = implicit_reward_accuracy(parts, pipe.unet, load_pickapic(str(pairs_parquet)), 32, num_draws=2,
                                           seed=0, return_count=True)
    r = report["implicit_reward"]
    assert (r["pairs"], r["rows_read"], r["num_draws"]) == (scored, 17, 2) == (15, 17, 2)
    assert r["accuracy"] == pytest.approx(acc) and r["ci_low"] <= acc <= r["ci_high"]
    assert main(flags(sd_dir, out, pickscore_dir, lora=sd_lora, captions=prompt_file(tmp_path), pairs=pairs_parquet,
                      pairs_split="train", streaming=True)[:-1]) == 0  # a finished evaluation: the table again
    assert "implicit-reward accuracy (tuned vs base as reference)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_a_full_unet_replaces_the_base_unet(model, sd_dir, sdxl_dir, pairs_parquet, pickscore_dir, tmp_path, capsys):
    """A released-style UNet folder (unet/ subfolder) against its base: images from diffusers with that UNet
    swapped in; a copy identical to the base gives exactly 1/2 for both the implicit accuracy and the win-rate."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from dpo_tutorial.sample import generate

    pipeline_dir = sd_dir if model == "sd" else sdxl_dir
    tuned = tuned_unet_folder(pipeline_dir, tmp_path / "tuned", scale=0.05)
    common = dict(captions=pairs_parquet, captions_split="train", num_prompts=2, pairs=pairs_parquet,
                  pairs_split="train")
    assert main(flags(pipeline_dir, tmp_path / "eval", pickscore_dir, unet=tuned, **common)) == 0
    report = json.loads(capsys.readouterr().out)
    records = read_log(tmp_path / "eval" / "prompts.jsonl")
    captions = [r["caption"] for r in records]
    assert captions == ["a red square", "a green square"]  # the parquet's first two distinct captions
    cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
    extra = {} if model == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(pipeline_dir), **extra)
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe, captions, [0, 1], 2, 7.5)
    pipe.unet = UNet2DConditionModel.from_pretrained(str(tuned), subfolder="unet")
    np.testing.assert_array_equal(saved_images(tmp_path / "eval", records, "base"), base)
    tuned_images = generate(pipe, captions, [0, 1], 2, 7.5)
    np.testing.assert_array_equal(saved_images(tmp_path / "eval", records, "tuned"), tuned_images)
    assert report["implicit_reward"]["pairs"] == 15 and 0 <= report["implicit_reward"]["accuracy"] <= 1

    same = tuned_unet_folder(pipeline_dir, tmp_path / "same", scale=0.0, subfolder=False)  # config.json at the top
    assert main(flags(pipeline_dir, tmp_path / "same-eval", pickscore_dir, unet=same, **common)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["implicit_reward"]["accuracy"] == 0.5  # every logit is exactly 0: each pair counts 1/2
    scores = report["pickscore"]
    assert scores["win_rate"] == 0.5 and scores["base_mean"] == scores["tuned_mean"]  # the same images


@pytest.mark.slow
def test_a_killed_evaluation_resumes_where_it_stopped(sd_dir, sd_lora, pickscore_dir, tmp_path, monkeypatch, capsys):
    """SIGKILL after the first prompts are logged, a torn line appended, then a rerun: it samples only the
    missing prompts and ends with the report of an unbroken run."""
    captions = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]  # 8 prompts
    args = flags(sd_dir, tmp_path / "killed", pickscore_dir, lora=sd_lora, captions=prompt_file(tmp_path, captions),
                 sample_batch=1)
    args[args.index("--steps") + 1] = "40"  # ~0.5 s a prompt: time to kill it half-way
    log = tmp_path / "killed" / "prompts.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "dpo_tutorial.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 2):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = log.read_text().count("\n")
    assert 2 <= done < 8 and not (tmp_path / "killed" / "report.json").exists(), done
    with open(log, "a") as f:
        f.write('{"index": 7, "caption": "a yellow sq')  # a write cut short by the crash
    sampled = []
    original = paper_eval.generate  # the name paper_eval samples through
    monkeypatch.setattr(paper_eval, "generate",
                        lambda pipe, caps, *a, **k: sampled.extend(caps) or original(pipe, caps, *a, **k))
    assert main(args) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert sorted(sampled) == sorted(2 * captions[done:])  # base and tuned images of the missing prompts only
    assert [r["index"] for r in read_log(log)] == list(range(8))
    monkeypatch.undo()
    unbroken = args.copy()
    unbroken[unbroken.index("--out") + 1] = str(tmp_path / "unbroken")
    assert main(unbroken) == 0
    whole = json.loads(capsys.readouterr().out)
    for key in ("base_mean", "tuned_mean", "base_median", "tuned_median", "win_rate"):
        assert resumed["pickscore"][key] == pytest.approx(whole["pickscore"][key], rel=1e-6), key


@pytest.mark.slow
def test_implicit_accuracy_resumes_chunk_by_chunk_with_the_same_draws(sd_dir, sd_lora, pairs_parquet, pickscore_dir,
                                                                       tmp_path, monkeypatch):
    settings = PaperEvalSettings(pretrained=str(sd_dir), lora=str(sd_lora), pairs=str(pairs_parquet),
                                 pairs_split="train", num_draws=2, pair_batch=5, steps=2)
    whole = run_paper_eval(settings, tmp_path / "eval", progress=False)
    assert lock_is_free(tmp_path / "eval")  # released when the evaluation ends
    log = tmp_path / "eval" / "implicit.jsonl"
    chunks = read_log(log)
    assert [c["rows"] for c in chunks] == [5, 5, 5, 2] and sum(c["pairs"] for c in chunks) == 15
    log.write_text("".join(json.dumps(c) + "\n" for c in chunks[:2]))  # as if it crashed after chunk 1
    calls = []
    original = paper_eval.implicit_reward_accuracy  # the name paper_eval scores through
    monkeypatch.setattr(paper_eval, "implicit_reward_accuracy",
                        lambda *a, **k: calls.append(k["seed"]) or original(*a, **k))
    resumed = run_paper_eval(settings, tmp_path / "eval", progress=False)
    assert calls == [2, 3]  # only chunks 2 and 3, with their own seeds
    timing = {"gpu_seconds": resumed["implicit_reward"]["gpu_seconds"]}
    assert resumed["implicit_reward"] == whole["implicit_reward"] | timing


def test_a_folder_with_other_settings_or_foreign_files_is_refused(sd_dir, tmp_path, capsys):
    settings = PaperEvalSettings(pretrained=str(sd_dir), lora=str(tmp_path), captions="prompts.txt", steps=2)
    prepare_out_dir(tmp_path / "eval", settings)
    prepare_out_dir(tmp_path / "eval", settings)  # the same settings: accepted (a rerun continues)
    args = ["evaluate", "--pretrained", str(sd_dir), "--lora", str(tmp_path), "--captions", "prompts.txt",
            "--out", str(tmp_path / "eval")]
    assert main([*args, "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds an evaluation with other settings (steps 2 -> 3)" in err and err.count("\n") == 1, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    assert main([*args[:-1], str(tmp_path / "mine")]) == 2
    assert "holds files this command did not write (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"
    crashed = tmp_path / "crashed"  # killed while writing its settings: only the half-written temporary file
    crashed.mkdir()
    (crashed / ".settings.json.123-abcd1234.tmp").write_text('{"pretr')
    prepare_out_dir(crashed, settings)
    assert sorted(p.name for p in crashed.iterdir()) == [".lock", "settings.json"]



def lock_is_free(folder) -> bool:
    """Whether another process could take ``folder``'s lock now (a second open file description stands in for one)."""
    with open(folder / ".lock", "a+") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(other, fcntl.LOCK_UN)
        return True


def test_a_folder_another_evaluation_is_writing_is_refused_untouched(sd_dir, tmp_path, capsys):
    """One evaluation per ``--out``: while another holds the folder's lock, a second one is a one-line error that
    names the holder and the option, and leaves the running one's half-written file alone (it would have removed it
    as a killed run's leftover). The lock goes with the evaluation that took it, also when it fails."""
    settings = PaperEvalSettings(pretrained=str(sd_dir), lora=str(tmp_path), captions="prompts.txt", steps=2)
    out = tmp_path / "eval"
    prepare_out_dir(out, settings)
    release_output_dir(out)
    being_written = out / ".prompts.jsonl.99-abcd1234.tmp"
    being_written.write_text('{"index": 0')
    args = ["evaluate", "--pretrained", str(sd_dir), "--lora", str(tmp_path), "--captions", "prompts.txt",
            "--steps", "2", "--out", str(out)]
    with open(out / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.truncate(0)
        holder.write("12345")  # the holder's pid, as lock_output_dir writes it
        holder.flush()
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "in use by another run (pid 12345)" in err and "another --out" in err and err.count("\n") == 1, err
    assert being_written.read_text() == '{"index": 0'
    assert main([*args[:-4], "--steps", "3", "--out", str(out)]) == 2  # other settings: refused ...
    assert "other settings (steps 2 -> 3)" in capsys.readouterr().err
    assert lock_is_free(out) and not being_written.exists()  # ... after cleaning, and the lock is released


@pytest.mark.parametrize("extra, message", [
    (["--unet", "u", "--num-prompts", "1000000000"], "--num-prompts 1000000000 would sample 2,000,000,000 images"),
    (["--unet", "u", "--max-pairs", "1000000000"], "--max-pairs 1000000000 would score up to 1,000,000,000 pairs"),
    (["--unet", "u", "--num-draws", "65"], "--num-draws 65 would run 260 UNet passes per pair"),
    (["--unet", "u", "--steps", "0"], "invalid --steps 0: expected an integer >= 1"),
    (["--unet", "u", "--sample-batch", "65"], "--sample-batch 65 would sample 130 images at once"),
    ([], "pass exactly one tuned model: --lora DIR (a LoRA) or --unet"),
    (["--unet", "u", "--lora", "l"], "pass exactly one tuned model"),
    (["--unet", "u", "--per-caption", "3"], "--per-caption is the toy's"),
])
def test_arguments_out_of_bounds_are_one_line_errors(extra, message, tmp_path, capsys):
    args = ["evaluate", "--pretrained", "no/such-model", "--captions", "p.txt", "--out", str(tmp_path / "e"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()  # refused before anything is written
    assert main(["evaluate", "--pretrained", "no/such-model", "--unet", "u", "--out", str(tmp_path / "e")]) == 2
    assert "nothing to measure: pass --captions" in capsys.readouterr().err


def test_real_model_flags_without_pretrained_are_refused(capsys):
    assert main(["evaluate", "--lora", "runs/toy", "--unet", "u"]) == 2
    assert "--unet evaluate a real model: pass --pretrained" in capsys.readouterr().err
    assert main(["evaluate"]) == 2
    assert "pass --lora DIR" in capsys.readouterr().err


def test_read_log_drops_a_torn_last_line_and_refuses_a_damaged_middle_one(tmp_path):
    log = tmp_path / "prompts.jsonl"
    log.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "capt')
    assert read_log(log) == [{"index": 0}, {"index": 1}]
    assert log.read_text() == '{"index": 0}\n{"index": 1}\n'  # the next append starts a fresh line
    log.write_text('{"index": 0}\n{"ind\n{"index": 2}\n')
    with pytest.raises(DataError, match="prompts.jsonl line 2 is not JSON"):
        read_log(log)
    log.write_text('{"index": 0, "seed": 0}\n{"index": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="prompts.jsonl line 2 lacks seed"):
        read_log(log, ("index", "seed"))
    log.write_text('{"index": 0, "seed": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 lacks index, seed"):
        read_log(log, ("index", "seed"))


def test_captions_from_prompt_files_and_pickapic_datasets(tmp_path, pairs_parquet):
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\tNote\nA tree\tPlants\tBasic\t\n"
                                        "a cat on a mat\tAnimals\tBasic\t\nA tree\tPlants\tBasic\t\n")
    assert load_captions(str(tmp_path / "parti.tsv"), num_prompts=5) == ["A tree", "a cat on a mat"]
    (tmp_path / "hps.json").write_text(json.dumps(["an anime cat", "a photo of a dog", "a painting"]))
    assert load_captions(str(tmp_path / "hps.json"), num_prompts=2) == ["an anime cat", "a photo of a dog"]
    assert load_captions(str(prompt_file(tmp_path)), num_prompts=500) == CAPTIONS
    expected = list(dict.fromkeys(load_pickapic(str(pairs_parquet))["caption"]))  # first appearance order
    assert load_captions(str(pairs_parquet), "train", 3) == expected[:3]
    assert load_captions(str(pairs_parquet), "train", 3, streaming=True) == expected[:3]
    (tmp_path / "bad.tsv").write_text("Text2\tCategory\nx\ty\n")
    with pytest.raises(DataError, match="no prompt column"):
        load_captions(str(tmp_path / "bad.tsv"))


def test_accuracy_interval_is_the_win_rate_interval_of_the_per_pair_outcomes():
    from dpo_tutorial.evaluate import win_rate

    assert accuracy_interval(3, 4) == win_rate([0, 0, 0, 0], [1, 1, 1, -1])
    rate, low, high = accuracy_interval(60.5, 100)  # one exact tie among 100 pairs
    assert rate == pytest.approx(0.605) and low < rate < high
    outcomes = np.r_[np.ones(60), 0.5, np.zeros(39)]
    assert high - rate == pytest.approx(1.96 * outcomes.std(ddof=1) / 10)


def test_right_pairs_is_a_whole_or_half_count_whatever_the_float_rounding():
    assert float(np.float32(0.57)) * 100 < 57                          # the rounding that once cost a pair
    assert paper_eval.right_pairs(np.float32(0.57), 100) == 57.0
    assert paper_eval.right_pairs(np.float32(56.5 / 100), 100) == 56.5   # one exact tie
    assert accuracy_interval(paper_eval.right_pairs(np.float32(0.57), 100), 100) == win_rate(
        np.full(100, 0.5), np.r_[np.ones(57), np.zeros(43)])

