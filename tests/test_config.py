"""Config validation, presets and the CLI flag set."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from dpo_tutorial.cli import build_parser
from dpo_tutorial.config import PRESET_NAMES, ConfigError, TrainConfig, get_preset


@pytest.mark.parametrize("field,value,message", [
    ("resolution", 100, "resolution=100: expected a positive multiple of 8"),
    ("beta", 0.0, "beta=0.0: expected a finite number > 0"),
    ("batch_size", 0, "batch_size=0: expected an integer >= 1"),
    ("loss_type", "dpo", "loss_type='dpo'"),
    ("empty_prompt_prob", 1.5, "empty_prompt_prob=1.5"),
    ("mixed_precision", "fp8", "mixed_precision='fp8'"),
])
def test_invalid_values_name_field_and_expectation(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_preset("sd15", **{field: value})


def test_presets_are_valid_and_follow_the_public_recipes():
    assert PRESET_NAMES == ("toy", "sd15", "sdxl")
    for name in PRESET_NAMES:
        get_preset(name).validate()  # raises ConfigError on any invalid field
    toy = get_preset("toy")
    assert toy.resolution == 32 and toy.heldout_split == "validation" and toy.output_dir == "runs/toy"
    sd15, sdxl = get_preset("sd15"), get_preset("sdxl")
    assert sd15.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd15.resolution == 512
    assert sdxl.resolution == 1024 and sdxl.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert sd15.beta == 5000.0  # = the diffusers SD script's beta_dpo 2500
    with pytest.raises(ConfigError, match="unknown preset 'sd3'"):
        get_preset("sd3")
    with pytest.raises(ConfigError, match="unknown config field"):
        get_preset("toy", betta=1.0)


def _flag_value(f: dataclasses.Field):
    """A value for field ``f`` that differs from the toy preset's, as it is typed on the command line."""
    current = getattr(get_preset("toy"), f.name)
    if isinstance(current, bool) or f.type in ("bool", bool):
        return ["--no-" if current else "--"], (not current)
    if f.name in ("loss_type", "mixed_precision", "lr_scheduler", "prediction_type", "report_to"):
        value = {"loss_type": "hinge", "mixed_precision": "bf16", "lr_scheduler": "linear",
                 "prediction_type": "v_prediction", "report_to": "tensorboard"}[f.name]
        return ["--", value], value
    if f.name == "resolution":
        return ["--", "48"], 48
    if "int" in str(f.type):
        return ["--", "7"], 7
    if "float" in str(f.type):
        return ["--", "0.25"], 0.25
    return ["--", "x/y"], "x/y"


def test_every_config_field_is_a_flag_that_reaches_the_config():
    """Each generated flag, given on the command line, lands in its own field and nowhere else."""
    from dpo_tutorial.cli import config_from_args

    parser = build_parser()
    toy = get_preset("toy")
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        (prefix, *rest), expected = _flag_value(f)
        argv = ["train", prefix + f.name.replace("_", "-"), *rest]
        args = parser.parse_args(argv)
        try:
            config = config_from_args(args)
        except ConfigError:  # a value some cross-field rule refuses: the flag still reached the field
            assert getattr(args, f.name) == expected, f.name
            continue
        assert getattr(config, f.name) == expected, f.name
        others = [g.name for g in dataclasses.fields(TrainConfig)
                  if g.name != f.name and getattr(config, g.name) != getattr(toy, g.name)]
        assert others == [], (f.name, others)


def _flag_help(argv: list[str], flag: str) -> str:
    """The help text of ``flag`` in ``dpo-tutorial <argv> --help``, parsed the way ``main`` parses it."""
    from dpo_tutorial.cli import chosen_preset

    parser = build_parser(chosen_preset(argv))
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    action = next(a for a in sub._actions if flag in a.option_strings)
    return action.help % {}


@pytest.mark.parametrize("argv,preset", [(["train"], "toy"), (["train", "--preset", "sd15"], "sd15"),
                                         (["train", "--preset=sdxl"], "sdxl"), (["cache", "--preset", "sd15"], "sd15")])
def test_help_shows_the_values_the_chosen_preset_runs(argv, preset):
    values = get_preset(preset)
    assert _flag_help(argv, "--beta").endswith(f"({preset} preset: {values.beta!r})")
    assert _flag_help(argv, "--lr").endswith(f"({preset} preset: {values.lr!r})")
    assert _flag_help(argv, "--lora-alpha") == f"LoRA alpha ({preset} preset: equal to rank)"
    assert "else" not in _flag_help(argv, "--max-steps")


def test_cli_bad_flag_value_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "dpo_tutorial.cli", "train", "--resolution", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: invalid resolution=100" in proc.stderr and "Traceback" not in proc.stderr


def test_notebook_settings_read_preset_and_overrides_from_the_environment(monkeypatch):
    from dpo_tutorial.config import ConfigError
    from dpo_tutorial.notebook_env import notebook_config, notebook_preset, pickscore_source

    monkeypatch.delenv("DPO_TUTORIAL_PRESET", raising=False)
    monkeypatch.delenv("DPO_TUTORIAL_OVERRIDES", raising=False)
    monkeypatch.delenv("DPO_TUTORIAL_PICKSCORE", raising=False)
    assert notebook_preset() == ("sd15" if torch.cuda.is_available() else "toy")
    assert pickscore_source() == {"model": "yuvalkirstain/PickScore_v1",
                                  "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
    monkeypatch.setenv("DPO_TUTORIAL_PRESET", "sd15")
    monkeypatch.setenv("DPO_TUTORIAL_OVERRIDES", '{"pretrained": "/data/sd15", "max_steps": 7}')
    cfg = notebook_config(max_steps=3, output_dir="/tmp/x")
    assert (cfg.pretrained, cfg.max_steps, cfg.output_dir, cfg.beta) == ("/data/sd15", 3, "/tmp/x", 5000.0)
    monkeypatch.setenv("DPO_TUTORIAL_PICKSCORE", "/data/ps")
    assert pickscore_source() == {"model": "/data/ps", "processor": "/data/ps"}
    monkeypatch.setenv("DPO_TUTORIAL_OVERRIDES", "{not json")
    with pytest.raises(ConfigError, match="DPO_TUTORIAL_OVERRIDES is not valid JSON"):
        notebook_config()
    monkeypatch.setenv("DPO_TUTORIAL_OVERRIDES", '{"no_such_field": 1}')
    with pytest.raises(ConfigError, match="no_such_field"):
        notebook_config()
    for name in ("sd3", "sdxl"):
        monkeypatch.setenv("DPO_TUTORIAL_PRESET", name)
        with pytest.raises(ConfigError, match=f"DPO_TUTORIAL_PRESET='{name}' is not a notebook preset"):
            notebook_preset()


@pytest.mark.parametrize("value, expected", [("3", 3), ("4,2", 4), ("", None), ("auto", None), ("0", None)])
def test_threads_per_process_reads_omp_num_threads_and_ignores_what_is_not_a_count(value, expected, monkeypatch):
    """A nested setting such as "4,2" once raised a bare ValueError traceback."""
    from dpo_tutorial.threads import threads_per_process

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    cores = max(1, (os.cpu_count() or 1) // 2)
    assert threads_per_process(None, world_size=2) == (expected or cores)
    assert threads_per_process(5, world_size=2) == 5
