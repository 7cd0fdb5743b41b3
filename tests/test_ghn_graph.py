"""GHN-Q graph extraction and prediction shapes on every spec and on torchvision nets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ghnq.graph import PARAM_KINDS, extract_graph
from ghnq.model import GHNQ, GHNConfig, collate
from ghnq.spec import build_model, load_spec, validate_spec

SPECS = sorted(Path(__file__).resolve().parents[1].glob("specs/*.yaml"))
TV = ["resnet18", "mobilenet_v2", "mobilenet_v3_small"]


def _models() -> list[tuple[str, nn.Module, int]]:
    out = []
    for p in SPECS:
        with torch.device("meta"):
            out.append((p.stem, build_model(load_spec(p)), 32))
    for name in TV:
        with torch.device("meta"):
            out.append((name, getattr(torchvision.models, name)(num_classes=10), 224))
    return out


MODELS = _models()


def test_zero_pads_are_part_of_the_next_layers_padding() -> None:
    """A pad is no node of its own (training nets have none; GHN-2's graphs fold padding into the conv), but it
    widens the map: every layer's spatial size is torch's."""
    from tests.nets import PadNet

    model = PadNet()
    seen: dict[str, int] = {}

    def record(name: str) -> object:
        return lambda m, i, o: seen.__setitem__(name, o.shape[-2])

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    g = extract_graph(model, input_hw=32)
    assert {n.module: n.hw for n in g.nodes if n.module in seen} == seen == {
        "stem.0": 16, "expand": 16, "dw.0": 16, "down.0": 8}
    assert "other" not in {n.kind for n in g.nodes}
    assert [n.kind for n in g.nodes[:2]] == ["input", "conv"]


def test_spelled_hard_activations_read_as_what_they_compute() -> None:
    from tests.nets import SpelledNet

    kinds = [n.kind for n in extract_graph(SpelledNet(), input_hw=32).nodes]
    assert kinds.count("hardswish") == 2 and kinds.count("hardsigmoid") == 2 and kinds.count("silu") == 1
    assert kinds[:6] == ["input", "conv", "bn", "hardswish", "dwconv", "bn"] and kinds[6] == "relu"  # the clamp
    assert not {"add", "other", "sigmoid"} & set(kinds)


@pytest.mark.parametrize("name,model,hw", MODELS, ids=[m[0] for m in MODELS])
def test_graph_covers_every_parameter(name: str, model: nn.Module, hw: int) -> None:
    g = extract_graph(model, input_hw=hw)
    assert all(s < d for s, d in g.edges), "edges must follow execution order"
    # Every node but the input has a producer; every conv/linear is a parameter node with its true shape.
    has_pred = {d for _, d in g.edges}
    assert all(i in has_pred for i, n in enumerate(g.nodes) if n.kind != "input")
    predicted = {f"{n.module}.{k}": s for n in g.nodes if n.kind in PARAM_KINDS for k, s in n.params.items()}
    for pname, p in model.named_parameters():
        owner = pname.rsplit(".", 1)[0]
        if owner in g.norms:
            continue
        assert predicted[pname] == tuple(p.shape), pname
    assert sum(n.kind == "classifier" for n in g.nodes) == 1
    assert g.nodes[-1].kind == "classifier"


def test_graph_kinds() -> None:
    kinds = {name: {n.kind for n in extract_graph(m, input_hw=hw).nodes} for name, m, hw in MODELS}
    assert {"conv", "bn", "relu", "add", "gap"} <= kinds["resnet20"]
    assert {"dwconv", "se_conv", "mul", "hardsigmoid", "relu6"} <= kinds["tiny-mbv2"]
    assert {"hardswish", "se_conv", "mul", "linear"} <= kinds["mobilenet_v3_small"]
    assert "maxpool" in kinds["resnet18"]
    # Spatial sizes: resnet20 ends at 8x8 before the global pool.
    g = extract_graph(dict((n, m) for n, m, _ in MODELS)["resnet20"])
    gap = next(i for i, n in enumerate(g.nodes) if n.kind == "gap")
    assert g.nodes[gap - 1].hw == 8 and g.nodes[gap].hw == 1


def test_pool_sizes_follow_torch_functions_and_ceil_mode() -> None:
    """Functional pools are pools in the GHN's graph, and every node's spatial size is the one torch computes
    (ceil mode included): the size is an input feature of the prediction."""
    from tests.nets import TorchPoolNet

    model = TorchPoolNet()
    seen: dict[str, int] = {}  # each conv's and pool module's output size, as torch computes it

    def record(name: str) -> object:
        return lambda m, i, o: seen.__setitem__(name, o.shape[-1])

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d | nn.MaxPool2d)]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    g = extract_graph(model, input_hw=32)
    assert seen == {"stem.0": 32, "conv": 16, "pool": 9, "valid.0": 7}
    convs = {n.module: n.hw for n in g.nodes if n.module in seen}
    assert convs == {"stem.0": 32, "conv": 16, "valid.0": 7}
    pools = [(n.kind, n.hw) for n in g.nodes if n.kind in ("maxpool", "avgpool", "gap")]
    assert pools == [("maxpool", 16), ("maxpool", seen["pool"]), ("maxpool", 4), ("avgpool", 4), ("avgpool", 1)]


@pytest.mark.parametrize("name,model,hw", MODELS, ids=[m[0] for m in MODELS])
def test_predicted_shapes_match(name: str, model: nn.Module, hw: int) -> None:
    ghn = GHNQ(GHNConfig(hidden=16, dec_hidden=8, dec_out=16, dec_in=16, hops=10))
    g = extract_graph(model, input_hw=hw)
    with torch.no_grad():
        params = ghn(collate([g], 10), ["4"])[0]
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters() if k.rsplit(".", 1)[0] not in g.norms}
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    assert all(torch.isfinite(v).all() for v in params.values())


def test_wide_layers_not_rank_deficient() -> None:
    """Tiling a 16-wide block to 96 output channels must not repeat rows (the sign pattern breaks copies)."""
    ghn = GHNQ(GHNConfig(hidden=16, dec_hidden=8, dec_out=16, dec_in=16))
    with torch.no_grad():
        (w,), _ = ghn.decode(torch.randn(1, 16), torch.tensor([0]), [(96, 48, 1, 1)])
    assert torch.linalg.matrix_rank(w.view(96, 48)) == 48


@pytest.mark.parametrize("name,model,hw", MODELS[:3] + MODELS[-1:], ids=[m[0] for m in MODELS[:3] + MODELS[-1:]])
def test_inference_sweep_equals_training_sweep(name: str, model: nn.Module, hw: int) -> None:
    """Prediction's fused in-place sweep (no autograd) computes what the training sweep computes."""
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(hidden=16, dec_hidden=8, dec_out=16, dec_in=16, hops=10))
    batch = collate([extract_graph(model, input_hw=hw)], 10)
    trained = ghn.embed(batch)
    with torch.no_grad():
        predicted = ghn.embed(batch)
    assert trained.requires_grad and not predicted.requires_grad
    torch.testing.assert_close(predicted, trained.detach(), rtol=1e-5, atol=1e-5)


