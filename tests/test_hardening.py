"""Issue 11: no code from checkpoints, no hangs on bad data, no torn files, honest resumes, one writer."""
import fcntl
import io
import json
import os
import signal
import sys
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_rows, solid, tiny_config
from dpo_tutorial import checkpoint as ckpt
from dpo_tutorial.cli import main
from dpo_tutorial.config import ConfigError
from dpo_tutorial.data import DataError, PairStream, PairTransform, SkipRow, decode_image, load_pickapic
from dpo_tutorial.pickapic import encode_image, pickapic_row, write_pickapic_parquet
from dpo_tutorial.run_dir import config_differences
from dpo_tutorial.run_dir import History
from dpo_tutorial.train import train


cfg = tiny_config


@contextmanager
def no_hang(seconds=30):
    """Turn a hang into a test failure."""
    def fail(*_):
        raise TimeoutError(f"hung for {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def red_blue():
    return encode_image(solid("red")), encode_image(solid("blue"))


def eps_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="EPS")
    return buf.getvalue()


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------- 1. security
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.slow
def test_checkpoint_holding_a_pickled_callable_is_refused_unexecuted(sd_dir, pairs_parquet, run_copy, tmp_path,
                                                                      capsys):
    marker = tmp_path / "pwned"
    torch.save({"rng": _Payload(marker), "data": {}}, run_copy / "checkpoint-3" / "process_0.pt")
    with pytest.raises(ckpt.CheckpointError, match="refusing checkpoint file"):
        ckpt.safe_load(run_copy / "checkpoint-3" / "process_0.pt")
    argv = ["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir", str(run_copy),
            "--resolution", "32", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-3", "--beta", "500",
            "--rank", "4", "--checkpoint-every", "1", "--no-sample-grid", "--seed", "0",
            "--lr-scheduler", "constant", "--lr-warmup-steps", "0", "--resume", str(run_copy / "checkpoint-3")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "refusing checkpoint file" in err[-1] and "Traceback" not in "".join(err)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 2-3. decoding
def test_only_jpeg_png_webp_are_opened(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*_, **__):
        raise AssertionError("the EPS decoder was started")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript)
    with pytest.raises(SkipRow) as info:
        decode_image(eps_bytes())
    assert info.value.reason == "undecodable"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buf, format="WEBP")
    assert decode_image(buf.getvalue()).size == (8, 8)


def test_extreme_aspect_ratio_is_skipped_before_any_resize(monkeypatch):
    data = png_bytes(1, 2_000_000)
    assert len(data) < 10_000
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized"))
    with pytest.raises(SkipRow) as info:
        decode_image(data)
    assert info.value.reason == "oversized"
    with pytest.raises(SkipRow):  # a PIL image handed over directly is checked too
        PairTransform(32).transform_image(Image.new("RGB", (1, 500)), 0.5, 0.5, False)


# -------------------------------------------------------------------- 4. no usable pair: no hang
def _stream_of(rows, streaming=False, tmp_path=None):
    path = write_pickapic_parquet(tmp_path / "d.parquet", rows)
    ds = load_pickapic(str(path), streaming=streaming)
    return PairStream(ds, PairTransform(32), batch_size=2)


