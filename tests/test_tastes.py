"""Notebook 08's parts: the taste scorers on images with known answers, the scripted labeller, the label file
(Pick-a-Pic schema, resumes after a restart), the widget's callback and the run folder guard."""
import numpy as np
import pytest

from dpo_tutorial.data import load_pickapic
from dpo_tutorial.toy import world
from dpo_tutorial.toy.labelling import CandidatePairs, LabelStore, LabellingWidget, label_with_script
from dpo_tutorial.toy.tastes import brightness_score, get_taste, left_score, scripted_labels, size_score


def canvas(n: int = 1) -> np.ndarray:
    """``n`` empty 32x32 images of the world's background colour."""
    return np.broadcast_to(np.array(world.BACKGROUND, np.uint8), (n, 32, 32, 3)).copy()


def square(x0: int, y0: int, side: int, colour=(230, 30, 30)) -> np.ndarray:
    img = canvas()
    img[0, y0:y0 + side, x0:x0 + side] = colour
    return img


def test_scorers_measure_what_they_say():
    assert size_score(square(4, 4, 8))[0] == pytest.approx(64 / 1024)
    assert size_score(square(4, 4, 16))[0] == pytest.approx(256 / 1024)
    # a 4-wide square whose columns are 2..5 has its centre at 4.0 px: 1 - 4/32
    assert left_score(square(2, 10, 4))[0] == pytest.approx(1 - 4 / 32)
    assert left_score(square(24, 10, 4))[0] == pytest.approx(1 - 26 / 32)
    yellow, blue = square(8, 8, 8, world.COLOURS["yellow"]), square(8, 8, 8, world.COLOURS["blue"])
    assert brightness_score(yellow)[0] == pytest.approx((0.299 * 240 + 0.587 * 220 + 0.114 * 30) / 255)
    assert brightness_score(yellow)[0] > brightness_score(blue)[0]
    empty = canvas()  # no shape: size 0, centred, dark
    assert (size_score(empty)[0], left_score(empty)[0], brightness_score(empty)[0]) == (0.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="unknown taste 'rounder'; expected one of bigger, left, brighter"):
        get_taste("rounder")


def test_scripted_labels_follow_the_scorer_and_flip_the_asked_share():
    rng = np.random.default_rng(0)
    img0 = np.concatenate([square(int(x), 10, 4) for x in rng.integers(0, 28, 400)])
    img1 = np.concatenate([square(int(x), 10, 4) for x in rng.integers(0, 28, 400)])
    truth = np.where(left_score(img0) > left_score(img1), 1.0, 0.0)
    ties = left_score(img0) == left_score(img1)
    truth[ties] = 0.5
    clean = scripted_labels("left", img0, img1, 0.0, np.random.default_rng(1))
    np.testing.assert_array_equal(clean, truth)
    assert (scripted_labels("left", img0, img1, 1.0, np.random.default_rng(1))[~ties] == 1 - truth[~ties]).all()
    noisy = scripted_labels("left", img0, img1, 0.1, np.random.default_rng(1))
    flipped = (noisy != truth).mean()
    assert 0.05 < flipped < 0.15 and (noisy[ties] == 0.5).all()  # ~10% of ~370 decided pairs, ties kept
    with pytest.raises(ValueError, match="noise must be a fraction"):
        scripted_labels("left", img0, img1, 1.5, rng)


def make_pairs(n: int = 6) -> CandidatePairs:
    rng = np.random.default_rng(0)
    caps = world.all_captions()[:n]
    img0 = np.stack([world.render(*world.parse_caption(c), rng) for c in caps])
    img1 = np.stack([world.render(*world.parse_caption(c), rng) for c in caps])
    return CandidatePairs(caps, img0, img1)


def test_label_store_writes_pickapic_and_resumes_after_a_restart(tmp_path):
    pairs = make_pairs()
    store = LabelStore(tmp_path / "labels", pairs)
    for choice in ("left", "right", "skip"):
        store.record(choice)
    again = LabelStore(tmp_path / "labels", pairs)  # a restarted kernel
    assert again.shown == 3 and again.progress() == "3 / 6 shown, 2 labelled"
    again.record("tie")
    rows = load_pickapic(str(tmp_path / "labels"), "train")  # what training reads
    assert rows["label_0"] == [1.0, 0.0, 0.5] and rows["caption"] == [pairs.captions[i] for i in (0, 1, 3)]
    assert rows["best_image_uid"][0] == rows["image_0_uid"][0] and rows["best_image_uid"][2] == ""
    with pytest.raises(ValueError, match="holds labels of 6 candidate pairs, these are 5"):
        LabelStore(tmp_path / "labels", make_pairs(5))
    with pytest.raises(ValueError, match="choice must be one of left, right, tie, skip"):
        again.record("up")