def _vgg(flatten: bool) -> nn.Module:
    """A VGG-style net whose classifier reads a flattened 4×4 map, or its twin with a global average pool."""
    torch.manual_seed(0)
    body = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4)]
    head = [nn.Flatten(), nn.Linear(12 * 16, 20)] if flatten else [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                                 nn.Linear(12, 20)]
    return nn.Sequential(*body, *head, nn.ReLU(), nn.Linear(20, 10))


def test_flatten_linear_is_predicted_as_its_global_pool_twin() -> None:
    # No training net flattens a spatial map (all pool globally first): such a Linear used to get a tiled block
    # unrelated to the layout, and the net predicted chance. The GHN now sees the global pool it was trained on.
    flat, twin = _vgg(True), _vgg(False)
    gf, gt = extract_graph(flat), extract_graph(twin)
    assert [n.kind for n in gf.nodes] == [n.kind for n in gt.nodes] and gf.edges == gt.edges
    ghn = GHNQ(GHNConfig(hidden=16, dec_hidden=8, dec_out=16, dec_in=16, hops=10)).eval()
    with torch.no_grad():
        pf, pt = ghn(collate([gf], 10), ["8"])[0], ghn(collate([gt], 10), ["8"])[0]
    assert {k: tuple(v.shape) for k, v in pf.items()} == {k: tuple(p.shape) for k, p in flat.named_parameters()
                                                          if k.rsplit(".", 1)[0] not in gf.norms}
    assert torch.equal(pf["8.weight"], pt["9.weight"].repeat_interleave(16, dim=1) / 16)
    for m, p in ((flat, pf), (twin, pt)):
        for k, v in p.items():
            dict(m.named_parameters())[k].data.copy_(v)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(flat.eval()(x), twin.eval()(x), atol=1e-5, rtol=1e-4)


