"""spec.yaml → nn.Module: the grammar, the allow-list, and bad specs (fuzzed)."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ghnq.data import load_eval_images, to_float
from ghnq.sampler import SPACES, SamplerConfig, sample_spec, spec_hash, spec_macs, spec_summary
from ghnq.spec import (
    TORCHVISION_BUILDERS,
    SpecError,
    build_model,
    load_spec,
    parse_spec,
    summarize,
    validate_spec,
)

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    images, _, _ = load_eval_images(8, quiet=True)
    return to_float(images)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_example_specs_build_and_run(path: Path, batch: torch.Tensor) -> None:
    spec = load_spec(path)
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (len(batch), spec["num_classes"])
    assert torch.isfinite(out).all()


def test_required_examples_present() -> None:
    names = {load_spec(p)["name"] for p in SPECS}
    assert {"tiny-mbv2", "resnet20", "sepnet", "mobilenet_v3_small"} <= names


@pytest.mark.parametrize("builder", sorted(TORCHVISION_BUILDERS))
def test_allow_listed_torchvision_builders_run(builder: str, batch: torch.Tensor) -> None:
    spec = parse_spec(f"model: torchvision.models.{builder}\nnum_classes: 10\n", source="tv.yaml")
    model = build_model(spec).eval()
    with torch.no_grad():
        assert model(batch[:2]).shape == (2, 10)


def test_resnet20_shape_matches_the_paper() -> None:
    s = summarize(build_model(load_spec(ROOT / "specs" / "resnet20.yaml")), [3, 32, 32])
    assert s["layers"] == 22  # 19 convs + 2 projection shortcuts + classifier
    assert 0.26e6 < s["params"] < 0.29e6  # He et al.: 0.27 M


def test_every_block_kind_and_option_builds(batch: torch.Tensor) -> None:
    text = """
name: all-blocks
input: [3, 32, 32]
num_classes: 7
stem: {out: 8, kernel: 5, stride: 2, act: hardswish}
stages:
  - {block: conv, out: 8, kernel: 1, act: none}
  - {block: sep, out: 16, kernel: 7, stride: 2, act: relu6}
  - {block: mbconv, out: 16, kernel: 5, expand: 3, se: true, act: hardswish, repeat: 2}
  - {block: basic, out: 24, kernel: 5, stride: 2, act: mish}
  - {block: bottleneck, out: 32, expand: 0.5, stride: 1, repeat: 2}
  - {block: mbconv, out: 24, kernel: 3, expand: 4, se: true, gate: sigmoid, act: silu}
  - {block: bottleneck, out: 40, expand: 0.5, group_width: 8, act: gelu}
  - {block: shuffle, out: 48, kernel: 5, stride: 2, repeat: 2}
  - {block: shuffle, out: 32, act: hardswish}