def test_scripted_labeller_clicks_through_the_widget(tmp_path):
    pairs = make_pairs()
    store = LabelStore(tmp_path / "labels", pairs)
    widget = LabellingWidget(store, "click the image whose shape sits further LEFT")
    assert "pair 1" in widget.caption.value and widget.images[0].value[:4] == b"\x89PNG"
    clicks = []
    label_with_script(store, "left", 0.0, limit=2, callback=lambda c: (clicks.append(c), widget.choose(c)))
    assert store.shown == 2 and "pair 3" in widget.caption.value and "2 / 6 shown" in widget.status.value
    widget.buttons[3].click()  # "skip", as a click on the button
    assert store.shown == 3 and len(store.rows) == 2
    label_with_script(store, "left", 0.0, callback=widget.choose)
    assert store.done and all(b.disabled for b in widget.buttons) and len(store.rows) == 5
    expected = scripted_labels("left", pairs.img0, pairs.img1, 0.0, np.random.default_rng(0))
    assert [{"left": 1.0, "right": 0.0, "tie": 0.5}[c] for c in clicks] == list(expected[:2])
    with pytest.raises(IndexError, match="all 6 pairs are labelled already"):
        store.record("left")


def test_train_on_labels_never_empties_a_folder_that_is_not_a_run(tmp_path):
    """A folder of the user's is refused; a run folder interrupted before its first step (marker and lock, no
    config.json yet) is the package's and is replaced (it used to be refused as "holds no run")."""
    from dpo_tutorial import files
    from dpo_tutorial.data import DataError
    from dpo_tutorial.toy.your_taste import train_on_labels

    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holds no dpo-tutorial run"):
        train_on_labels(tmp_path / "labels", keep)
    assert (keep / "holiday.jpg").exists()
    interrupted = files.claim_folder(tmp_path / "run", "run")
    (interrupted / ".lock").write_text("")
    with pytest.raises(DataError, match="does not exist"):   # removed, then the missing labels are refused
        train_on_labels(tmp_path / "no-labels", interrupted)
    assert not (interrupted / ".lock").exists()


@pytest.mark.slow
def test_labels_curve_samples_the_base_model_once_and_gets_what_fresh_measurements_get(tmp_path, monkeypatch):
    """The model without a LoRA is the same for every label count, so its images are sampled once and reused
    (notebook 08 used to sample them again for each run); a reused base gives exactly the numbers of a fresh one."""
    from dpo_tutorial.sample import load_pipeline
    from dpo_tutorial.toy import PIPELINE_DIR, your_taste
    from dpo_tutorial.toy.labelling import candidate_pairs

    store = LabelStore(tmp_path / "labels", candidate_pairs(load_pipeline(PIPELINE_DIR), 4, seed=0))
    label_with_script(store, "left", 0.0, 0)
    calls = []
    measure = your_taste.measure_shift

    def spy(*args, **kwargs):
        calls.append((kwargs.get("base"), measure(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(your_taste, "measure_shift", spy)
    rows = your_taste.labels_curve(store.folder, [2, 4], tmp_path / "curve", "left", per_caption=1, max_steps=2,
                                   batch_size=2, lr_warmup_steps=1)
    (base_given_first, first), (base_given_second, second) = calls
    assert base_given_first is None and base_given_second is first
    assert second.base_images is first.base_images and second.base_scores is first.base_scores  # not sampled again
    fresh = measure(tmp_path / "curve" / "run-4", "left", per_caption=1)
    np.testing.assert_array_equal(fresh.base_images, second.base_images)
    np.testing.assert_array_equal(fresh.dpo_images, second.dpo_images)
    assert (fresh.win_rate, fresh.judge_base, fresh.judge_dpo) == (second.win_rate, second.judge_base, second.judge_dpo)
    assert rows[1]["win_rate"] == fresh.win_rate[0]
    with pytest.raises(ValueError, match="expected the same"):
        measure(tmp_path / "curve" / "run-4", "left", per_caption=2, base=first)
