"""Notebook 08's label store under damage (docs/THREAT_MODEL.md, "Notebook 08's label store"): a saved label is
never lost, ``progress.json`` is checked against the labels, every write is atomic, a wrong folder is one line."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_tastes import make_pairs

from dpo_tutorial import pickapic
from dpo_tutorial.data import load_pickapic
from dpo_tutorial.toy import labelling
from dpo_tutorial.toy.labelling import LabelStore


def labelled(folder, clicks=("left", "right", "tie", "left"), n_pairs=6) -> LabelStore:
    store = LabelStore(folder, make_pairs(n_pairs))
    for choice in clicks:
        store.record(choice)
    return store


def saved_ids(folder) -> list[int]:
    """The pair index of every row of ``folder/train.parquet``, in file order."""
    return pq.read_table(folder / "train.parquet", columns=["ranking_id"]).column("ranking_id").to_pylist()


@pytest.mark.parametrize("damage,warning", [
    ("missing", "progress.json is missing"),
    ('{"pairs": 6, "sho', "progress.json is unreadable (JSONDecodeError)"),
    ('{"pairs": 6}', 'progress.json is incomplete (expected {"pairs": 6, "shown": <an integer>})'),
    ('[6, 4]', "progress.json is incomplete"),
    (b"\xff\xfe\x00garbage", "progress.json is unreadable (UnicodeDecodeError)"),
    ('{"pairs": 6, "shown": -3}', "progress.json says -3 pairs shown where the labels need 4 to 6"),
    ('{"pairs": 6, "shown": 1}', "progress.json says 1 pairs shown where the labels need 4 to 6"),
    ('{"pairs": 6, "shown": 9}', "progress.json says 9 pairs shown where the labels need 4 to 6"),
    ('{"pairs": 6, "shown": 4.0}', "progress.json is incomplete"),
])
def test_a_damaged_progress_file_is_a_warning_and_the_labels_decide(damage, warning, tmp_path):
    folder = tmp_path / "labels"
    labelled(folder)
    progress = folder / "progress.json"
    if damage == "missing":
        progress.unlink()
    else:
        progress.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    with pytest.warns(UserWarning, match="resuming from the 4 saved labels, at pair 5") as caught:
        store = LabelStore(folder, make_pairs())
    assert warning in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert store.shown == 4 and store.progress() == "4 / 6 shown, 4 labelled"
    store.record("right")  # the next click labels the next pair: nothing lost, nothing twice
    assert saved_ids(folder) == [0, 1, 2, 3, 4]
    assert json.loads(progress.read_text()) == {"pairs": 6, "shown": 5}


def test_progress_ahead_of_the_labels_keeps_the_skips(tmp_path):
    folder = tmp_path / "labels"
    labelled(folder, ("left", "skip", "skip"))
    store = LabelStore(folder, make_pairs())  # no warning: 3 shown, 1 labelled agrees with the labels
    assert store.shown == 3 and store.progress() == "3 / 6 shown, 1 labelled"


def test_train_parquet_is_complete_pickapic_after_every_click(tmp_path):
    folder = tmp_path / "labels"
    store = LabelStore(folder, make_pairs())
    for k, choice in enumerate(["left", "skip", "right", "tie", "skip", "left"]):
        store.record(choice)
        if k == 0 or store.rows != []:
            rows = load_pickapic(str(folder), "train")  # what `dpo-tutorial train --dataset <folder>` reads
            assert rows.features.arrow_schema.names == pickapic.pickapic_arrow_schema().names
            assert rows["ranking_id"] == [r["ranking_id"] for r in store.rows]
    assert saved_ids(folder) == [0, 2, 3, 5] and list(store.labels()) == [1.0, 0.0, 0.5, 1.0]
    assert sorted(p.name for p in folder.iterdir()) == ["progress.json", "train.parquet"]  # no temporary file left


def test_a_write_cut_by_a_crash_leaves_the_labels_before_it(tmp_path, monkeypatch):
    folder = tmp_path / "labels"
    store = labelled(folder, ("left", "right"))
    before = (folder / "train.parquet").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", disk_full)  # the new file never takes the old one's place
    with pytest.raises(OSError, match="No space left"):
        store.record("tie")
    monkeypatch.undo()
    assert (folder / "train.parquet").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["progress.json", "train.parquet"]
    again = LabelStore(folder, make_pairs())  # a restart: the two labels, the third pair next
    assert again.progress() == "2 / 6 shown, 2 labelled"


def test_a_crash_between_the_label_and_the_progress_file_resumes_after_the_label(tmp_path):
    folder = tmp_path / "labels"
    store = labelled(folder, ("left", "right"))
    progress = (folder / "progress.json").read_bytes()
    store.record("tie")
    (folder / "progress.json").write_bytes(progress)  # the disk as a crash right after the label leaves it
    with pytest.warns(UserWarning, match="says 2 pairs shown where the labels need 3 to 6"):
        again = LabelStore(folder, make_pairs())
    assert again.shown == 3
    again.record("left")
    assert saved_ids(folder) == [0, 1, 2, 3]  # pair 3 (index 2) once, not twice


def test_a_second_store_on_the_folder_never_shortens_the_labels(tmp_path):
    folder = tmp_path / "labels"
    first = labelled(folder, ("left", "right"))
    second = LabelStore(folder, make_pairs())  # e.g. the cell re-run while the old widget lives on
    second.record("tie")
    second.record("left")
    with pytest.raises(ValueError, match="gained 2 label.s. from another LabelStore") as err:
        first.record("right")  # first still shows pair 3, which second labelled meanwhile
    assert isinstance(err.value, labelling.LabelFolderError)
    assert "this choice was not saved" in str(err.value) and "continues at pair 5" in str(err.value)
    assert saved_ids(folder) == [0, 1, 2, 3] and first.shown == 4 and len(first.rows) == 4
    first.record("right")
    assert saved_ids(folder) == [0, 1, 2, 3, 4]


def test_a_label_file_replaced_by_a_shorter_one_is_not_overwritten(tmp_path):
    folder = tmp_path / "labels"
    store = labelled(folder)
    older = pq.read_table(folder / "train.parquet").slice(0, 2)  # e.g. a backup copied back over it
    pq.write_table(older, folder / "train.parquet")
    with pytest.raises(ValueError, match="no longer holds the 4 labels this store saved .2 labels.") as err:
        store.record("left")
    assert saved_ids(folder) == [0, 1] and isinstance(err.value, labelling.LabelFolderError)


def test_a_folder_for_another_number_of_pairs_is_one_line_naming_both(tmp_path):
    folder = tmp_path / "labels"
    labelled(folder)
    with pytest.raises(ValueError) as err:
        LabelStore(folder, make_pairs(5))
    message = str(err.value)
    assert message.startswith(f"{folder} holds labels of 6 candidate pairs, these are 5: label these into another "
                              "folder (one per n_pairs), or make 6 candidate pairs again")
    assert isinstance(err.value, labelling.LabelFolderError) and "\n" not in message
    (folder / "progress.json").unlink()  # without the pair count, the labels still tell
    with pytest.raises(ValueError, match="holds labels of at least 4 candidate pairs, these are 3"):
        LabelStore(folder, make_pairs(3))


def test_a_folder_labelled_on_other_pairs_is_refused(tmp_path):
    folder = tmp_path / "labels"
    labelled(folder)
    pairs = make_pairs()
    pairs.captions = pairs.captions[::-1]  # same count, other pairs (another seed)
    with pytest.raises(ValueError, match="holds labels of other candidate pairs .pair 1 is") as err:
        LabelStore(folder, pairs)
    assert isinstance(err.value, labelling.LabelFolderError)


def test_an_unreadable_label_file_is_one_line(tmp_path):
    folder = tmp_path / "labels"
    labelled(folder)
    data = (folder / "train.parquet").read_bytes()
    (folder / "train.parquet").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(ValueError, match="train.parquet is not a readable label file") as err:
        LabelStore(folder, make_pairs())
    assert isinstance(err.value, labelling.LabelFolderError)
    assert "move it away to label from the first pair" in str(err.value) and "\n" not in str(err.value)


def test_labels_and_progress_match_a_fresh_store_after_a_full_pass(tmp_path):
    folder = tmp_path / "labels"
    store = LabelStore(folder, make_pairs())
    labelling.label_with_script(store, "left", 0.0)
    expected = labelling.scripted_labels("left", store.pairs.img0, store.pairs.img1, 0.0, np.random.default_rng(0))
    again = LabelStore(folder, make_pairs())
    assert again.done and list(again.labels()) == list(expected) and saved_ids(folder) == list(range(6))