class _Mixer(nn.Module):
    """conv → (channel shuffle) → BN → depthwise conv → conv → pool → linear: with the shuffle, every layer after
    it reads channels in another order than GHN-Q's graph (which contracts the shuffle) shows."""

    def __init__(self, shuffle: bool) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.b = nn.Conv2d(24, 20, 1)
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.shufflenetv2 import channel_shuffle

        x = torch.relu(self.a(x))
        if self.shuffle:
            x = channel_shuffle(x, 3)
        x = torch.relu(self.b(self.dw(self.bn(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _load(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    named = dict(model.named_parameters())
    for k, v in params.items():
        named[k].data.copy_(v)
    return model.eval()


def test_a_channel_shuffle_is_invisible_to_prediction() -> None:
    # Measured before: 2.8 % top-1 on a net with one shuffle unit, 33.6 % without it, because weights decoded for
    # channel positions 0..C-1 read shuffled channels. The depthwise conv now takes the decoded rows and the
    # 1×1 conv the decoded columns of the positions it really reads, so the net computes its unshuffled twin.
    shuffled, plain = _Mixer(True), _Mixer(False)
    gs, gp = extract_graph(shuffled), extract_graph(plain)
    assert [n.kind for n in gs.nodes] == [n.kind for n in gp.nodes] and gs.edges == gp.edges
    dw = next(n for n in gs.nodes if n.kind == "dwconv")
    assert dw.out_index == [c * 8 + g for g in range(8) for c in range(3)]  # torchvision's 3-group interleave
    assert next(n for n in gs.nodes if n.module == "b").in_index == dw.out_index
    assert all(n.in_index is None and n.out_index is None for n in gp.nodes)
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(hidden=16, dec_hidden=8, dec_out=16, dec_in=16, hops=10)).eval()
    with torch.no_grad():
        ps, pp = ghn(collate([gs], 10), ["float"])[0], ghn(collate([gp], 10), ["float"])[0]
    assert not torch.equal(ps["dw.weight"], pp["dw.weight"])
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(_load(shuffled, ps)(x), _load(plain, pp)(x), atol=1e-5, rtol=1e-4)


def test_shuffle_unit_positions_follow_each_channel_to_its_producer() -> None:
    # stem conv (16 ch) → ShuffleNet V2 unit at stride 1: chunk, branch on the second half, concat, 2-group
    # shuffle → global pool → classifier.
    spec = {"input": [3, 16, 16], "num_classes": 10, "stem": {"out": 16, "kernel": 3, "stride": 1, "act": "relu"},
            "stages": [{"block": "shuffle", "out": 16, "repeat": 1, "stride": 1, "kernel": 3, "act": "relu"}],
            "head": {"hidden": 0, "dropout": 0.0}}
    model = build_model(validate_spec(spec))
    g = extract_graph(model)
    by_module = {n.module: n for n in g.nodes if n.module}
    assert by_module["stages.0.branch2.0.0"].in_index == list(range(8, 16))  # reads the stem's rows 8..15
    # concat: the stem's rows 0..7 (passed through), then the branch's rows 0..7; interleaved by the shuffle.
    assert by_module["head.2"].in_index == [i for c in range(8) for i in (c, c)]
    # Meta-training builds its nets on the meta device: the same positions there (a first version fell back).
    with torch.device("meta"):
        on_meta = extract_graph(build_model(validate_spec(spec)))
    assert [(n.in_index, n.out_index) for n in on_meta.nodes] == [(n.in_index, n.out_index) for n in g.nodes]


def test_channel_order_falls_back_quietly(capsys: pytest.CaptureFixture) -> None:
    class Fixed(nn.Module):  # runs only at 12×12: at the default 32×32 the shape pass fails
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(8 * 100, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.fc(torch.cat([y, y], 1).flatten(1))

    g = extract_graph(Fixed())
    assert all(n.in_index is None and n.out_index is None for n in g.nodes)
    assert capsys.readouterr().err == ""


def test_channel_order_pass_leaves_the_model_as_it_was() -> None:
    model = _Mixer(True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract_graph(model)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_residual_after_a_shuffle_gets_matching_rows() -> None:
    # x (shuffled) + conv(x): the conv's rows take the shuffled meanings, so the sum is the unshuffled net's sum
    # permuted, and the classifier reading it undoes that: the net computes its unshuffled twin.
    class Res(nn.Module):
        def __init__(self, shuffle: bool) -> None:
            super().__init__()
            self.shuffle = shuffle
            self.a = nn.Conv2d(3, 12, 3, padding=1)
            self.b = nn.Conv2d(12, 12, 3, padding=1)
            self.fc = nn.Linear(12, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from torchvision.models.shufflenetv2 import channel_shuffle

            x = torch.relu(self.a(x))
            if self.shuffle:
                x = channel_shuffle(x, 2)
            x = x + torch.relu(self.b(x))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    shuffled, plain = Res(True), Res(False)
    gs = extract_graph(shuffled)
    b = next(n for n in gs.nodes if n.module == "b")
    perm = [c * 6 + g for g in range(6) for c in range(2)]
    assert b.in_index == perm and b.out_index == perm
    assert next(n for n in gs.nodes if n.module == "fc").in_index == perm
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(hidden=16, dec_hidden=8, dec_out=16, dec_in=16, hops=10)).eval()
    with torch.no_grad():
        ps, pp = ghn(collate([gs], 10), ["8"])[0], ghn(collate([extract_graph(plain)], 10), ["8"])[0]
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(_load(shuffled, ps)(x), _load(plain, pp)(x), atol=1e-5, rtol=1e-4)
