"""The model against a reference written here from protocol.md, via the seed-checkpoint loader."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.kernels import build
from fastres.study.models import CheckpointError, forward_flops, from_seed_checkpoint
from fastres.study.structures import STRUCTURES, ResNetSpec, forward_flop, param_count


class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride, f1, p1, k):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, f1, stride, p1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, f1, 1, p1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, k, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class RefResNet(nn.Module):
    """The authors' model as protocol.md describes it, written independently of fastres."""

    def __init__(self, n, b, c_in, f0, p0, f1, p1, k):
        super().__init__()
        self.n = n
        self.conv1 = nn.Conv2d(3, c_in, f0, 1, p0, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        cin = c_in
        for i in range(n):
            cout = c_in * 2**i
            strides = [1 if i == 0 else 2] + [1] * (b[i] - 1)
            blocks = []
            for s in strides:
                blocks.append(RefBlock(cin, cout, s, f1, p1, k))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.n):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.view(out.size(0), -1))


def ref_for(spec: ResNetSpec) -> RefResNet:
    return RefResNet(spec.N, spec.B, spec.C_in, spec.F0, spec.P0, spec.F1, spec.P1, spec.K)


def randomize_bn(model: nn.Module) -> None:
    # Non-trivial running statistics and affine terms, so a wrong mapping cannot hide.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


SMALL = {  # structure-shaped specs at a small width, plus two real ones
    "s1-narrow": ResNetSpec(N=4, B=(2, 1, 1, 1), C_in=8, F0=3, P0=1, F1=3, P1=1, K=1),
    "s6-narrow": ResNetSpec(N=3, B=(5, 2, 1), C_in=8, F0=5, P0=2, F1=5, P1=2, K=1),
    "s9-narrow": ResNetSpec(N=2, B=(3, 1), C_in=8, F0=7, P0=3, F1=5, P1=2, K=1),
    "s1": STRUCTURES[1],
    "s8": STRUCTURES[8],
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("wrap", ["bare", "module-prefix", "net-dict"])
def test_seed_checkpoint_matches_reference(tmp_path, name, wrap):
    spec = SMALL[name]
    torch.manual_seed(1)
    ref = ref_for(spec)
    randomize_bn(ref)
    state = ref.state_dict()
    if wrap == "module-prefix":  # what nn.DataParallel saves
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "net-dict":  # what the authors' script saves
        state = {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 90.0, "epoch": 3}
    torch.save(state, tmp_path / "ckpt.pth")
    model = from_seed_checkpoint(tmp_path / "ckpt.pth", spec)
    x = torch.randn(3, 3, 32, 32)
    ref.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    ref.train()
    model.train()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # batch statistics too


def test_build_has_reference_parameter_layout():
    spec = SMALL["s6-narrow"]
    ours = {k: v.shape for k, v in build(spec).state_dict().items()}
    theirs = {k: v.shape for k, v in ref_for(spec).state_dict().items()}
    assert ours == theirs


def test_checkpoint_of_another_structure_names_it(tmp_path):
    torch.save(ref_for(STRUCTURES[2]).state_dict(), tmp_path / "s2.pth")
    with pytest.raises(CheckpointError) as e:
        from_seed_checkpoint(tmp_path / "s2.pth", STRUCTURES[1])
    msg = str(e.value)
    assert "conv1.weight: checkpoint (64, 3, 5, 5) vs model (64, 3, 3, 3)" in msg
    assert "structure 2" in msg


def test_checkpoint_missing_and_unexpected_keys(tmp_path):
    spec = SMALL["s1-narrow"]
    state = ref_for(spec).state_dict()
    del state["layer2.0.shortcut.0.weight"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): layer2.0.shortcut.0.weight"):
        from_seed_checkpoint(tmp_path / "bad.pth", spec)
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): layer9.0.conv1.weight"):
        from_seed_checkpoint(tmp_path / "bad.pth", spec)


def test_checkpoint_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        from_seed_checkpoint(tmp_path / "list.pth", SMALL["s1-narrow"])


def test_kernel_switch():
    spec = SMALL["s1-narrow"]
    with pytest.raises(ValueError, match="kernels must be one of"):
        build(spec, kernels="cudnn")
    triton_model = build(spec, kernels="triton")  # the interpreter runs it here (conftest)
    assert isinstance(triton_model, nn.Module) and type(triton_model) is not type(build(spec))


@pytest.mark.parametrize("shape", [(5, 6, 1, 1), (1, 7, 1, 1), (2, 3, 1, 4), (3, 4, 5, 6)])
def test_strictly_gives_the_format_strides_where_contiguous_does_not(shape):
    """A 1x1 weight moved to channels-last is is_contiguous() in both formats, so .contiguous()
    keeps its channels-last strides and oneDNN takes its channels-last path from them."""
    from fastres.study.models import strictly

    t = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    nchw = strictly(t, torch.contiguous_format)
    assert nchw.stride() == torch.empty(shape).stride()
    assert torch.equal(nchw, t)
    cl = strictly(nchw, torch.channels_last)
    assert cl.stride() == torch.empty(shape, memory_format=torch.channels_last).stride()
    assert strictly(cl, torch.channels_last) is cl


@pytest.mark.parametrize("spec", [*STRUCTURES.values(), *SMALL.values(),
                                  ResNetSpec.parse("N=3 B=1,2,1 C_in=4 F0=5 P0=1 F1=3 P1=1 K=1")])
def test_spec_counts_are_the_built_models(spec):
    """fastres.study.structures counts parameters and FLOP from the spec alone (planning needs no
    torch); they must be what the built model has and computes."""
    model = build(spec)
    assert param_count(spec) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert forward_flop(spec) == forward_flops(model)
