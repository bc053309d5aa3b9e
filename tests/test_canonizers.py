"""BatchNorm merging as a graph transform."""

import pytest
import torch
from torch import nn

import attrax as ax
from attrax.canonizers import merge_batchnorm
from attrax.rewrite import forward, program_for
from conftest import assert_unchanged, module_snapshot

D = torch.float64


def _bn(c, eps=1e-5, seed=0):
    bn = nn.BatchNorm2d(c, eps=eps) if isinstance(c, int) else c
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
    return bn


def _bn1d(c, seed=0):
    return _bn(nn.BatchNorm1d(c), seed=seed)


def canonized(model, x):
    f, p = ax.functionalize(model)
    prog = program_for(f, p, (x,))
    merged = merge_batchnorm(prog)
    return prog, merged, p


def n_bn(prog):
    return sum(1 for n in prog.nodes if n.packet == "batch_norm")


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_merge_after_conv_keeps_the_function(eps):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), _bn(4, eps), nn.ReLU(), nn.Conv2d(4, 2, 3), _bn(2, eps, 1)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    prog, merged, p = canonized(m, x)
    assert n_bn(prog) == 2 and n_bn(merged) == 0
    torch.testing.assert_close(forward(merged, p, (x,))[merged.output], m(x))


def test_merge_before_linear_and_unpadded_conv():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Flatten(), _bn1d(12), nn.Linear(12, 5)).double().eval()
    x = torch.randn(3, 3, 2, 2, dtype=D)
    prog, merged, p = canonized(m, x)
    assert n_bn(merged) == 0
    torch.testing.assert_close(forward(merged, p, (x,))[merged.output], m(x))
    conv = nn.Sequential(nn.ReLU(), _bn(3), nn.Conv2d(3, 4, 3)).double().eval()
    prog, merged, p = canonized(conv, torch.randn(2, 3, 5, 5, dtype=D))
    assert n_bn(merged) == 0
    x = torch.randn(2, 3, 5, 5, dtype=D)
    torch.testing.assert_close(forward(merged, p, (x,))[merged.output], conv(x))


def test_padded_conv_after_batchnorm_is_not_merged():
    # padding zeros are not shifted by the BatchNorm, so folding it into a padded conv is not exact
    m = nn.Sequential(nn.ReLU(), _bn(3), nn.Conv2d(3, 4, 3, padding=1)).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    _, merged, p = canonized(m, x)
    assert n_bn(merged) == 1
    torch.testing.assert_close(forward(merged, p, (x,))[merged.output], m(x))


class Reused(nn.Module):
    """One conv and one BatchNorm module, each called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = _bn(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn(self.conv(h)))
        return self.fc(h.mean((2, 3)))


def test_reused_modules_merge_per_call_site():
    torch.manual_seed(2)
    m = Reused().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    prog, merged, p = canonized(m, x)
    assert n_bn(prog) == 2 and n_bn(merged) == 0
    torch.testing.assert_close(forward(merged, p, (x,))[merged.output], m(x))


class DenseLayer(nn.Module):
    """DenseNet-style: BN-ReLU-conv-BN-ReLU-conv on concatenated features."""

    def __init__(self, c, growth):
        super().__init__()
        self.norm1, self.conv1 = _bn(c), nn.Conv2d(c, 8, 1, bias=False)
        self.norm2, self.conv2 = _bn(8, seed=3), nn.Conv2d(8, growth, 3, padding=1, bias=False)

    def forward(self, feats):
        h = torch.cat(feats, 1)
        h = self.conv1(torch.relu(self.norm1(h)))
        return self.conv2(torch.relu(self.norm2(h)))


class DenseNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([DenseLayer(4, 2), DenseLayer(6, 2)])
        self.norm = _bn(8, seed=5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        h = torch.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_densenet_blocks_merge_what_can_be_merged_and_stay_exact():
    torch.manual_seed(3)
    m = DenseNetish().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    prog, merged, p = canonized(m, x)
    # norm2 follows conv1 directly (merged); norm1 and the final norm follow a concatenation (kept)
    assert n_bn(prog) == 5 and n_bn(merged) == 3
    torch.testing.assert_close(forward(merged, p, (x,))[merged.output], m(x))
    before = module_snapshot(m)
    f, params = ax.functionalize(m)
    rel = ax.lrp(f, params, x, 1, composite=ax.composites.epsilon_plus_flat())
    assert rel.shape == x.shape and torch.isfinite(rel).all()
    assert_unchanged(m, before)


def test_gradients_flow_through_merged_parameters():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 2, 4, 4, dtype=D)
    w = {"1.weight": p["1.weight"], "1.bias": p["1.bias"]}  # the BatchNorm's affine parameters
    g = torch.func.grad(lambda w: ax.lrp(f, {**p, **w}, x, 1).sum())(w)
    # relevance sums to the score (up to the epsilon and biases), whose gradient w.r.t. the BatchNorm
    # parameters is not zero: the merged weights must carry it
    assert all(v.abs().sum() > 0 for v in g.values())


# ------------------------------------------------------------------ user canonizers (issue 18.13)


class AffineNorm(nn.Module):
    """A custom normalisation layer: y = x * gamma + beta per feature."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(n) + 0.5)
        self.beta = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return x * self.gamma + self.beta