head: {hidden: 32, dropout: 0.2}
"""
    model = build_model(parse_spec(text)).eval()
    with torch.no_grad():
        assert model(batch[:2]).shape == (2, 7)
    kinds = {type(m) for m in model.modules()}
    assert {nn.SiLU, nn.GELU, nn.Mish, nn.Sigmoid, nn.Hardsigmoid} <= kinds
    gelu = next(m for m in model.modules() if isinstance(m, nn.GELU))
    assert gelu.approximate == "none"  # the erf form: the only GELU the exporters take
    units = [m for m in model.modules() if type(m).__name__ == "ShuffleBlock"]
    assert [u.split for u in units] == [False, True, False]  # downsample; pass half through; width change


def test_grouped_bottleneck_rounds_its_width_to_whole_groups() -> None:
    """group_width: the k×k conv has mid / group_width groups; mid is rounded to a multiple (RegNet's rule)."""
    spec = parse_spec("stages: [{block: bottleneck, out: 52, expand: 0.5, group_width: 8}]")
    conv = build_model(spec).stages[0].conv[0]
    assert conv.in_channels == conv.out_channels == 24 and conv.groups == 3  # round(26 / 8) · 8 = 24
    wide = parse_spec("stages: [{block: bottleneck, out: 8, expand: 0.25, group_width: 16}]")
    assert build_model(wide).stages[0].conv[0].groups == 1  # mid 2 → one whole group of 16


def test_new_keys_at_their_default_leave_old_specs_unchanged() -> None:
    """gate / group_width came after the first checkpoints: at their default they are left out of the
    normalized spec, so earlier specs keep their hash. The anchor is the first cifar held-out spec, named
    s-695f2798a8 in every held-out result file."""
    plain = parse_spec("stages: [{block: mbconv, out: 8, se: true}, {block: bottleneck, out: 8}]")
    same = parse_spec("stages: [{block: mbconv, out: 8, se: true, gate: hardsigmoid}, "
                      "{block: bottleneck, out: 8, group_width: 0}]")
    assert same == plain and "gate" not in plain["stages"][0] and "group_width" not in plain["stages"][1]
    first = sample_spec(random.Random(1_000_000), SamplerConfig(max_macs=25e6, **SPACES["cifar"]))
    assert first["name"] == "s-695f2798a8"


def test_defaults_are_filled() -> None:
    spec = parse_spec("stages: [{block: conv, out: 8}]")
    assert spec["input"] == [3, 32, 32] and spec["num_classes"] == 10
    assert spec["stages"][0] == {"block": "conv", "out": 8, "kernel": 3, "stride": 1, "act": "relu", "repeat": 1}
    assert spec["head"] == {"hidden": 0, "dropout": 0.0}


@pytest.mark.parametrize("text,path", [
    ("!!python/object/apply:os.system ['echo pwned']", "(yaml)"),
    ("stages: !!python/name:os.system", "(yaml)"),
    ("model: os.system", "model"),
    ("model: torchvision.models.resnet18\nargs: {weights: IMAGENET1K_V1}", "args.weights"),
    ("model: torchvision.models._utils\n", "model"),
    ("stages: [{block: conv, out: 8, kernal: 3}]", "stages[0].kernal"),
    ("stages: [{block: conv, out: 8}, {block: mbconv, out: 8, kernel: 4}]", "stages[1].kernel"),
    ("stages: [{block: conv, out: 8, se: true}]", "stages[0].se"),
    ("stages: [{block: conv, out: true}]", "stages[0].out"),
    ("stages: [{block: transformer, out: 8}]", "stages[0].block"),
    ("stages: [{block: conv, out: 8, act: elu}]", "stages[0].act"),
    ("stages: [{block: mbconv, out: 8, gate: sigmoid}]", "stages[0].gate"),
    ("stages: [{block: mbconv, out: 8, se: true, gate: relu}]", "stages[0].gate"),
    ("stages: [{block: bottleneck, out: 8, group_width: -4}]", "stages[0].group_width"),
    ("stages: [{block: basic, out: 8, group_width: 4}]", "stages[0].group_width"),
    ("stages: [{block: shuffle, out: 9}]", "stages[0].out"),
    ("stages: [{block: conv}]", "stages[0].out"),
    ("input: [3, 32]\nstages: [{block: conv, out: 8}]", "input"),
    ("stages: [{block: conv, out: 8}]\nhead: {dropout: 1.0}", "head.dropout"),
    ("stages: {block: conv, out: 8}", "stages"),
    ("stages: [{block: conv, out: 8}\n", "(yaml)"),
    ("- 1\n- 2", "(top level)"),
    ("", "(top level)"),
    ("# only a comment\n", "(top level)"),
])
def test_bad_specs_name_the_key(text: str, path: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(text, source="bad.yaml")
    assert err.value.path == path
    assert str(err.value).startswith("bad.yaml: ")
    assert "allowed" in str(err.value) or "missing" in str(err.value) or "not allowed" in str(err.value)


def test_yaml_tag_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_spec(bad)
    assert not marker.exists()


def test_cli_good_and_bad(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "ghnq.spec", str(ROOT / "specs" / "resnet20.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert "params=272,474" in good.stdout and "output=[1, 10]" in good.stdout
    bad = tmp_path / "typo.yaml"
    bad.write_text("stages:\n  - {block: conv, out: 8}\n  - {block: conv, out: 8}\n"
                   "  - {block: conv, out: 8, kernel: 4}\n")
    res = subprocess.run([sys.executable, "-m", "ghnq.spec", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert "stages[2].kernel" in res.stderr and "got 4" in res.stderr and "1, 3, 5, 7" in res.stderr
    missing = subprocess.run([sys.executable, "-m", "ghnq.spec", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------------------------------------------
# Fuzz: ≥ 1,000 malformed specs, each refused with a SpecError naming the mutated key — never anything else.

BASES = [
    yaml.safe_load((ROOT / "specs" / "tiny-mbv2.yaml").read_text()),
    yaml.safe_load((ROOT / "specs" / "sepnet.yaml").read_text()),
    yaml.safe_load((ROOT / "specs" / "bottlenet.yaml").read_text()),
    yaml.safe_load((ROOT / "specs" / "mobilenet_v3_small.yaml").read_text()),
]
WRONG_VALUES = [None, "x", "relu", -1, 0, 4, 3.5, 10**9, True, [], [1, 2], {}, {"a": 1}, float("nan"), float("inf")]


def _leaf_paths(obj: object, prefix: str = "") -> list[tuple[str, list]]:
    """Every (path, access) of a leaf value: access is the list of keys/indices to reach it."""
    out: list[tuple[str, list]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict | list) and v and k != "input":
                out += [(pp, [k, *acc]) for pp, acc in _leaf_paths(v, p)]
            else:
                out.append((p, [k]))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += [(pp, [i, *acc]) for pp, acc in _leaf_paths(v, f"{prefix}[{i}]")]
    return out


def _get(obj: object, access: list) -> object:
    for a in access:
        obj = obj[a]  # type: ignore[index]
    return obj


def _is_valid_value(base: dict, access: list, value: object) -> bool:
    mutated = copy.deepcopy(base)
    _get(mutated, access[:-1])[access[-1]] = value  # type: ignore[index]
    try:
        validate_spec(mutated)
    except SpecError:
        return False
    return True


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_malformed_specs(data: st.DataObject) -> None:
    base = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    kind = data.draw(st.sampled_from(["value", "unknown_key", "text", "tag", "model"]))
    expected: str | None
    if kind == "value":
        leaves = _leaf_paths(base)
        path, access = data.draw(st.sampled_from(leaves))
        value = data.draw(st.sampled_from(WRONG_VALUES) | st.text(max_size=8) | st.integers(-10**6, 10**6))
        if _is_valid_value(base, access, value):
            return  # the mutation happened to be valid (e.g. kernel 3 → 5): nothing to refuse
        _get(base, access[:-1])[access[-1]] = value
        text = yaml.safe_dump(base, allow_unicode=True)
        expected = path
    elif kind == "unknown_key":
        # an unknown key at the top level or inside one stage / stem / head
        targets = [("", [])]
        for k in ("stem", "head"):
            if k in base:
                targets.append((k, [k]))
        for i in range(len(base.get("stages", []))):
            targets.append((f"stages[{i}]", ["stages", i]))
        where, access = data.draw(st.sampled_from(targets))
        key = data.draw(st.sampled_from(["kernal", "strides", "Out", "act_fn", "foo", "expansion", "repeats"]))
        _get(base, access)[key] = 1  # type: ignore[index]
        text = yaml.safe_dump(base)
        expected = f"{where}.{key}" if where else key
    elif kind == "text":
        good = yaml.safe_dump(base)
        cut = data.draw(st.integers(1, len(good) - 1))
        junk = data.draw(st.sampled_from(["{", "[", ": :", "\t", "'", '"', "- [", "}}", "&a *b", "%TAG"]))
        text = good[:cut] + junk + good[cut:]
        expected = None  # either broken YAML or a structural error: any key path, but a SpecError
    elif kind == "tag":
        tag = data.draw(st.sampled_from(["!!python/object/apply:os.system ['id']", "!!python/name:os.system",
                                         "!!python/object/new:subprocess.Popen [['id']]", "!custom 3",
                                         "!!binary aGk="]))
        text = yaml.safe_dump(base) + f"extra: {tag}\n"
        expected = None
    else:
        model = data.draw(st.sampled_from(["os.system", "subprocess.Popen", "torchvision.models.vit_b_16",
                                           "torch.hub.load", "builtins.eval", "torchvision.models.__dict__",
                                           "ghnq.spec.build_model", ""]) | st.text(max_size=20))
        text = yaml.safe_dump({"model": model, "num_classes": 10})
        expected = "model"
    try:
        parse_spec(text, source="fuzz.yaml")
    except SpecError as err:
        msg = str(err)
        assert msg.startswith("fuzz.yaml: ")
        assert err.path, msg  # every message names a key path (or "(yaml)" for YAML syntax / tags)
        assert f": {err.path}: " in msg
        if expected is not None:
            assert err.path == expected, (msg, expected)
        return
    except Exception as err:  # any other exception is a traceback for the user: the test fails
        raise AssertionError(f"{type(err).__name__} escaped for:\n{text}") from err
    # Text mutations may still parse into a valid spec (a junk char inside a string is fine) — only those.
    assert kind == "text", f"malformed spec accepted:\n{text}"


# ---------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_is_seeded_valid_and_capped() -> None:
    cfg = SamplerConfig(max_macs=40e6)
    specs = [sample_spec(random.Random(i), cfg) for i in range(25)]
    again = [sample_spec(random.Random(i), cfg) for i in range(3)]
    assert specs[:3] == again
    assert len({spec_hash(s) for s in specs}) == 25
    blocks = set()
    for s in specs:
        validate_spec(s)
        assert spec_macs(s) <= 40e6
        blocks |= {st_["block"] for st_ in s["stages"]}
    assert blocks == {"conv", "sep", "mbconv", "basic", "bottleneck"}


def test_grammar_space_reaches_beyond_the_cifar_space(batch: torch.Tensor) -> None:
    """--space grammar: stride-2 stems, 1×1/7×7 stems and stages wider than the cifar space's 192, every draw
    valid and under the MAC cap; --space cifar draws exactly what the default config draws."""
    cifar = SamplerConfig(max_macs=40e6, **SPACES["cifar"])
    assert [sample_spec(random.Random(i), cifar) for i in range(3)] == \
        [sample_spec(random.Random(i), SamplerConfig(max_macs=40e6)) for i in range(3)]
    cfg = SamplerConfig(max_macs=40e6, **SPACES["grammar"])
    specs = [sample_spec(random.Random(i), cfg) for i in range(40)]
    for s in specs:
        validate_spec(s)
        assert spec_macs(s) <= 40e6
    assert {s["stem"]["stride"] for s in specs} == {1, 2}
    assert {s["stem"]["kernel"] for s in specs} == {1, 3, 5, 7}
    assert max(st_["out"] for s in specs for st_ in s["stages"]) > 192
    strided = next(s for s in specs if s["stem"]["stride"] == 2)
    with torch.no_grad():
        assert build_model(strided).eval()(batch[:2]).shape == (2, 10)


def test_deep_space_reaches_torchvision_depth_and_width(batch: torch.Tensor) -> None:
    """--space deep: nets as deep as torchvision's mobile nets (the grammar space never passes ~35 layers),
    some stages wider than 512, 1024/1280-wide heads; every draw valid and under the MAC cap."""
    cap = 25e6
    grammar = [sample_spec(random.Random(i), SamplerConfig(max_macs=cap, **SPACES["grammar"])) for i in range(40)]
    deep = [sample_spec(random.Random(i), SamplerConfig(max_macs=cap, **SPACES["deep"])) for i in range(40)]

    def layers(spec: dict) -> int:
        return spec_summary(spec)["layers"]

    for s in deep:
        validate_spec(s)
        assert spec_macs(s) <= cap
    assert max(layers(s) for s in deep) >= 50 > max(layers(s) for s in grammar)
    assert max(st_["out"] for s in deep for st_ in s["stages"]) > 512
    assert {s["head"]["hidden"] for s in deep} >= {0, 128, 1024, 1280}
    assert max(len(s["stages"]) for s in deep) == 7 and max(st_["repeat"] for s in deep for st_ in s["stages"]) == 4
    deepest = max(deep, key=layers)
    with torch.no_grad():
        assert build_model(deepest).eval()(batch[:2]).shape == (2, 10)


def test_modern_space_draws_silu_gelu_sigmoid_gates_grouped_bottlenecks_and_shuffles(batch: torch.Tensor) -> None:
    """--space modern: the ops of EfficientNet / RegNet / ShuffleNet-style nets, which no other space draws."""
    cap = 25e6
    modern = [sample_spec(random.Random(i), SamplerConfig(max_macs=cap, **SPACES["modern"])) for i in range(40)]
    others = [sample_spec(random.Random(i), SamplerConfig(max_macs=cap, **SPACES[space]))
              for space in ("cifar", "grammar", "deep") for i in range(15)]

    def acts(spec: dict) -> set[str]:
        return {spec["stem"]["act"]} | {st_["act"] for st_ in spec["stages"]}

    for s in modern:
        validate_spec(s)
        assert spec_macs(s) <= cap
    assert {"silu", "gelu"} <= set().union(*map(acts, modern))
    assert any(st_.get("gate") == "sigmoid" for s in modern for st_ in s["stages"])
    grouped = [s for s in modern if any(st_.get("group_width") for st_ in s["stages"])]
    assert grouped
    assert any(st_["block"] == "shuffle" for s in modern for st_ in s["stages"])
    assert set().union(*map(acts, others)) <= {"relu", "relu6", "hardswish"}
    assert not any(st_["block"] == "shuffle" for s in others for st_ in s["stages"])
    assert not any("gate" in st_ or "group_width" in st_ for s in others for st_ in s["stages"])
    models = [build_model(s).eval() for s in grouped]
    truly = [m for m in models if any(isinstance(c, nn.Conv2d) and 1 < c.groups < c.in_channels for c in m.modules())]
    assert len(truly) == len(models)  # a group width is halved (or dropped) until ≥ 2 groups fit
    model = truly[0]
    with torch.no_grad():
        assert model(batch[:2]).shape == (2, 10)


def test_sampled_spec_runs(batch: torch.Tensor) -> None:
    spec = sample_spec(random.Random(123))
    with torch.no_grad():
        assert build_model(spec).eval()(batch[:2]).shape == (2, 10)