@pytest.mark.parametrize("kind,message", [
    ("corrupt", "0 of 6 rows usable: 6 undecodable"),
    ("eps", "0 of 6 rows usable: 6 undecodable"),
    ("missing", "0 of 6 rows usable: 6 missing_image"),
    ("oversized", "0 of 6 rows usable: 6 oversized"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_no_usable_pair_raises_with_counts_by_cause(kind, message, streaming, tmp_path):
    red, _ = red_blue()
    bad = {"corrupt": b"\xff\xd8\xff\xe0 not a jpeg", "eps": eps_bytes(), "missing": None,
           "oversized": png_bytes(1, 4000)}[kind]
    rows = [pickapic_row("a red square", red, bad, float(i % 2), i) for i in range(6)]
    stream = _stream_of(rows, streaming, tmp_path)
    with no_hang(), pytest.raises(DataError, match=message):
        next(iter(stream))


def test_unparseable_streamed_labels_raise_instead_of_hanging():
    import datasets

    red, blue = red_blue()
    rows = [{"caption": "a", "jpg_0": red, "jpg_1": blue, "label_0": "yes"} for _ in range(4)]
    ds = datasets.Dataset.from_list(rows).to_iterable_dataset()
    with no_hang(), pytest.raises(DataError, match="0 of 4 rows usable: 4 invalid"):
        next(iter(PairStream(ds, PairTransform(32), batch_size=1)))


def test_a_bug_in_a_row_is_not_counted_as_a_bad_row(pairs_parquet):
    def buggy(row, rng):
        raise ValueError("a real bug")

    stream = PairStream(load_pickapic(str(pairs_parquet)), PairTransform(32), batch_size=1, make=buggy)
    with pytest.raises(ValueError, match="a real bug"):
        next(iter(stream))


# ------------------------------------------------------------------- 5. one-line user errors
def _table(path, **columns):
    pq.write_table(pa.table(columns), str(path))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model starts loading: every error below must come first."""
    monkeypatch.setattr(sys.modules["dpo_tutorial.train"], "load_parts", lambda *a, **k: pytest.fail("a model was loaded"))


def _bad_dataset(kind, tmp_path):
    red, blue = red_blue()
    if kind == "string_label":
        return _table(tmp_path / "d.parquet", caption=["a"], jpg_0=[red], jpg_1=[blue], label_0=["yes"])
    if kind == "int_caption":
        return _table(tmp_path / "d.parquet", caption=[3], jpg_0=[red], jpg_1=[blue], label_0=[1.0])
    if kind == "string_images":
        return _table(tmp_path / "d.parquet", caption=["a"], jpg_0=["x"], jpg_1=["y"], label_0=[1.0])
    if kind == "zero_rows":
        return write_pickapic_parquet(tmp_path / "d.parquet", [])
    if kind == "text_file":
        (tmp_path / "d.parquet").write_text("caption,label_0\na,1\n")
        return tmp_path / "d.parquet"
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_pickapic_parquet(folder / "train-0.parquet", make_rows(2))
    _table(folder / "train-1.parquet", caption=["a"], jpg_0=[red], jpg_1=[blue], label_0=[1])
    return folder


@pytest.mark.parametrize("kind,message", [
    ("string_label", "label_0 is string"), ("int_caption", "caption is int64"),
    ("string_images", "jpg_0 is string"), ("zero_rows", "0 rows"),
    ("text_file", "is not a readable parquet file"), ("mixed", "have different schemas"),
])
def test_bad_datasets_are_one_line_errors_before_any_model(kind, message, sd_dir, tmp_path, capsys, no_model_load):
    data = _bad_dataset(kind, tmp_path)
    argv = ["train", "--pretrained", str(sd_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "o"),
            "--resolution", "32", "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("dpo-tutorial train: error:")


@pytest.mark.parametrize("flags,message", [
    (["--beta", "nan"], "invalid beta=nan"), (["--beta", "inf"], "invalid beta=inf"),
    (["--lr", "inf"], "invalid lr=inf"), (["--weight-decay", "nan"], "invalid weight_decay=nan"),
    (["--guidance-scale", "inf"], "invalid guidance_scale=inf"), (["--sample-steps", "0"], "invalid sample_steps=0"),
    (["--output-dir", "FILE"], "is a file"), (["--output-dir", "FILE/sub"], "is not writable"),
])
def test_bad_settings_are_one_line_errors_before_any_model(flags, message, sd_dir, pairs_parquet, tmp_path, capsys,
                                                           no_model_load):
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    argv = ["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir",
            str(tmp_path / "o"), "--resolution", "32", "--max-steps", "1", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_is_one_line(sd_dir, pairs_parquet, tmp_path, capsys, no_model_load):
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    assert main(["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir", str(out),
                 "--resolution", "32", "--max-steps", "1"]) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-draws", "--per-caption"])
def test_evaluate_rejects_zero_counts(flag, tmp_path, capsys):
    assert main(["evaluate", "--lora", str(tmp_path), flag, "0"]) == 2
    assert f"invalid {flag} 0: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_rejects_a_lora_of_another_model(sd_dir, tmp_path, capsys):
    from dpo_tutorial.models import add_lora, load_parts
    from dpo_tutorial.models import export_lora

    parts = load_parts(str(sd_dir))  # the test fixture's tiny SD, not the toy pipeline evaluate uses
    add_lora(parts.unet, 4)
    export_lora(parts.unet, tmp_path, False)
    assert main(["evaluate", "--lora", str(tmp_path), "--per-caption", "1", "--num-draws", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not fit" in err[-1] and "Traceback" not in "".join(err)


# --------------------------------------------------------------------------- 6. torn history
@pytest.mark.slow
@pytest.mark.parametrize("tail", ['{"step": 4, "loss": 0.6', "\x00" * 40])
def test_torn_last_history_line_is_dropped(tail, sd_dir, pairs_parquet, run_copy, tmp_path):
    with open(run_copy / "history.jsonl", "a") as fh:
        fh.write(tail)
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        assert [r["step"] for r in History.load(run_copy).records] == [1, 2, 3]
    if tail.startswith("{"):  # the folder resumes...
        resumed = train(cfg(sd_dir, pairs_parquet, run_copy, max_steps=4, resume="latest"))
        assert [r["step"] for r in resumed.records] == [1, 2, 3, 4]
        assert [r["step"] for r in History.load(run_copy).records] == [1, 2, 3, 4]
    else:  # ...and a fresh run into a folder holding only a torn history starts
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / ".dpo-tutorial").write_text("run\n")  # a run of ours, killed before its first checkpoint
        (fresh / "history.jsonl").write_text('{"step": 1}\n' + tail)
        assert [r["step"] for r in train(cfg(sd_dir, pairs_parquet, fresh, max_steps=1)).records] == [1]


# ---------------------------------------------------------------------- 7. checkpoint integrity
@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_damaged_chosen_one_is_refused(sd_dir, pairs_parquet, run_copy):
    weights = load_file(str(run_copy / "checkpoint-2" / "trainable.safetensors"))
    save_file({}, str(run_copy / "checkpoint-3" / "trainable.safetensors"))  # valid but empty
    half = dict(list(weights.items())[: len(weights) // 2])
    save_file(half, str(run_copy / "checkpoint-2" / "trainable.safetensors"))  # valid but half-filled
    data = (run_copy / "checkpoint-1" / "trainable.safetensors").read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        train(cfg(sd_dir, pairs_parquet, run_copy, max_steps=3, resume=str(run_copy / "checkpoint-2")))
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        resumed = train(cfg(sd_dir, pairs_parquet, run_copy, max_steps=3, checkpoint_every=1, resume="latest"))
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    (run_copy / "checkpoint-1" / "trainable.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        train(cfg(sd_dir, pairs_parquet, run_copy, max_steps=3, resume=str(run_copy / "checkpoint-1")))


def test_cut_lora_export_never_looks_finished(sd_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from dpo_tutorial.models import add_lora, load_parts
    from dpo_tutorial.models import export_lora

    parts = load_parts(str(sd_dir))
    add_lora(parts.unet, 4)

    def cut(save_directory, **_):
        os.makedirs(save_directory, exist_ok=True)
        open(os.path.join(save_directory, "pytorch_lora_weights.safetensors"), "wb").write(b"half")
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", cut)
    with pytest.raises(KeyboardInterrupt):
        export_lora(parts.unet, tmp_path, False)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_cut_cache_build_never_looks_finished(sd_dir, pairs_parquet, tmp_path, monkeypatch):
    from dpo_tutorial import cache

    out = tmp_path / "cache"
    out.mkdir()
    (out / ".dpo-tutorial").write_text("cache\n")
    (out / "manifest.json").write_text(json.dumps({"version": cache.CACHE_VERSION}))  # an older build's
    calls = []

    def cut(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed while caching")
        return real(*args)

    real = cache.encode_rows
    monkeypatch.setattr(cache, "encode_rows", cut)
    config = cfg(sd_dir, pairs_parquet, tmp_path, random_flip=False)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(config, out, batch_size=4)
    with pytest.raises(DataError, match="not a latent cache"):
        cache.check_cache(out, config)


# ---------------------------------------------------------------------------- 8. honest resume
@pytest.mark.slow
def test_resume_refuses_other_settings_and_applies_allowed_ones(sd_dir, pairs_parquet, run_copy, tmp_path,
                                                                 monkeypatch):
    other = write_pickapic_parquet(tmp_path / "other.parquet", make_rows(4))
    with pytest.raises(ConfigError) as info:
        train(cfg(sd_dir, other, run_copy, max_steps=4, resume="latest", lr=1e-2, batch_size=4, seed=1))
    for field in ("lr: checkpoint 0.001 vs now 0.01", "batch_size", "seed", "dataset"):
        assert field in str(info.value)
    saved = json.loads((run_copy / "checkpoint-3" / "state.json").read_text())["config"]
    monkeypatch.chdir(sd_dir.parent)  # a relative path to the same folders is the same setting
    same = cfg(os.path.relpath(sd_dir), os.path.relpath(pairs_parquet), run_copy, max_steps=5)
    assert config_differences(saved, same) == []
    with pytest.warns(UserWarning, match="applied: max_steps: checkpoint 3 vs now 5"):
        resumed = train(same.replace(resume="latest", checkpoints_total_limit=1, checkpoint_every=1))
    assert [r["step"] for r in resumed.records] == [1, 2, 3, 4, 5]
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["checkpoint-5"]  # the new limit applied


@pytest.mark.slow
def test_resuming_an_older_checkpoint_abandons_the_newer_timeline(sd_dir, pairs_parquet, run_copy):
    first = History.load(run_copy).records
    train(cfg(sd_dir, pairs_parquet, run_copy, max_steps=2, resume=str(run_copy / "checkpoint-1")))
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["checkpoint-1", "checkpoint-2"]
    again = train(cfg(sd_dir, pairs_parquet, run_copy, max_steps=3, resume="latest"))
    assert [r["step"] for r in again.records] == [1, 2, 3]
    assert again.records[1]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)  # same run, continued


def test_grad_scaler_and_rng_states_round_trip(tmp_path):
    module = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    ckpt.save_checkpoint(tmp_path, 1, trainable=dict(module.named_parameters()), optimizer=opt, lr_scheduler=sched,
                         generator=gen, data_state={"epoch": 0, "position": 2}, extra={}, scaler=scaler)
    expected = (torch.rand(3), torch.rand(3, generator=gen))
    torch.rand(5)
    other = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    state = ckpt.load_checkpoint(tmp_path / "checkpoint-1", module, opt, sched, gen, scaler=other)
    assert other.get_scale() == 512.0 and state["data"]["position"] == 2
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=gen), expected[1])


@pytest.mark.slow
def test_non_finite_stop_names_the_lr_in_use_and_keeps_the_earlier_checkpoint(sd_dir, pairs_parquet, tmp_path):
    with pytest.raises(FloatingPointError, match=r"learning rate \(1e\+30 in use\)"):
        train(cfg(sd_dir, pairs_parquet, tmp_path, max_steps=6, lr=1e30, max_grad_norm=0, max_nonfinite_steps=2,
                  checkpoint_every=1, checkpoints_total_limit=1))
    records = History.load(tmp_path).records
    last_good = max(r["step"] for r in records if not r["skipped_update"])
    assert (tmp_path / f"checkpoint-{last_good}").exists()


# ------------------------------------------------------------------------------- 9. one writer
def test_a_second_writer_is_refused_at_once(sd_dir, pairs_parquet, tmp_path, no_model_load):
    with open(tmp_path / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("12345")
        holder.flush()
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 12345\)"):
            train(cfg(sd_dir, pairs_parquet, tmp_path))
    assert not (tmp_path / "history.jsonl").exists()