def merge_affine_norm(program):
    """Fold ``linear -> x * gamma + beta`` (an AffineNorm) into the linear layer: W' = diag(gamma) W, b' = b gamma + beta."""
    from attrax.rewrite import ProgramBuilder

    users = program.consumers()
    b = ProgramBuilder(program)
    folded: dict[int, int] = {}  # the add node -> its linear
    for node in program.nodes:
        if node.packet == "add" and (node.module_type or "").endswith("AffineNorm"):
            mul = program.nodes[node.args[0][1]]
            lin = program.nodes[mul.args[0][1]]
            if mul.packet == "mul" and lin.packet == "linear" and users[lin.index] == [mul.index]:
                folded[node.index] = lin.index
    skip = {program.nodes[a].args[0][1] for a in folded} | set(folded.values())
    for node in sorted(program.nodes, key=lambda n: n.op == "call"):
        if node.index in skip:
            continue
        if node.index in folded:
            lin = program.nodes[folded[node.index]]
            mul = program.nodes[node.args[0][1]]
            gamma, beta = mul.args[1], node.args[1]
            g_col = b.call("aten.unsqueeze.default", (b.ref(gamma[1]), ("c", 1)), lin, "gamma_col")
            w_new = b.call("aten.mul.Tensor", (b.ref(lin.args[1][1]), ("n", g_col)), lin, "weight")
            bias = b.call("aten.mul.Tensor", (b.ref(lin.args[2][1]), b.ref(gamma[1])), lin, "bias_scaled")
            b_new = b.call("aten.add.Tensor", (("n", bias), b.ref(beta[1])), lin, "bias")
            new = b.copy(lin, args=(b.ref(lin.args[0][1]), ("n", w_new), ("n", b_new)))
            b.alias(node.index, new)
            continue
        b.copy(node)
    return b.build()


def test_a_user_canonizer_merges_a_custom_normalisation_layer():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), AffineNorm(6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    merged = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        merged[0].weight.copy_(model[0].weight * model[1].gamma[:, None])
        merged[0].bias.copy_(model[0].bias * model[1].gamma + model[1].beta)
        merged[2].load_state_dict(model[3].state_dict())
    f, p = ax.functionalize(model)
    mf, mp = ax.functionalize(merged)
    x = torch.randn(5, 4, dtype=D)
    comp = ax.composites.epsilon_plus()
    want = ax.lrp(mf, mp, x, 1, composite=comp)
    got = ax.lrp(f, p, x, 1, composite=comp, canonize=[ax.canonizers.merge_batchnorm, merge_affine_norm])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # without it the AffineNorm's ops take the default rules: another (valid) answer
    assert not torch.allclose(ax.lrp(f, p, x, 1, composite=comp, canonize=False), want)
    # conditional takes the same option
    cond = ax.conditional(f, p, x, 1, [{"3": [0, 1, 2]}], composite=comp, canonize=[merge_affine_norm],
                          exclude_parallel=False)
    torch.testing.assert_close(cond[0], want, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="canonize must be"):
        ax.lrp(f, p, x, 1, canonize=3)
    with pytest.raises(TypeError, match=r"canonize\[0\] must be a function Program -> Program.*got str"):
        ax.lrp(f, p, x, 1, canonize=["merge_batchnorm"])
    with pytest.raises(TypeError, match="must return a Program"):
        ax.lrp(f, p, x, 1, canonize=[lambda prog: None])
